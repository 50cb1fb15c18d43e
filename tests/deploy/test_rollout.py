"""scripts/rollout.sh's edits of models.config and traffic.json, run for real (bash) on temporary copies.

Two kinds of tests. Most run the script with ``PYTHON`` set to a stand-in that answers
``-m serving check-config`` itself (accept, refuse, hang) and records how it was asked, so
they test the script alone and fast: files replaced by rename (never truncated and rewritten:
a concurrent reader never sees an empty or partial file), modes kept, nothing written on a
refusal, the JSON of the traffic commands, ``show``, ``analyze``, ``wait`` against a gateway.
The others run the gateway's real checker (``python -m serving check-config``): a full rollout
parsed with TF Serving's own ``ModelServerConfig``, and edits only the checker can refuse.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = ROOT / "scripts" / "rollout.sh"
SHIPPED = ROOT / "serving" / "tfserving"
# The gateway's checker, which rollout.sh runs before every write.
HAS_CHECK_CONFIG = "check-config" in (ROOT / "serving" / "__main__.py").read_text()
needs_check_config = pytest.mark.skipif(not HAS_CHECK_CONFIG,
                                        reason="awaits `python -m serving check-config` (serving/__main__.py)")
# What the caller's environment must not leak into the runs.
SCRUBBED = ("MODELS_CONFIG", "TRAFFIC_FILE", "PYTHON", "GATEWAY_URL", "MODEL_REPOSITORY", "CHECK_TIMEOUT",
            "POLL_SECONDS")


def only_version_1(text: str) -> str:
    """The shipped models.config (its comments and layout) with every model back at version 1 only."""
    text = re.sub(r"specific \{[^}]*\}", "specific { versions: 1 }", text)
    return re.sub(r'(version_labels \{ key: "\w+" value: )\d+', r"\g<1>1", text)


def model_names(config_text: str) -> list[str]:
    return re.findall(r'^\s*name:\s*"([^"]+)"', config_text, re.M)


def traffic_json(data: dict) -> str:
    """The layout rollout.sh writes (and traffic.json is shipped in): 2-space indent, a final newline."""
    return json.dumps(data, indent=2) + "\n"


def zero_traffic(config_text: str) -> dict:
    return {m: {"canary_percent": 0, "shadow_percent": 0} for m in model_names(config_text)}


@dataclass
class Folder:
    """A temporary serving/tfserving/: models.config and traffic.json, and how rollout.sh is run on them."""

    path: Path
    python: str = sys.executable

    @property
    def config(self) -> Path:
        return self.path / "models.config"

    @property
    def traffic(self) -> Path:
        return self.path / "traffic.json"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        return {**env, "MODELS_CONFIG": str(self.config), "TRAFFIC_FILE": str(self.traffic), "PYTHON": self.python,
                "POLL_SECONDS": "0.1", **extra}

    def run(self, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
        r = subprocess.run(["bash", str(ROLLOUT), *args], capture_output=True, text=True, timeout=120,
                           env=self.env(**extra))
        if check:
            assert r.returncode == 0, f"rollout.sh {shlex.join(args)}: rc={r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def snapshot(self) -> dict[str, tuple[bytes, int, int]]:
        """Each file's bytes, inode and mode; and nothing else in the folder (no temporary file left)."""
        assert sorted(p.name for p in self.path.iterdir()) == ["models.config", "traffic.json"]
        return {p.name: (p.read_bytes(), p.stat().st_ino, stat.S_IMODE(p.stat().st_mode))
                for p in (self.config, self.traffic)}

    def labels(self, model: str) -> str:
        """``show MODEL`` without the model's name."""
        return self.run("show", model).stdout.splitlines()[0].split(": ", 1)[1]


def make_folder(path: Path, config_text: str, python: str = sys.executable) -> Folder:
    path.mkdir()
    f = Folder(path, python)
    f.config.write_text(config_text)
    f.traffic.write_text(traffic_json(zero_traffic(config_text)))
    return f


@pytest.fixture
def shipped_config() -> str:
    return (SHIPPED / "models.config").read_text()


