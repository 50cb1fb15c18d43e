"""A real Prometheus server for tests: scrapes the given targets every second on loopback.

    with PrometheusServer(["127.0.0.1:8000"]) as prom:   # or prometheus_server(...), which skips
        prom.wait_for_scrape()                           # (pytest) when the binary is missing
        prom.query('sum(classifier_requests_total)')     # -> the API's data.result

The server runs the ``prometheus`` binary (Debian's ``prometheus`` package, which also ships
``promtool``; or a release tarball's) with a generated configuration, a temporary storage
directory and a free loopback port, and is stopped (SIGTERM, then SIGKILL) and cleaned up on
exit. Its log goes to ``.pytest_cache/prometheus-<port>.log`` when .pytest_cache exists
(``server.log_path``), else nowhere. HTTP API calls use the standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from testkit.gateway import free_port

ROOT = Path(__file__).resolve().parent.parent
BINARY = os.environ.get("PROMETHEUS_BINARY") or shutil.which("prometheus")
MISSING = ("prometheus is not on PATH (Debian: apt-get install prometheus, what `make test-tools` does; "
           "or a release tarball's binary, named by $PROMETHEUS_BINARY)")


def available() -> bool:
    return BINARY is not None and os.access(BINARY, os.X_OK)


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """One Prometheus process scraping ``targets`` ("host:port", path ``metrics_path``) as job ``job``
    every ``scrape_interval``; ``rule_files`` are loaded too (evaluated every ``scrape_interval``).
    ``url`` is its base URL once started. The targets can change while it runs (:meth:`set_targets`):
    start it first, then the slower gateways, then name them (their scrapes begin sooner so)."""

    popen_options: dict = {}  # more arguments for subprocess.Popen (stage/cluster.py: die with the parent)

    def __init__(self, targets: list[str] = (), job: str = "gateway", scrape_interval: str = "1s",
                 metrics_path: str = "/metrics", rule_files: list[Path] = (), binary: str | None = None,
                 startup_timeout_s: float = 30):
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary or BINARY
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.log_path: Path | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    # -- life cycle ----------------------------------------------------------------------
    def config(self) -> dict:
        """The generated configuration (JSON is YAML: no YAML library needed)."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{"job_name": self.job, "metrics_path": self.metrics_path,
                                "file_sd_configs": [{"files": [str(self._targets_file())], "refresh_interval": "1s"}]}],
        }

    def _targets_file(self) -> Path:
        return Path(self._dir.name) / "targets.json"

    def set_targets(self, targets: list[str]) -> None:
        """Scrape ``targets`` from now on (file-based discovery: Prometheus applies a change within
        about 5 s, its discovery manager's update interval; wait_for_scrape() waits for it)."""
        self.targets = list(targets)
        tmp = self._targets_file().with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": self.targets}]))
        tmp.replace(self._targets_file())

    def start(self) -> PrometheusServer:
        if not self.binary:
            raise PrometheusError(MISSING)
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        work = Path(self._dir.name)
        self.set_targets(self.targets)
        (work / "prometheus.yml").write_text(json.dumps(self.config(), indent=2))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cache = ROOT / ".pytest_cache"
        self.log_path = cache / f"prometheus-{port}.log" if cache.is_dir() else None
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                 "--web.enable-lifecycle", "--log.level=warn"],
                cwd=work, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **self.popen_options)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child has its own copy
        try:
            self._wait(self._ready, self.startup_timeout_s, "Prometheus did not become ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.process.returncode}; log: {self.log_path}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP API ------------------------------------------------------------------------
    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>; its ``data`` (raises PrometheusError with the API's message on an error)."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float | str | None = None) -> list[dict]:
        """An instant query: the result's list of {"metric": {...}, "value": [t, "v"]} (vectors)."""
        return self.api("query", query=expr, time=time)["result"]

    def query_range(self, expr: str, start: float | str, end: float | str, step: float | str = 1) -> list[dict]:
        """A range query: the result's list of {"metric": {...}, "values": [[t, "v"], ...]}."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def value(self, expr: str, time: float | str | None = None) -> float | None:
        """The value of a query that yields at most one sample (None when it yields none)."""
        result = self.api("query", query=expr, time=time)
        if result["resultType"] == "scalar":
            return float(result["result"][1])
        samples = result["result"]
        if len(samples) > 1:
            raise PrometheusError(f"{expr!r} yields {len(samples)} samples, not one")
        return float(samples[0]["value"][1]) if samples else None

    def targets_health(self) -> list[dict]:
        """The active targets: their scrapeUrl, health ("up", "down", "unknown"), lastScrape, lastError."""
        return self.api("targets", state="active")["activeTargets"]

    def wait_for_scrape(self, after: float | None = None, timeout: float = 30) -> None:
        """Until every target has been scraped successfully by a scrape that began after ``after``
        (a Unix time; default: now), so everything the targets counted before is in the TSDB."""
        after = time.time() if after is None else after

        def scraped() -> bool:
            targets = self.targets_health()
            return sorted(t["labels"]["instance"] for t in targets) == sorted(self.targets) and all(
                t["health"] == "up" and _unix(t["lastScrape"]) > after for t in targets)

        self._wait(scraped, timeout, f"not every target was scraped after {after}: {self.targets_health()}")

    def _wait(self, predicate, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{message} within {timeout}s (log: {self.log_path})")


def _unix(rfc3339: str) -> float:
    """Prometheus' timestamps (RFC 3339 with nanoseconds) as Unix seconds; 0 for "never"."""
    return max(datetime.fromisoformat(rfc3339).timestamp(), 0.0)


@contextmanager
def prometheus_server(targets: list[str] = (), **kwargs):
    """``PrometheusServer(targets, **kwargs)``, started and stopped; in a test, skipped (with the
    reason) when the prometheus binary is missing, as the promtool tests are."""
    if not (kwargs.get("binary") or available()):
        import pytest

        pytest.skip(MISSING)
    with PrometheusServer(targets, **kwargs) as server:
        yield server
