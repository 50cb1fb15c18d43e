"""``python -m serving pull SOURCE DEST --models-config FILE``: the versions models.config names,
from object storage into a local model repository (:mod:`contract.pull` does the copying).

SOURCE is ``s3://bucket/prefix``, ``gs://bucket/prefix`` or a local path holding
``<model>/<version>/``; each model of models.config is pulled from ``SOURCE/<name>/``: a
``specific`` policy's versions (each must be there), else the ``latest`` n or ``all`` of those
the source has. Exit 0 when every version is in DEST (copied or already complete), 1 with the
problems on stderr (nothing half-copied left), 2 on bad arguments.

``--watch SECONDS`` keeps going (a sidecar beside TF Serving or the gateway in Kubernetes): every
SECONDS it re-reads models.config and pulls the versions that are new, so a rollout that adds a
version to the ConfigMap finds it on the pod's disk. A failed round is logged and retried;
versions dropped from models.config stay on disk (a server may still be reading them).
Credentials: the backends' usual ones (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a web identity
for s3fs, AWS_ENDPOINT_URL_S3 for MinIO and other S3-compatible stores; GOOGLE_APPLICATION_CREDENTIALS
or workload identity for gcsfs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from contract.pull import PullError, pull
from serving.model_config import ConfigError, ModelPolicy, parse, problems


def chooser(policy: ModelPolicy):
    """versions on the source -> versions to pull: a ``specific`` policy's own (missing ones are an error)."""
    if policy.specific:
        return lambda there: policy.specific
    return policy.choose


def pull_once(source: str, dest: Path, models_config: Path, quiet: bool = False) -> str | None:
    """One pull; the summary line (None when ``quiet`` and nothing was copied: a watch round that
    found everything in place says nothing). Raises PullError/ConfigError/OSError."""
    models = parse(models_config.read_text(encoding="utf-8"))
    if not models:
        raise ConfigError(f"{models_config} names no model")
    found = problems(models)
    if found:
        raise ConfigError("; ".join(found))
    r = pull(source, dest, {name: chooser(p) for name, p in models.items()},
             report=lambda line: None if quiet and line.startswith("kept ") else print(f"pull: {line}", flush=True))
    if quiet and not r.copied:
        return None
    return (f"{len(r.copied)} version(s) copied ({r.bytes_copied / 1e6:.1f} MB), {len(r.kept)} kept, "
            f"from {source} into {dest}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving pull",
                                description="Copy the versions models.config names from object storage (s3://, "
                                            "gs://) or a folder into a local model repository, atomically per version.")
    p.add_argument("source", help="s3://bucket/prefix, gs://bucket/prefix or a local path with <model>/<version>/")
    p.add_argument("dest", type=Path, help="the local model repository (e.g. /models)")
    p.add_argument("--models-config", type=Path, required=True,
                   help="TF Serving's models.config: which models and versions to pull")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="keep running: re-read models.config and pull new versions every SECONDS")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.watch is not None and not a.watch > 0:
        p.error("--watch must be a positive number of seconds")
    rounds = 0
    while True:
        try:
            # Watching: after the first round, only what changes (copies, errors) is printed.
            summary = pull_once(a.source, a.dest, a.models_config, quiet=rounds > 0)
            if summary:
                print(f"pull: {summary}", flush=True)
        except (PullError, ConfigError, OSError) as e:
            print(f"pull: error: {e}", file=sys.stderr, flush=True)
            if a.watch is None:
                return 1
        rounds += 1
        if a.watch is None:
            return 0
        time.sleep(a.watch)
