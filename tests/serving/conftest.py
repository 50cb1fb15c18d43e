"""``gw``: a real gateway (`python -m serving`) for a test module, once per backend: embedded,
and TF Serving in a process that cannot import TensorFlow, forwarding to the TF Serving
stand-in (testkit/standin.py; ``gw.standin``, None for the embedded one).

Modules using ``gw`` only read from it (default settings, nothing changed that another module
could see), so they share one pair for the whole session (``shared_gateways``, both started
together on first use, by ``gw`` or by a module that wants one of them directly): each start
loads the TensorFlow models, seconds apiece. A module that needs settings of its own, or changes
what the gateway serves or how, starts its own (``testkit.gateway.gateway_process``)."""

import pytest

from testkit.gateway import BACKENDS, ROOT, SharedGateways

MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def shared_gateways():
    """The default gateway of each backend, started on first use, stopped at the end of the session."""
    pool = SharedGateways()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module", params=BACKENDS)
def gw(request, shared_gateways):
    return shared_gateways.get(request.param)