class FakeChecker:
    """``PYTHON`` for rollout.sh: ``-m serving check-config ...`` answered with ``verdict`` (an exit
    status, or "hang"), each call recorded with its working directory, PYTHONPATH and arguments, and
    the files it was given copied; anything else runs the real interpreter."""

    def __init__(self, path: Path):
        self.dir = path
        path.mkdir()
        self.script = path / "python"
        self.script.write_text(f"""#!/bin/sh
if [ "$1 $2 $3" != "-m serving check-config" ]; then exec {shlex.quote(sys.executable)} "$@"; fi
shift 3
d={shlex.quote(str(path))}
n=$(ls "$d" | grep -c '^call')
{{ printf '%s\\n' "$PWD" "${{PYTHONPATH:-}}"; printf '%s\\n' "$@"; }} >"$d/call.$n"
cp "$1" "$d/checked-config.$n"
while [ $# -gt 0 ]; do
    if [ "$1" = --traffic ]; then cp "$2" "$d/checked-traffic.$n"; fi
    shift
done
if [ "$(cat "$d/verdict")" = hang ]; then exec sleep 60; fi
cat "$d/message" >&2
exit "$(cat "$d/verdict")"
""")
        self.script.chmod(0o755)
        self.answer(0)

    def answer(self, verdict: int | str, message: str = "") -> None:
        (self.dir / "verdict").write_text(str(verdict))
        (self.dir / "message").write_text(message)

    def calls(self) -> list[dict]:
        out = []
        for n in range(len(list(self.dir.glob("call.*")))):
            cwd, pythonpath, *args = (self.dir / f"call.{n}").read_text().splitlines()
            traffic = self.dir / f"checked-traffic.{n}"
            out.append({"cwd": cwd, "pythonpath": pythonpath, "args": args,
                        "config": (self.dir / f"checked-config.{n}").read_text(),
                        "traffic": traffic.read_text() if traffic.exists() else None})
        return out


@pytest.fixture
def fake(tmp_path) -> FakeChecker:
    return FakeChecker(tmp_path / "fake")


@pytest.fixture
def folder(tmp_path, fake, shipped_config) -> Folder:
    """A copy of the shipped models.config (every model at version 1), traffic at 0/0, the stand-in checker."""
    return make_folder(tmp_path / "tfserving", only_version_1(shipped_config), str(fake.script))


# -- atomic replacement --------------------------------------------------------------------
def test_edits_rename_a_new_file_over_the_old_one(folder, fake):
    """The old inode is never written: a reader that opened it before the edit reads it whole, and
    the name points at a new inode. (`cat new >file`, which truncates and rewrites the same inode,
    fails both.)"""
    before = folder.snapshot()
    with open(folder.config, "rb") as old_config, open(folder.traffic, "rb") as old_traffic:
        folder.run("add-version", "digits", "3")
        folder.run("canary", "digits", "3")
        folder.run("traffic", "digits", "10")
        assert old_config.read() == before["models.config"][0], "models.config was rewritten in place"
        assert old_traffic.read() == before["traffic.json"][0], "traffic.json was rewritten in place"
    after = folder.snapshot()
    for name in after:
        assert after[name][0] != before[name][0], name
        assert after[name][1] != before[name][1], f"{name}: same inode, so written in place (not renamed)"
    assert folder.labels("digits") == "served versions 1 3; stable=1 canary=3; canary_percent=10 shadow_percent=0"
    # Each checked file was the one then renamed into place, written beside the target (same file system).
    calls = fake.calls()
    assert calls[1]["config"] == after["models.config"][0].decode()
    assert calls[2]["traffic"] == after["traffic.json"][0].decode()
    for c in calls[:2]:
        assert Path(c["args"][0]).parent == folder.path and Path(c["args"][0]).name.startswith(".models.config.")


