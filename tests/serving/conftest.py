"""``gw``: a real gateway (`python -m serving`) for a test module, once per backend: embedded,
and TF Serving in a process that cannot import TensorFlow, forwarding to the TF Serving
stand-in (testkit/standin.py; ``gw.standin``, None for the embedded one)."""

import pytest

from testkit.gateway import MODELS_CONFIG, ROOT, WITHOUT_TENSORFLOW, gateway_process
from testkit.standin import StandIn

MODELS = ROOT / "models"


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def gw(request):
    if request.param == "embedded":
        with gateway_process() as running:
            running.standin = None
            yield running
        return
    standin = StandIn(MODELS, ["digits", "sentiment_lstm", "sentiment_bilstm"], config=MODELS_CONFIG)
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address) as running:
            running.standin = standin
            yield running
    finally:
        standin.stop()
