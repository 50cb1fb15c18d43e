"""The README's plots (docs/plots/), drawn from real runs with matplotlib.

    python bench/plots.py capacity [--results bench/results/capacity] [--out docs/plots/capacity.png]
    python bench/plots.py accuracy [--models models] [--limit N] [--json bench/results/accuracy_by_length.json]
                                   [--out docs/plots/accuracy_by_length.png] [--from-json]

capacity: the step ramp's ``<backend>_steps.csv`` (bench/capacity.py, i.e. make bench-capacity):
per backend, the p50 and p99 latency of all requests against the throughput of each step
(the ``Aggregated`` row: every request name summed), and throughput against users; the knee
(loadtests/shapes.py's rule: highest req/s without failures and with p99 <= 500 ms) is marked.

accuracy: every sentiment version under --models, through its SavedModel's serving signature
(contract.signature.signature_predict), on the full IMDB test split, with the model cards' code
(training.metrics): reviews bucketed by their kept-token count (``by_length`` over BUCKETS); per
bucket, the accuracy of the default path (last 20 tokens, ``prep.encode``) and of whole-text mode
(every window at the version's ``whole_text_stride``, combined by mean log-probability). Like
the cards' figures, windows are not capped (the gateway keeps the last ``max_windows_per_text``
= 32, i.e. ~640 tokens).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = ROOT / "docs" / "plots"
RESULTS = ROOT / "bench" / "results"
BACKENDS = ("embedded", "tfserving")
KNEE_P99_MS = 500.0  # loadtests/locustfile.py's --knee-p99-ms default
# Kept-token buckets (inclusive); on the test split: 288 / 3022 / 11364 / 6975 / 2842 / 509 reviews.
BUCKETS = ((0, 20), (21, 50), (51, 100), (101, 200), (201, 400), (401, None))
DPI = 100


# -- capacity -------------------------------------------------------------------------------
def read_steps(path: Path) -> list[dict]:
    """One dict per step from a ``*_steps.csv``: users, req/s, texts/s, failures, p50/p99 ms of
    all requests (the Aggregated row; summed over the request names if it is missing)."""
    per_step: dict[int, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            per_step.setdefault(int(row["step"]), []).append(row)
    steps = []
    for step, rows in sorted(per_step.items()):
        agg = next((r for r in rows if r["name"] == "Aggregated"), None)
        names = [r for r in rows if r["name"] != "Aggregated"]
        steps.append({
            "step": step, "users": int(rows[0]["users"]),
            "rps": float(agg["req/s"]) if agg else sum(float(r["req/s"]) for r in names),
            "texts_per_s": float(agg["texts/s"]) if agg and agg["texts/s"] else None,
            "failures": int(agg["failures"]) if agg else sum(int(r["failures"]) for r in names),
            "p50": float(agg["p50 ms"]) if agg else max(float(r["p50 ms"]) for r in names),
            "p99": float(agg["p99 ms"]) if agg else max(float(r["p99 ms"]) for r in names),
        })
    return steps


def knee(steps: list[dict], p99_ms: float = KNEE_P99_MS) -> dict | None:
    ok = [s for s in steps if not s["failures"] and s["p99"] <= p99_ms]
    return max(ok, key=lambda s: s["rps"]) if ok else None


def plot_capacity(results: Path, out: Path, backends=BACKENDS) -> dict:
    runs = {b: read_steps(results / f"{b}_steps.csv") for b in backends if (results / f"{b}_steps.csv").exists()}
    if not runs:
        raise SystemExit(f"no *_steps.csv under {results}: run bench/capacity.py first")
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    summary = {}
    for (backend, steps), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        k = knee(steps)
        rps = [s["rps"] for s in steps]
        lat.plot(rps, [s["p50"] for s in steps], "o-", color=color, ms=4, label=f"{backend} p50")
        lat.plot(rps, [s["p99"] for s in steps], "s--", color=color, ms=4, label=f"{backend} p99")
        thr.plot([s["users"] for s in steps], rps, "o-", color=color, ms=4,
                 label=f"{backend}, knee {k['rps']:.0f} req/s at {k['users']} users" if k else f"{backend}, no knee")
        failed = [s for s in steps if s["failures"]]
        thr.scatter([s["users"] for s in failed], [s["rps"] for s in failed], marker="x", color="red", zorder=3,
                    label="steps with failures" if color == "tab:blue" else None)
        if k:  # open circles: the knee step
            lat.scatter([k["rps"]] * 2, [k["p50"], k["p99"]], s=90, facecolors="none", edgecolors=color, zorder=3)
            thr.scatter([k["users"]], [k["rps"]], s=90, facecolors="none", edgecolors=color, zorder=3)
        summary[backend] = {"knee": k, "steps": steps}
    lat.axhline(KNEE_P99_MS, color="grey", lw=0.8, ls=":", label="knee bound: p99 500 ms")
    lat.set(xlabel="throughput, req/s (all request types)", ylabel="latency, ms", title="Latency against throughput (circles: knee)")
    lat.legend(fontsize=8)
    thr.set(xlabel="Locust users", ylabel="req/s", title="Throughput against users (circle: knee)")
    thr.legend(fontsize=8)
    for ax in (lat, thr):
        ax.grid(alpha=0.3)
    fig.suptitle("Step ramp (bench/capacity.py): gateway, embedded vs TF Serving backend", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return summary


# -- accuracy by length ---------------------------------------------------------------------
def sentiment_versions(models: Path) -> list[Path]:
    from contract.layout import existing_versions
    from training.models import SPECS

    return [models / name / str(v) for name, spec in sorted(SPECS.items()) if spec.kind == "text"
            for v in existing_versions(models / name)]


def accuracy_by_length(path: Path, texts, y: np.ndarray, batch: int = 2048) -> dict:
    """One version's accuracy per kept-token bucket, default (last 20) and whole-text, with the
    model cards' own code (training.metrics.whole_text_windows, contract.whole_text.combine_mean_log_prob, by_length)."""
    from contract.repository import read_version
    from contract.signature import signature_predict
    from contract.whole_text import combine_mean_log_prob
    from training.metrics import by_length, whole_text_windows
    from contract.text import tokenize

    mv = read_version(path.parent.parent, path.parent.name, int(path.name))
    prep, stride = mv.preprocessor, mv.whole_text_stride
    predict = signature_predict(path, mv.input_name, batch)
    t0 = time.perf_counter()
    y = np.asarray(y)
    lengths = np.array([len(tokenize(t, prep.stopwords)) for t in texts])
    last20 = predict(prep.encode_batch(texts)).argmax(1)
    rows, owners = whole_text_windows(prep, texts, stride)
    whole = combine_mean_log_prob(predict(rows), owners, len(texts)).argmax(1)
    by20, by_whole = by_length(last20, y, lengths, BUCKETS), by_length(whole, y, lengths, BUCKETS)
    buckets = {b: {"n": r["n"], "last20": r["accuracy"], "whole_text": by_whole[b]["accuracy"]} for b, r in by20.items()}
    return {
        "model": mv.name, "version": mv.version, "whole_text_stride": stride,
        "examples": len(y), "windows": len(rows),
        "last20": round(float(np.mean(last20 == y)), 4), "whole_text": round(float(np.mean(whole == y)), 4),
        "buckets": buckets, "seconds": round(time.perf_counter() - t0, 1),
    }