def test_a_concurrent_reader_never_sees_an_empty_or_partial_file(folder):
    """Readers open and read both files in a tight loop (as TF Serving's and the gateway's polls do,
    only thousands of times faster) while rollout.sh edits them again and again: every read is one
    of the complete versions of the file, never an empty or half-written one."""
    config0, traffic0 = folder.config.read_bytes(), folder.traffic.read_bytes()
    folder.run("add-version", "digits", "3")
    folder.run("traffic", "digits", "10")
    config1, traffic1 = folder.config.read_bytes(), folder.traffic.read_bytes()
    folder.run("remove-version", "digits", "3")
    folder.run("traffic", "digits", "0")
    assert (folder.config.read_bytes(), folder.traffic.read_bytes()) == (config0, traffic0)

    stop = threading.Event()
    seen: dict[Path, collections.Counter] = {folder.config: collections.Counter(),
                                             folder.traffic: collections.Counter()}
    errors: list[BaseException] = []

    def reader(path: Path) -> None:
        try:
            while not stop.is_set():
                with open(path, "rb") as f:
                    seen[path][f.read()] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(p,)) for p in seen]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            folder.run("add-version", "digits", "3")
            folder.run("traffic", "digits", "10")
            folder.run("remove-version", "digits", "3")
            folder.run("traffic", "digits", "0")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    for path, states in [(folder.config, {config0, config1}), (folder.traffic, {traffic0, traffic1})]:
        reads = sum(seen[path].values())
        assert reads >= 1000, f"{path.name}: only {reads} reads"
        odd = {content[:80]: n for content, n in seen[path].items() if content not in states}
        assert not odd, f"{path.name}: {sum(odd.values())} of {reads} reads saw neither version: {odd}"
    folder.snapshot()  # no temporary file left behind


def test_edits_keep_each_files_mode(folder):
    folder.config.chmod(0o640)
    folder.traffic.chmod(0o604)
    folder.run("add-version", "sentiment_lstm", "2")
    folder.run("canary", "sentiment_lstm", "2")
    folder.run("traffic", "sentiment_lstm", "25")
    folder.run("shadow", "sentiment_lstm", "50")
    folder.run("promote", "sentiment_lstm")
    modes = {name: mode for name, (_, _, mode) in folder.snapshot().items()}
    assert modes == {"models.config": 0o640, "traffic.json": 0o604}


def test_a_missing_traffic_file_is_created_with_the_umask_mode(folder):
    folder.traffic.unlink()
    assert "canary_percent=0 shadow_percent=0" in folder.run("show", "digits").stdout
    r = subprocess.run(["bash", str(ROLLOUT), "traffic", "digits", "10"], capture_output=True, text=True,
                       timeout=60, env=folder.env(), umask=0o027)
    assert r.returncode == 0, r.stderr
    assert folder.traffic.read_text() == traffic_json({"digits": {"canary_percent": 10, "shadow_percent": 0}})
    assert stat.S_IMODE(folder.traffic.stat().st_mode) == 0o640


# -- the checker ---------------------------------------------------------------------------
def test_every_edit_is_checked_by_the_gateways_checker_before_it_is_written(folder, fake, tmp_path):
    """check-config NEW --previous CURRENT --traffic TRAFFIC, from the repository root with it on
    PYTHONPATH; NEW is the edited file (the traffic edits: the edited traffic file)."""
    config, traffic = str(folder.config), str(folder.traffic)
    folder.run("add-version", "digits", "3")
    folder.run("canary", "digits", "3")
    folder.run("traffic", "digits", "10")
    folder.run("shadow", "digits", "5.5")
    folder.run("promote", "digits")
    (tmp_path / "repo").mkdir()
    folder.run("rollback", "digits", "1", MODEL_REPOSITORY=str(tmp_path / "repo"))
    calls = fake.calls()
    assert len(calls) == 6
    for c in calls:
        assert c["cwd"] == str(ROOT) and c["pythonpath"].split(os.pathsep)[0] == str(ROOT)
    new = [c["args"][0] for c in calls]
    # Edits of models.config: a new file beside it; of traffic.json: the current models.config.
    assert [c["args"][1:] for c in calls[:2]] == [["--previous", config, "--traffic", traffic]] * 2
    assert new[2] == new[3] == config
    for c in calls[2:4]:
        assert c["args"][1:3] == ["--previous", config] and c["args"][3] == "--traffic"
        assert Path(c["args"][4]).parent == folder.path and Path(c["args"][4]).name.startswith(".traffic.json.")
    # promote checks both new files together: stable := canary and canary_percent := 0.
    promote = calls[4]
    assert Path(promote["args"][4]).name.startswith(".traffic.json.")
    assert 'key: "stable" value: 3' in promote["config"]
    assert json.loads(promote["traffic"])["digits"] == {"canary_percent": 0, "shadow_percent": 5.5}
    assert calls[5]["args"][1:] == ["--previous", config, "--traffic", traffic, "--models", str(tmp_path / "repo")]
    for name in new[:2] + [new[4], new[5]]:
        assert Path(name).parent == folder.path and Path(name).name.startswith(".models.config.")
    # An edit that changes nothing writes nothing (and asks nothing).
    before = folder.snapshot()
    folder.run("traffic", "digits", "0")
    folder.run("add-version", "digits", "3")
    assert folder.snapshot() == before and len(fake.calls()) == 6


