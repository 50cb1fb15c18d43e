"""Copy model versions from object storage (or any fsspec URL) into a local model repository.

``SOURCE`` is ``s3://bucket/prefix`` (s3fs), ``gs://bucket/prefix`` (gcsfs) or a local path, laid
out as TF Serving's repository (:mod:`contract.layout`): ``SOURCE/<model>/<version>/``. Which
versions is the caller's choice (the gateway's ``python -m serving pull`` takes them from
models.config). fsspec and its backends are the optional ``storage`` extra, imported only here.

Nothing is copied until every chosen version is known to be there and complete (its listing has
``saved_model.pb``, ``variables/variables.index``, a ``variables.data-*`` shard and the model card);
otherwise :class:`PullError` names everything missing. Each version is copied into a hidden folder
beside its destination (``DEST/<model>/.tmp-pull-<version>-*``: TF Serving and the gateway list
numeric folders only), checked (every listed file with its listed size; the card parses; a text
model's preprocessing.json and vocabulary load and match their sha256) and renamed into place, so a
half-copied version is never visible. A version already in DEST with the source's files and sizes
is kept; one that differs is an error (versions are immutable: publish a new one). One pull per
DEST at a time (a lock file); temporary folders of a pull that was killed are removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contract.layout import ASSETS_EXTRA, CARD_FILE
from contract.text import TextPreprocessor

TMP_PREFIX = ".tmp-pull-"
LOCK_FILE = ".pull.lock"
_VERSION = re.compile(r"[0-9]+")
INSTALL_HINT = "pip install 'classifier-service[storage]' (fsspec, s3fs, gcsfs)"

# versions on the source (ascending) -> the versions to pull
Chooser = Callable[[list[int]], Iterable[int]]


class PullError(Exception):
    """Why nothing (more) was copied; the message names what is missing."""


@dataclass
class PullResult:
    copied: list[str] = field(default_factory=list)  # "model/version"
    kept: list[str] = field(default_factory=list)
    bytes_copied: int = 0


def missing_files(files: Iterable[str]) -> list[str]:
    """What a version's files (paths relative to the version folder) lack to be served: TF Serving
    needs the SavedModel (``saved_model.pb`` and its ``variables/``), the gateway the model card."""
    files = set(files)
    missing = [] if "saved_model.pb" in files else ["saved_model.pb"]
    if not any(f.startswith("variables/") for f in files):
        missing.append("variables/ (variables.index, variables.data-*)")
    else:
        if "variables/variables.index" not in files:
            missing.append("variables/variables.index")
        if not any(f.startswith("variables/variables.data-") for f in files):
            missing.append("variables/variables.data-*")
    if f"{ASSETS_EXTRA}/{CARD_FILE}" not in files:
        missing.append(f"{ASSETS_EXTRA}/{CARD_FILE}")
    return missing


def content_problem(path: Path) -> str | None:
    """Why a copied version folder cannot be read by the gateway (None: it can): the card must be a
    JSON object with a signature; a text model's preprocessing.json and the vocabulary it names must
    load and match the vocabulary's sha256."""
    extra = path / ASSETS_EXTRA
    try:
        card = json.loads((extra / CARD_FILE).read_text(encoding="utf-8"))
        if not isinstance(card, dict) or not isinstance(card.get("signature"), dict):
            return f"{ASSETS_EXTRA}/{CARD_FILE} has no signature"
        if (extra / "preprocessing.json").exists() or card.get("vocab_sha256"):
            TextPreprocessor.load(extra)
    except FileNotFoundError as e:
        return f"missing {Path(e.filename).relative_to(path) if e.filename else e}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def open_source(url: str):
    """(filesystem, root path) for an fsspec URL or a local path."""
    try:
        import fsspec
    except ImportError:
        raise PullError(f"reading {url} needs fsspec: {INSTALL_HINT}") from None
    try:
        # A fresh instance: no listing cached from an earlier pull in this process.
        fs, root = fsspec.url_to_fs(url, skip_instance_cache=True)
    except ImportError as e:  # e.g. s3fs or gcsfs missing for s3:// or gs://
        raise PullError(f"{url}: {e} ({INSTALL_HINT})") from None
    except ValueError as e:
        raise PullError(f"{url}: {e}") from None
    return fs, root.rstrip("/") or root


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _check_root(fs, root: str, url: str) -> None:
    if fs.isdir(root):
        return
    if not _is_local(fs):
        bucket = root.split("/", 1)[0]
        if not fs.exists(bucket):
            raise PullError(f"{url}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
    if fs.exists(root):
        raise PullError(f"{url}: not a folder (prefix) but a file")
    raise PullError(f"{url}: no such prefix (nothing stored under it)")


def _versions(fs, model_root: str) -> list[int]:
    try:
        entries = fs.ls(model_root, detail=True)
    except FileNotFoundError:
        return []
    return sorted(int(posixpath.basename(e["name"].rstrip("/"))) for e in entries
                  if e.get("type") == "directory" and _VERSION.fullmatch(posixpath.basename(e["name"].rstrip("/"))))


def _listing(fs, version_root: str) -> dict[str, int]:
    """Relative path -> size of every file under a version (folder marker objects left out)."""
    out = {}
    for name, info in fs.find(version_root, detail=True).items():
        if info.get("type") == "directory" or name.endswith("/"):
            continue
        rel = name[len(version_root):].lstrip("/")
        if not name.startswith(version_root + "/") or not rel or any(p in ("", ".", "..") for p in rel.split("/")):
            raise PullError(f"{name}: not a plain path under {version_root}")
        out[rel] = int(info.get("size") or 0)
    return out


def _local_listing(path: Path) -> dict[str, int]:
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _differences(want: dict[str, int], have: dict[str, int]) -> list[str]:
    out = [f"{f} missing" for f in sorted(set(want) - set(have))]
    out += [f"{f} is {have[f]} bytes, not {want[f]}" for f in sorted(set(want) & set(have)) if have[f] != want[f]]
    out += [f"{f} is not in the source" for f in sorted(set(have) - set(want))]
    return out


def _remove_leftovers(dest: Path) -> None:
    for tmp in dest.glob(f"*/{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def pull(source: str, dest: str | os.PathLike, choose: Mapping[str, Chooser],
         report: Callable[[str], None] = lambda line: None) -> PullResult:
    """Copy the versions ``choose[model](versions on the source)`` names of each model from
    ``source`` into ``dest``; raise :class:`PullError` naming every problem found before copying
    anything (missing bucket, prefix, model, version or file), or the one that stopped a copy (then
    that version's temporary folder is removed; versions renamed into place before it stay)."""
    fs, root = open_source(source)
    try:
        _check_root(fs, root, source)
    except PullError:
        raise
    except Exception as e:  # the backend's: no or wrong credentials, connection errors, ...
        raise PullError(f"{source}: {type(e).__name__}: {e}") from None
    dest = Path(dest)
    errors: list[str] = []
    plan: list[tuple[str, int, str, dict[str, int]]] = []  # model, version, remote folder, files
    result = PullResult()
    try:
        for model in sorted(choose):
            model_root = f"{root}/{model}"
            there = _versions(fs, model_root)
            wanted = sorted(set(choose[model](there)))
            if not there:
                errors.append(f"model {model!r}: no versions under {source.rstrip('/')}/{model}/")
                continue
            absent = [v for v in wanted if v not in there]
            if absent:
                errors.append(f"model {model!r}: version(s) {absent} not under {source.rstrip('/')}/{model}/ "
                              f"(there: {there})")
            for v in (v for v in wanted if v in there):
                files = _listing(fs, f"{model_root}/{v}")
                lacking = missing_files(files)
                if lacking:
                    errors.append(f"{model}/{v}: incomplete upload, missing {', '.join(lacking)}")
                    continue
                local = dest / model / str(v)
                if local.exists():
                    diff = _differences(files, _local_listing(local))
                    if diff:
                        errors.append(f"{local} exists and differs from {source.rstrip('/')}/{model}/{v}/ "
                                      f"({'; '.join(diff[:5])}): versions are immutable; remove it or publish a "
                                      f"new version")
                    else:
                        result.kept.append(f"{model}/{v}")
                        report(f"kept {model}/{v} (already complete in {dest})")
                    continue
                plan.append((model, v, f"{model_root}/{v}", files))
    except PullError:
        raise
    except Exception as e:  # the backend's (see above)
        raise PullError(f"{source}: listing failed: {type(e).__name__}: {e}") from None
    if errors:
        raise PullError("; ".join(errors))
    if not plan:
        return result
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one pull per destination: the leftovers are nobody's
        _remove_leftovers(dest)
        for model, v, remote, files in plan:
            final = dest / model / str(v)
            if final.exists():  # another pull put it there while this one waited for the lock
                if _differences(files, _local_listing(final)):
                    raise PullError(f"{final} appeared during the pull and differs from the source")
                result.kept.append(f"{model}/{v}")
                continue
            result.bytes_copied += _copy_version(fs, remote, files, final, f"{source.rstrip('/')}/{model}/{v}/")
            result.copied.append(f"{model}/{v}")
            report(f"copied {model}/{v} ({len(files)} files, {sum(files.values())} bytes)")
    return result


def _copy_version(fs, remote: str, files: dict[str, int], final: Path, url: str) -> int:
    """Copy one version into a temporary folder beside ``final``, check it, rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        names = sorted(files)
        for rel in names:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get([f"{remote}/{rel}" for rel in names], [str(tmp / rel) for rel in names])
        except Exception as e:  # the backend's (see pull)
            raise PullError(f"{url}: copy failed: {type(e).__name__}: {e}") from None
        diff = _differences(files, _local_listing(tmp))
        if diff:
            raise PullError(f"{url}: copy incomplete: {'; '.join(diff[:5])}")
        problem = content_problem(tmp)
        if problem:
            raise PullError(f"{url}: {problem}")
        os.rename(tmp, final)  # atomic on one filesystem; fails if final appeared meanwhile
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sum(files.values())