def plot_accuracy(results: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = list(results[0]["buckets"])
    counts = [results[0]["buckets"][b]["n"] for b in labels]
    ticks = [f"{b}\n(n={n:,})" for b, n in zip(labels, counts)]
    strides = "/".join(str(s) for s in sorted({r["whole_text_stride"] for r in results}))
    for ax, mode, title in ((axes[0], "last20", "Default: last 20 kept tokens"),
                            (axes[1], "whole_text", f"Whole text: windows stride {strides}, mean log-probability")):
        for r in results:
            acc = [r["buckets"][b][mode] for b in labels]
            ax.plot(range(len(labels)), acc, "o-", ms=4, label=f"{r['model']} v{r['version']} ({r[mode]:.3f})")
        ax.set_xticks(range(len(labels)), ticks, fontsize=7)
        ax.set(title=title, xlabel="kept tokens in the review")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="version (overall)", title_fontsize=7)
    axes[0].set_ylabel("accuracy")
    n = results[0]["examples"]
    fig.suptitle(f"Sentiment accuracy by review length, IMDB test split ({n:,} reviews), serving signature",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def print_accuracy(results: list[dict]) -> None:
    labels = list(results[0]["buckets"])
    print("reviews per bucket: " + ", ".join(f"{b}: {results[0]['buckets'][b]['n']}" for b in labels))
    print(f"{'version':<20} {'mode':<10} " + " ".join(f"{b:>8}" for b in labels) + f" {'all':>8}")
    for r in results:
        for mode in ("last20", "whole_text"):
            cells = " ".join(f"{r['buckets'][b][mode] if r['buckets'][b][mode] is not None else '-':>8}" for b in labels)
            print(f"{r['model'] + ' v' + str(r['version']):<20} {mode:<10} {cells} {r[mode]:>8}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("capacity", help="latency/throughput of the step ramp, per backend")
    c.add_argument("--results", type=Path, default=RESULTS / "capacity")
    c.add_argument("--out", type=Path, default=PLOTS / "capacity.png")
    a = sub.add_parser("accuracy", help="accuracy by kept-token count, every sentiment version")
    a.add_argument("--models", type=Path, default=ROOT / "models")
    a.add_argument("--data-dir")
    a.add_argument("--limit", type=int, help="only the first N test reviews")
    a.add_argument("--json", type=Path, default=RESULTS / "accuracy_by_length.json")
    a.add_argument("--out", type=Path, default=PLOTS / "accuracy_by_length.png")
    a.add_argument("--from-json", action="store_true", help="plot --json as it is (no evaluation)")
    args = ap.parse_args(argv)

    if args.what == "capacity":
        for backend, s in plot_capacity(args.results, args.out).items():
            k = s["knee"]
            print(f"{backend}: " + (f"knee at step {k['step']}, {k['users']} users, {k['rps']:.1f} req/s, "
                                    f"p50 {k['p50']:.0f} ms, p99 {k['p99']:.0f} ms" if k else "no knee"))
        print(f"wrote {args.out}")
        return 0

    if args.from_json:
        results = json.loads(args.json.read_text())["versions"]
    else:
        from training import data as datasets

        test = datasets.load_imdb(args.data_dir).test
        texts, y = (test.x[: args.limit], test.y[: args.limit]) if args.limit else (test.x, test.y)
        results = []
        for path in sentiment_versions(args.models):
            results.append(accuracy_by_length(path, texts, y))
            print(f"{path}: {results[-1]['seconds']} s, {results[-1]['windows']} windows", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"buckets_kept_tokens": [list(b) for b in BUCKETS], "versions": results},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")
    print_accuracy(results)
    plot_accuracy(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