@pytest.mark.parametrize("verdict, expected", [
    (1, "the reason it gives"),
    (2, "check-config refused the edit (exit 2)"),  # e.g. a usage error: nothing is written either
    ("hang", "did not answer within 1s"),
])
def test_a_refusal_by_the_checker_writes_nothing(folder, fake, verdict, expected):
    folder.run("add-version", "sentiment_lstm", "2")
    folder.run("canary", "sentiment_lstm", "2")
    folder.run("traffic", "sentiment_lstm", "10")
    before = folder.snapshot()
    fake.answer(verdict, "check-config: the reason it gives")
    edits = [("add-version", "sentiment_lstm", "3"), ("rollback", "sentiment_lstm", "2"),
             ("canary", "sentiment_lstm", "1"), ("traffic", "sentiment_lstm", "50"),
             ("shadow", "sentiment_lstm", "100"), ("promote", "sentiment_lstm")]
    for args in edits[::3] if verdict == "hang" else edits:  # (each hang costs CHECK_TIMEOUT)
        r = folder.run(*args, check=False, CHECK_TIMEOUT="1")
        assert r.returncode == 1, (args, r.stderr)
        assert expected in r.stderr and "nothing written" in r.stderr, (args, r.stderr)
        assert folder.snapshot() == before, f"{args}: a refused edit changed the files (bytes, inode or mode)"


def test_edits_the_script_itself_refuses_never_reach_the_checker(folder, fake):
    folder.run("add-version", "sentiment_lstm", "2")
    folder.run("canary", "sentiment_lstm", "2")
    before, asked = folder.snapshot(), len(fake.calls())
    for args, message in [
        (("canary", "sentiment_lstm", "7"), "version 7 is not served"),
        (("rollback", "sentiment_lstm", "7"), "version 7 is not served"),
        (("remove-version", "sentiment_lstm", "2"), "label canary points at version 2"),
        (("remove-version", "sentiment_lstm", "1"), "label stable points at version 1"),
        (("canary", "no_such_model", "1"), "no model named"),
        (("traffic", "no_such_model", "10"), "no model named"),
        (("canary", "sentiment_lstm", "two"), "invalid version"),
        (("traffic", "sentiment_lstm", "101"), "invalid percent"),
        (("traffic", "sentiment_lstm", "-1"), "invalid percent"),
        (("traffic", "sentiment_lstm", "1e2"), "invalid percent"),
        (("shadow", "sentiment_lstm", "ten"), "invalid percent"),
        (("shadow", "sentiment_lstm", ""), "invalid percent"),
        (("traffic", "sentiment_lstm"), "scripts/rollout.sh traffic MODEL PERCENT"),  # usage
    ]:
        r = folder.run(*args, check=False)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert folder.snapshot() == before, args
    assert len(fake.calls()) == asked
    folder.traffic.write_text("{not json")
    r = folder.run("traffic", "sentiment_lstm", "10", check=False)
    assert r.returncode == 1 and "not JSON" in r.stderr


