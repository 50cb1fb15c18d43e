"""``python -m stage`` (``make stage``): the whole deployment on this machine until Ctrl-C.

    python -m stage [--gateways 2] [--model-servers 2] [--models sentiment_lstm ...]

Prints where everything listens; on Ctrl-C (SIGINT), SIGTERM or SIGHUP stops every process it started.
"""

from __future__ import annotations

import argparse
import signal
import sys

from stage.cluster import Stage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="M gateways x N model servers behind nginx, with Prometheus")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--model-servers", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["sentiment_lstm", "sentiment_bilstm", "digits"])
    p.add_argument("--drain-settle-s", type=float, default=1.0,
                   help="the gateways' drain_settle_s: long enough for the stage's endpoints (readiness "
                   "probed every 0.2 s, out after 2 failures) to take a draining gateway out of nginx")
    p.add_argument("--alert-time-scale", type=float, default=1.0,
                   help="divide every alert's range windows and for: by this (1: deploy/alerts.yml as it is)")
    a = p.parse_args(argv)

    def stop(signum, _frame):
        raise KeyboardInterrupt

    # Also SIGINT explicitly: a shell starts background jobs with it ignored, and Python then never
    # turns it into KeyboardInterrupt. SIGHUP: the terminal went away.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    stage = Stage(a.gateways, a.model_servers, a.models, drain_settle_s=a.drain_settle_s,
                  alert_time_scale=a.alert_time_scale)
    try:
        print(f"starting {a.model_servers} model server(s), {a.gateways} gateway(s), nginx and Prometheus ...",
              flush=True)
        stage.start()
        print(stage.describe(), "\nCtrl-C stops everything.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        stage.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
