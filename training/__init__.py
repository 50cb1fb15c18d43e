"""Training side of the classifier service: data, preprocessing, models, export.

Importing this package is cheap: TensorFlow is imported only by the modules that
need it (``models``, ``train``, ``export``, ``evaluate``), so the gateway can use
:mod:`training.text` without TensorFlow installed.
"""