# -- traffic, shadow, promote, show --------------------------------------------------------
def test_traffic_and_shadow_set_the_shares_in_the_json_layout(folder):
    names = model_names(folder.config.read_text())
    expected = zero_traffic(folder.config.read_text())
    folder.run("traffic", "digits", "10", TRAFFIC_FILE="")  # unset: traffic.json beside MODELS_CONFIG
    assert json.loads(folder.traffic.read_text())["digits"]["canary_percent"] == 10
    for args, model, key, value in [
        (("traffic", "digits", "10"), "digits", "canary_percent", 10),
        (("traffic", "digits", "12.5"), "digits", "canary_percent", 12.5),
        (("shadow", "digits", "100"), "digits", "shadow_percent", 100),
        (("shadow", "sentiment_lstm", "0.5"), "sentiment_lstm", "shadow_percent", 0.5),
        (("traffic", "digits", "25.0"), "digits", "canary_percent", 25),
        (("traffic", "digits", "0"), "digits", "canary_percent", 0),
    ]:
        folder.run(*args)
        expected[model][key] = value
        assert folder.traffic.read_text() == traffic_json(expected), args
        assert list(json.loads(folder.traffic.read_text())) == names, "model order kept"
    # A model of models.config missing from the traffic file (at 0/0): added at the end when set.
    del expected["digits"]
    folder.traffic.write_text(traffic_json(expected))
    folder.run("traffic", "digits", "0")
    assert folder.traffic.read_text() == traffic_json(expected), "0 for a model not named: nothing to write"
    folder.run("shadow", "digits", "20")
    expected["digits"] = {"canary_percent": 0, "shadow_percent": 20}
    assert folder.traffic.read_text() == traffic_json(expected)
    # Keys other than the two (a newer gateway's) are kept, in their place.
    folder.traffic.write_text(traffic_json({"digits": {"canary_percent": 5, "sticky": True, "shadow_percent": 1}}))
    folder.run("traffic", "digits", "7")
    assert folder.traffic.read_text() == traffic_json({"digits": {"canary_percent": 7, "sticky": True,
                                                                   "shadow_percent": 1}})


def test_promote_moves_stable_and_resets_canary_percent(folder):
    folder.run("add-version", "sentiment_lstm", "2")
    folder.run("canary", "sentiment_lstm", "2")
    folder.run("traffic", "sentiment_lstm", "50")
    folder.run("shadow", "sentiment_lstm", "20")
    folder.run("traffic", "digits", "5")
    r = folder.run("promote", "sentiment_lstm")
    assert r.stdout.splitlines()[0] == (
        "sentiment_lstm: served versions 1 2; stable=2 canary=2; canary_percent=0 shadow_percent=20")
    traffic = json.loads(folder.traffic.read_text())
    assert traffic["sentiment_lstm"] == {"canary_percent": 0, "shadow_percent": 20}  # the shadow is left alone
    assert traffic["digits"] == {"canary_percent": 5, "shadow_percent": 0}  # other models too
    # A model the traffic file does not name: promote leaves the file as it is.
    folder.traffic.write_text("{}\n")
    folder.run("add-version", "digits", "2")
    folder.run("canary", "digits", "2")
    folder.run("promote", "digits")
    assert folder.traffic.read_text() == "{}\n"


def test_show_prints_versions_labels_and_traffic_shares(folder):
    folder.run("add-version", "sentiment_lstm", "2")
    folder.run("canary", "sentiment_lstm", "2")
    folder.run("traffic", "sentiment_lstm", "12.5")
    folder.run("shadow", "sentiment_lstm", "100")
    lines = {m: f"{m}: served versions 1; stable=1 canary=1; canary_percent=0 shadow_percent=0"
             for m in model_names(folder.config.read_text())}
    lines["sentiment_lstm"] = ("sentiment_lstm: served versions 1 2; stable=1 canary=2; "
                               "canary_percent=12.5 shadow_percent=100")
    assert folder.run("show").stdout.splitlines() == list(lines.values())
    assert folder.run("show", "sentiment_lstm").stdout.splitlines() == [lines["sentiment_lstm"]]
    r = folder.run("show", "no_such_model", check=False)
    assert r.returncode == 1 and "no model named" in r.stderr


