"""What the explain option costs the gateway: single-text REST requests over the instant
backend (bench/gateway.py's case (e): the real gateway, the model's compute taken away),
64 wrk connections, with ``"explain": false`` (the default) and ``"explain": true``,
alternating rounds; the gateway's CPU per request from /proc.

    python bench/explain_cost.py [--seconds 8] [--rounds 3] [--base-root PATH]

``--base-root``: also run the gateway of another tree (e.g. ``git worktree add /tmp/base
<commit before explain>``) without explain, in the same rounds: what "off" costs compared
with a gateway that has no explain option at all. Needs wrk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import instant, load_texts  # noqa: E402


def bodies(texts: list[str], explain: bool | None) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for t in texts:
        body = {"texts": [t], "model": "sentiment_lstm"}
        if explain is not None:
            body["explain"] = explain
        f.write(json.dumps(body) + "\n")
    f.close()
    return f.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-root", type=Path, help="another tree's gateway, run with the plain bodies")
    a = ap.parse_args(argv)
    texts = load_texts(4096)
    cases = {"explain off": (bodies(texts, None), ROOT), "explain on": (bodies(texts, True), ROOT)}
    if a.base_root:
        cases = {"base (no explain option)": (cases["explain off"][0], a.base_root.resolve()), **cases}
    seen: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(a.rounds):
        for name, (file, root) in cases.items():
            res = instant(file, a.seconds, root=root)
            seen[name].append(res)
            print(f"round {r + 1} {name:26s} {res['texts_per_s']:8.0f} req/s  {res['gateway_cpu_us_per_request']:6.1f} us CPU/request",
                  flush=True)
    print(f"\n{'case':26s} {'req/s (median)':>15s} {'CPU us/request (median, min-max)':>34s}")
    for name, runs in seen.items():
        cpu = [x["gateway_cpu_us_per_request"] for x in runs]
        print(f"{name:26s} {statistics.median(x['texts_per_s'] for x in runs):15.0f} "
              f"{statistics.median(cpu):16.1f} ({min(cpu):.1f}-{max(cpu):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
