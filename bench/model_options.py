"""Benchmark: TensorFlow runtime options for the exported signatures, at batch 1, 8, 64 and 256.

    python bench/model_options.py [--models sentiment_lstm,digits] [--seconds 2] [--json bench/results/model_options.json]

Each option runs in its own process (TensorFlow reads most of them once, at start) and
calls the served version's ``serving_default`` signature exactly as the embedded backend
does, on real inputs (IMDB test reviews through the version's tokenizer; MNIST test
images). Options:

- ``default``: as the gateway runs today (oneDNN on, TensorFlow's own thread pools);
- ``onednn_off``: ``TF_ENABLE_ONEDNN_OPTS=0``;
- ``intra2_inter1`` / ``intra1_inter1``: ``tf.config.threading`` pools (the gateway's
  ``tf_intra_op_threads`` / ``tf_inter_op_threads``);
- ``xla_jit``: the signature wrapped in ``tf.function(jit_compile=True)`` (XLA on CPU),
  compiled once per batch size; the SavedModel itself is unchanged, so TF Serving loads it
  as before;
- ``xla_auto``: ``TF_XLA_FLAGS=--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit`` (XLA auto-clustering).

For every option and batch size it prints the median and p99 latency of one call and
rows/s, and checks that the outputs equal the default's (max |difference| of the
probabilities, and whether any predicted class differs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = (1, 8, 64, 256)
OPTIONS = {
    "default": {},
    "onednn_off": {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}},
    "intra2_inter1": {"threads": (2, 1)},
    "intra1_inter1": {"threads": (1, 1)},
    "xla_jit": {"jit": True},
    "xla_auto": {"env": {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}},
}


def inputs(model: str, n: int = 256):
    """n real inputs for the served (stable) version of ``model``, and that version's path."""
    import numpy as np

    from contract.repository import read_version
    from testkit.gateway import stable_version

    v = read_version(ROOT / "models", model, stable_version(model))
    if v.kind == "text":
        from training.data import load_imdb

        x = v.preprocessor.encode_batch(load_imdb().test.x[:n])
    else:
        from training.data import load_mnist

        x = np.asarray(load_mnist().test.x[:n], dtype=np.float32)
    return v, x


def worker(option: str, model: str, seconds: float) -> dict:
    """Runs in the option's own process; prints one JSON line."""
    import numpy as np
    import tensorflow as tf

    opt = OPTIONS[option]
    if "threads" in opt:
        tf.config.threading.set_intra_op_parallelism_threads(opt["threads"][0])
        tf.config.threading.set_inter_op_parallelism_threads(opt["threads"][1])
    v, x = inputs(model)
    loaded = tf.saved_model.load(str(v.path))  # kept: the signature refers to its variables
    sig = loaded.signatures["serving_default"]
    name = v.input_name

    def call(batch):
        return sig(**{name: batch})["probabilities"]

    fn = tf.function(call, jit_compile=True) if opt.get("jit") else call
    out = {"option": option, "model": model, "version": v.version, "batches": {}}
    outputs = []
    for b in BATCHES:
        batch = tf.constant(x[:b])
        t_first = time.perf_counter()
        fn(batch).numpy()  # the first call traces/compiles
        first = time.perf_counter() - t_first
        for _ in range(3):
            fn(batch).numpy()
        lat, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(lat) < 5:
            t = time.perf_counter()
            fn(batch).numpy()
            lat.append(time.perf_counter() - t)
        med = statistics.median(lat)
        out["batches"][str(b)] = {
            "p50_ms": med * 1e3,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3,
            "rows_per_s": b / med,
            "first_call_ms": first * 1e3,
        }
        outputs.append(np.asarray(fn(batch).numpy(), dtype=np.float64).tolist())
    out["outputs"] = outputs
    return out


def run_option(option: str, model: str, seconds: float) -> dict:
    env = {**os.environ, **OPTIONS[option].get("env", {}), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, __file__, "--worker", option, "--models", model, "--seconds", str(seconds)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"option": option, "model": model, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="sentiment_lstm,digits")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "model_options.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.models, a.seconds)))
        return 0

    import numpy as np

    results = []
    for model in a.models.split(","):
        base = None
        print(f"\n{model}: median ms per call (rows/s) by batch size; outputs vs default")
        print(f"{'option':<15}" + "".join(f"{'b=' + str(b):>20}" for b in BATCHES) + f"{'max |dp|':>11}{'classes':>9}")
        for option in a.options.split(","):
            r = run_option(option, model, a.seconds)
            results.append(r)
            if "error" in r:
                print(f"{option:<15} failed: {r['error']}")
                continue
            outs = [np.asarray(o) for o in r.pop("outputs")]
            if base is None:
                base = outs
            diff = max(float(np.abs(o - b).max()) for o, b in zip(outs, base))
            same = all((o.argmax(1) == b.argmax(1)).all() for o, b in zip(outs, base))
            r["max_abs_diff_vs_default"], r["same_classes_as_default"] = diff, same
            cells = "".join(f"{r['batches'][str(b)]['p50_ms']:>9.2f} ({r['batches'][str(b)]['rows_per_s']:>7.0f})"
                            for b in BATCHES)
            print(f"{option:<15}{cells}{diff:>11.1e}{'same' if same else 'DIFFER':>9}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
