"""The TF Serving stand-in (testkit/standin.py) as its own process, for benchmarks.

    python bench/standin_server.py PORT [MODEL ...]

Runs in a separate process so that its TensorFlow CPU time is not counted as
the gateway's. Serves until killed.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testkit.standin import StandIn  # noqa: E402

if __name__ == "__main__":
    port, models = int(sys.argv[1]), sys.argv[2:] or ["digits", "sentiment_lstm", "sentiment_bilstm"]
    standin = StandIn(ROOT / "models", models, config=ROOT / "serving" / "tfserving" / "models.config")
    standin.start(port)
    print(f"stand-in on {standin.address}", flush=True)
    threading.Event().wait()