# -- analyze, wait -------------------------------------------------------------------------
def test_analyze_runs_serving_analyze_with_every_argument(folder, tmp_path):
    echo = tmp_path / "python-echo"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$PYTHONPATH" "$@"\nexit 3\n')
    echo.chmod(0o755)
    r = folder.run("analyze", "sentiment_lstm", "--prometheus", "http://prom:9090", "--window", "10m", "--json",
                   check=False, PYTHON=str(echo))
    assert r.returncode == 3, r.stderr  # its verdict is the script's exit status
    pythonpath, *args = r.stdout.splitlines()
    assert pythonpath.split(os.pathsep)[0] == str(ROOT)
    assert args == ["-m", "serving.analyze", "sentiment_lstm", "--prometheus", "http://prom:9090", "--window", "10m",
                    "--json"]
    assert folder.run("analyze", check=False, PYTHON=str(echo)).returncode == 2  # usage
    assert folder.run("analyze", "bad name", check=False, PYTHON=str(echo)).returncode == 1


@pytest.fixture
def gateways():
    """Fake gateways: GET /v2/models/M/versions/V/ready answers the next status of ``answers[path]``
    (the last one repeats; 404 for paths not listed). Every request path is recorded."""

    servers = []

    def start(answers: dict[str, list[int]]):
        requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                requests.append(self.path)
                codes = answers.get(self.path, [404])
                code = codes.pop(0) if len(codes) > 1 else codes[0]
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def path_without(tmp_path: Path, program: str) -> str:
    """A PATH with every program of the current one but ``program``."""
    bin_dir = tmp_path / f"bin-without-{program}"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = bin_dir / name
            if name != program and not target.exists() and not target.is_symlink():
                target.symlink_to(Path(d) / name)
    return str(bin_dir)


@pytest.mark.parametrize("client", ["curl", "python"])
def test_wait_with_gateway_url_polls_the_gateways_ready_endpoint(folder, gateways, tmp_path, client):
    """GATEWAY_URL: the gateways themselves say when a version is ready (embedded and local
    deployments); kubectl is not used (KUBECTL=false would fail)."""
    path = "/v2/models/sentiment_lstm/versions/5/ready"
    one, asked_one = gateways({path: [503, 503, 503, 200]})
    two, asked_two = gateways({path: [200]})
    env = {"KUBECTL": "false", "GATEWAY_URL": f"{one}/ {two}"}
    if client == "python":
        env["PATH"] = path_without(tmp_path, "curl")
        assert shutil.which("curl", path=env["PATH"]) is None
    r = folder.run("wait", "sentiment_lstm", "5", "30", **env)
    assert "sentiment_lstm version 5 is ready on every gateway" in r.stdout
    assert asked_one == [path] * 4 and set(asked_two) == {path}
    # Never ready: gives up after the timeout, naming what the gateway answered.
    r = folder.run("wait", "sentiment_lstm", "6", "1", check=False, **env)
    assert r.returncode == 1 and "not ready on 2 gateway(s) after 1s" in r.stderr and "answered 404" in r.stderr
    # No gateway there at all.
    unused, _ = gateways({})
    env["GATEWAY_URL"] = unused.replace(unused.rsplit(":", 1)[1], "9")  # port 9 (discard): nothing listens
    r = folder.run("wait", "sentiment_lstm", "5", "1", check=False, **env)
    assert r.returncode == 1 and "answered nothing" in r.stderr
    r = folder.run("wait", "sentiment_lstm", "5", "soon", check=False, **env)
    assert r.returncode == 1 and "invalid timeout" in r.stderr


def test_wait_without_gateway_url_asks_kubectl(folder, tmp_path):
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >>{tmp_path}/kubectl.log\n')  # lists no pod
    kubectl.chmod(0o755)
    r = folder.run("wait", "digits", "2", "1", check=False, KUBECTL=str(kubectl), NAMESPACE="ns")
    assert r.returncode == 1 and "no running TF Serving pod in namespace ns" in r.stderr
    assert "-n ns get pods -l app.kubernetes.io/name=tfserving" in (tmp_path / "kubectl.log").read_text()


