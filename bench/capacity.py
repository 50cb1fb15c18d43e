"""Capacity of the gateway on both backends: the Locust step ramp (loadtests/, `--shape ramp`)
against a gateway started here, once with the embedded backend and once with the TF Serving
backend in front of the TF Serving stand-in (bench/standin_server.py, its own process).

    python bench/capacity.py [--backends embedded tfserving] [--out bench/results/capacity]

Prints each ramp's step table and knee (as loadtests/shapes.py reports them) and writes
Locust's CSV/HTML reports under --out/<backend>_*. Everything runs on this machine:
Locust, the gateway and (for tfserving) the stand-in share its cores, as the README says.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import process, wait_for  # noqa: E402
from testkit.gateway import free_port  # noqa: E402

PY = sys.executable


@contextmanager
def gateway(backend: str, out: Path):
    rest, grpc_port = free_port(), free_port()
    env = {"CLASSIFIER_REST_PORT": str(rest), "CLASSIFIER_GRPC_PORT": str(grpc_port), "CLASSIFIER_HOST": "127.0.0.1",
           "CLASSIFIER_DRAIN_SETTLE_S": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if backend == "embedded":
        with process([PY, "-m", "serving"], env, out / f"{backend}_gateway.log"):
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{rest}/readyz").status_code == 200, 180, "the gateway")
            yield f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}"
        return
    standin_port = free_port()
    with process([PY, "bench/standin_server.py", str(standin_port)], {"TF_CPP_MIN_LOG_LEVEL": "2"},
                 out / f"{backend}_standin.log"):
        env |= {"CLASSIFIER_BACKEND": "tfserving", "CLASSIFIER_TFSERVING_ADDRESS": f"127.0.0.1:{standin_port}"}
        with process([PY, "-m", "serving"], env, out / f"{backend}_gateway.log"):
            wait_for(lambda: httpx.get(f"http://127.0.0.1:{rest}/readyz").status_code == 200, 240, "the gateway")
            yield f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["embedded", "tfserving"], choices=["embedded", "tfserving"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "capacity")
    ap.add_argument("locust_args", nargs="*", help="extra Locust options after --, e.g. -- --ramp-step-users 8")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    locust = str(Path(PY).parent / "locust")
    for backend in a.backends:
        with gateway(backend, a.out) as (rest, grpc_target):
            print(f"== {backend} backend: gateway {rest} / {grpc_target}", flush=True)
            cmd = [locust, "-f", "loadtests/locustfile.py", "--headless", "--host", rest, "--grpc-host", grpc_target,
                   "--only-summary", "--shape", "ramp", "--csv", str(a.out / backend), "--csv-full-history",
                   "--html", str(a.out / f"{backend}.html"), *a.locust_args]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            (a.out / f"{backend}_locust.log").write_text(r.stderr)
            print(r.stdout, flush=True)  # the step table and the knee (loadtests/shapes.py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
