"""Real gateways and the TF Serving stand-in on loopback, for the tests and the benchmarks.

- :mod:`testkit.gateway`: ``python -m serving`` in a subprocess (or a thread) on free ports;
- :mod:`testkit.standin`: TF Serving's gRPC API on TF Serving's official servicer classes and real TensorFlow.
"""