# -- with the gateway's real checker -------------------------------------------------------
def parse_models_config(path: Path) -> dict[str, tuple[list[int], dict[str, int]]]:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    return {c.name: (list(c.model_version_policy.specific.versions), dict(c.version_labels))
            for c in config.model_config_list.config}


def config_block(text: str, model: str) -> str:
    m = re.search(r'^[ \t]*config \{\n[ \t]*name: "%s"\n.*?^[ \t]*\}\n' % re.escape(model), text, re.M | re.S)
    assert m, f"no config block of {model}"
    return m.group(0)


@pytest.fixture
def real(tmp_path, shipped_config) -> Folder:
    """A copy of the shipped models.config (every model at version 1), traffic at 0/0, the real checker."""
    return make_folder(tmp_path / "real", only_version_1(shipped_config))


def test_shipped_traffic_file_names_the_models_of_models_config_in_rollouts_layout(shipped_config):
    text = (SHIPPED / "traffic.json").read_text()
    data = json.loads(text)
    assert text == traffic_json(data), "rollout.sh rewrites it as json.dumps(indent=2) + newline: ship it so"
    assert list(data) == model_names(shipped_config)
    for model, entry in data.items():
        assert set(entry) == {"canary_percent", "shadow_percent"}, model
        assert all(0 <= v <= 100 for v in entry.values()), model


