"""Training side of the classifier service: data, preprocessing, models, export.

Importing this package is cheap: TensorFlow is imported only by the modules that
need it (``models``, ``train``, ``export``, ``evaluate``), so the gateway can use
what it shares with training (:mod:`contract`) without TensorFlow installed.
"""
