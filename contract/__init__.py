"""The contract between training and serving, imported by both (and by nothing else of theirs).

- :mod:`contract.text`: the one text preprocessor (tokenising, vocabulary, padding, windows);
- :mod:`contract.layout`: TF Serving's ``<model>/<version>/`` layout and the files of ``assets.extra/``;
- :mod:`contract.repository`: a version as read from that layout (card, preprocessor, kind, figures);
- :mod:`contract.pull`: versions copied from object storage into that layout, atomically (fsspec,
  the optional ``storage`` extra, imported only there).

No TensorFlow is imported here: the gateway installs without it.
"""