@needs_check_config
def test_shipped_files_pass_check_config():
    r = subprocess.run([sys.executable, "-m", "serving", "check-config", str(SHIPPED / "models.config"),
                        "--previous", str(SHIPPED / "models.config"), "--traffic", str(SHIPPED / "traffic.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@needs_check_config
def test_a_canary_rollout_from_add_version_to_remove_version(real):
    """add-version -> canary -> traffic 10 -> traffic 50 -> promote -> remove-version, each edit
    checked by the gateway's checker; the end: the model at the new version only, both labels on it,
    no canary share; every other model and every comment as they were."""
    start_config, start_traffic = real.config.read_text(), real.traffic.read_text()
    model = "sentiment_lstm"
    steps = [
        (("add-version", model, "2"), "served versions 1 2; stable=1 canary=1; canary_percent=0 shadow_percent=0"),
        (("canary", model, "2"), "served versions 1 2; stable=1 canary=2; canary_percent=0 shadow_percent=0"),
        (("traffic", model, "10"), "served versions 1 2; stable=1 canary=2; canary_percent=10 shadow_percent=0"),
        (("traffic", model, "50"), "served versions 1 2; stable=1 canary=2; canary_percent=50 shadow_percent=0"),
        (("promote", model), "served versions 1 2; stable=2 canary=2; canary_percent=0 shadow_percent=0"),
        (("remove-version", model, "1"), "served versions 2; stable=2 canary=2; canary_percent=0 shadow_percent=0"),
    ]
    for args, expected in steps:
        r = real.run(*args)
        assert r.stdout.splitlines()[0] == f"{model}: {expected}", args
        if args[0] == "traffic":
            assert json.loads(real.traffic.read_text())[model] == {"canary_percent": int(args[2]), "shadow_percent": 0}
    block = config_block(start_config, model)
    new_block = re.sub(r"specific \{[^}]*\}", "specific { versions: 2 }", block)
    new_block = re.sub(r'(version_labels \{ key: "\w+" value: )\d+', r"\g<1>2", new_block)
    assert real.config.read_text() == start_config.replace(block, new_block)
    assert real.traffic.read_text() == start_traffic  # canary_percent back to 0 by promote
    parsed = parse_models_config(real.config)
    assert parsed[model] == ([2], {"stable": 2, "canary": 2})
    assert sorted(real.snapshot()) == ["models.config", "traffic.json"]


@needs_check_config
def test_check_config_refuses_what_the_text_edit_cannot_see(real):
    """The awk edit looks at one model's block; the checker at both files as a whole."""
    # A canary share for a model without a canary label.
    real.config.write_text(re.sub(r'\n[ \t]*version_labels \{ key: "canary" value: \d+ \}', "",
                                  real.config.read_text()))
    before = real.snapshot()
    for args in [("traffic", "digits", "10"), ("shadow", "digits", "5")]:
        r = real.run(*args, check=False)
        assert r.returncode == 1 and "canary" in r.stderr and "nothing written" in r.stderr, r.stderr
        assert real.snapshot() == before, args
    # A label of another model pointing at a version its policy does not serve: no edit is written
    # while the file is broken, even one of a model that is fine.
    block = config_block(real.config.read_text(), "digits")
    real.config.write_text(real.config.read_text().replace(
        block, block.replace('key: "stable" value: 1', 'key: "stable" value: 9')))
    before = real.snapshot()
    r = real.run("add-version", "sentiment_lstm", "2", check=False)
    assert r.returncode == 1 and "points to version 9" in r.stderr, r.stderr
    assert str(real.config) in r.stderr and "/.models.config." not in r.stderr, "name the file, not the temporary"
    assert real.snapshot() == before


@needs_check_config
def test_rollout_moves_versions_and_labels_and_keeps_the_file_valid(real):
    config = real.config
    original = config.read_text()
    before = parse_models_config(config)
    assert before["digits"] == ([1], {"stable": 1, "canary": 1})

    def state(model="sentiment_lstm"):
        return parse_models_config(config)[model]

    real.run("add-version", "sentiment_lstm", "2")
    assert state() == ([1, 2], {"stable": 1, "canary": 1})
    real.run("add-version", "sentiment_lstm", "10")
    assert state() == ([1, 2, 10], {"stable": 1, "canary": 1})
    real.run("canary", "sentiment_lstm", "2")
    assert state() == ([1, 2, 10], {"stable": 1, "canary": 2})
    real.run("promote", "sentiment_lstm")
    assert state() == ([1, 2, 10], {"stable": 2, "canary": 2})
    real.run("rollback", "sentiment_lstm", "1")
    assert state() == ([1, 2, 10], {"stable": 1, "canary": 2})
    real.run("remove-version", "sentiment_lstm", "10")
    assert state() == ([1, 2], {"stable": 1, "canary": 2})
    assert "served versions 1 2; stable=1 canary=2" in real.run("show", "sentiment_lstm").stdout
    # Only sentiment_lstm changed; comments and layout are kept.
    after = parse_models_config(config)
    assert {k: v for k, v in after.items() if k != "sentiment_lstm"} == {
        k: v for k, v in before.items() if k != "sentiment_lstm"}
    comments = [ln for ln in original.splitlines() if ln.lstrip().startswith("#")]
    assert [ln for ln in config.read_text().splitlines() if ln.lstrip().startswith("#")] == comments
    assert len(config.read_text().splitlines()) == len(original.splitlines())


@needs_check_config
def test_rollout_adds_a_missing_label_line(real):
    real.config.write_text(re.sub(r'\n\s*version_labels \{ key: "canary" value: \d+ \}', "", real.config.read_text()))
    assert parse_models_config(real.config)["digits"] == ([1], {"stable": 1})
    r = real.run("promote", "digits", check=False)
    assert r.returncode != 0 and "no canary label" in r.stderr
    real.run("add-version", "digits", "3")
    real.run("canary", "digits", "3")
    assert parse_models_config(real.config)["digits"] == ([1, 3], {"stable": 1, "canary": 3})


@needs_check_config
def test_relative_and_symlinked_paths(real, tmp_path):
    """MODELS_CONFIG relative to the caller's directory (the checker runs from the repository root),
    or a symbolic link: the file it points at is replaced, the link stays."""
    r = subprocess.run(["bash", str(ROLLOUT), "add-version", "digits", "2"], capture_output=True, text=True,
                       timeout=60, cwd=real.path, env={**real.env(), "MODELS_CONFIG": "models.config",
                                                        "TRAFFIC_FILE": "traffic.json"})
    assert r.returncode == 0, r.stderr
    assert parse_models_config(real.config)["digits"][0] == [1, 2]
    link = tmp_path / "link.config"
    link.symlink_to(real.config)
    real.run("add-version", "digits", "3", MODELS_CONFIG=str(link))
    assert link.is_symlink() and parse_models_config(real.config)["digits"][0] == [1, 2, 3]
