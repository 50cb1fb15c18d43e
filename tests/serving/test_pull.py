"""``python -m serving pull`` (serving/pull.py, contract/pull.py) against a real S3-compatible server.

moto's standalone server runs on loopback; real clients (boto3, s3fs) upload the committed
models/ into a bucket; the pull command runs as a process, as the Kubernetes init container and
sidecar run it, with the usual AWS environment (AWS_ENDPOINT_URL_S3 points botocore at moto).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.repository import read_version
from serving.model_config import parse

pytest.importorskip("s3fs", reason="the storage extra: pip install -e '.[storage]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev extra)")

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
MODELS_CONFIG = ROOT / "serving" / "tfserving" / "models.config"
BUCKET = "classifier-models"
PREFIX = "repo"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with the committed models/ under s3://BUCKET/PREFIX/, and the environment
    a pull process needs to reach it."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    for f in sorted(MODELS.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{PREFIX}/{f.relative_to(MODELS).as_posix()}")
    yield env, client
    server.stop()


@pytest.fixture(scope="module")
def s3fs_client(s3):
    import s3fs

    env, _ = s3
    return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL_S3"], "region_name": "us-east-1"})


def run_pull(env: dict, source: str, dest: Path, config: Path = MODELS_CONFIG, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", "pull", source, str(dest), "--models-config", str(config),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def versions(dest: Path) -> dict[str, list[str]]:
    """Every entry under DEST/<model>/ (temporary folders included), by model."""
    return {m.name: sorted(p.name for p in m.iterdir()) for m in sorted(dest.iterdir()) if m.is_dir()} \
        if dest.exists() else {}


def configured() -> dict[str, list[str]]:
    return {name: [str(v) for v in sorted(p.specific)] for name, p in sorted(parse(MODELS_CONFIG.read_text()).items())}


def test_full_pull_copies_exactly_the_configured_versions_then_skips_them(s3, tmp_path):
    env, _ = s3
    dest = tmp_path / "models"
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest)
    assert r.returncode == 0, r.stderr
    want = configured()
    assert versions(dest) == want  # no other version, no temporary folder
    for name, vs in want.items():
        for v in vs:
            assert tree(dest / name / v) == tree(MODELS / name / v), f"{name}/{v} differs from models/"
            read_version(dest, name, int(v))  # the gateway reads card and vocabulary from the copy
    n = sum(map(len, want.values()))
    assert f"{n} version(s) copied" in r.stdout and "0 kept" in r.stdout
    stamps = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}

    again = run_pull(env, f"s3://{BUCKET}/{PREFIX}/", dest)
    assert again.returncode == 0, again.stderr
    assert "0 version(s) copied" in again.stdout and f"{n} kept" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == stamps, "a kept version was rewritten"


def test_version_selection_follows_the_policies_of_models_config(s3, tmp_path):
    env, _ = s3
    config = tmp_path / "models.config"
    config.write_text("""model_config_list {
  config { name: "digits" base_path: "/models/digits" model_platform: "tensorflow"
           model_version_policy { specific { versions: 1 } } }
  config { name: "sentiment_lstm" base_path: "/models/sentiment_lstm" model_platform: "tensorflow"
           model_version_policy { latest { num_versions: 2 } } version_labels { key: "stable" value: 4 } }
  config { name: "sentiment_bilstm" base_path: "/models/sentiment_bilstm" model_platform: "tensorflow" }
}""")
    dest = tmp_path / "models"
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest, config)
    assert r.returncode == 0, r.stderr
    # No policy: TF Serving's default, the latest version.
    assert versions(dest) == {"digits": ["1"], "sentiment_bilstm": ["2"], "sentiment_lstm": ["3", "4"]}
    config.write_text(config.read_text().replace('"/models/sentiment_bilstm" model_platform: "tensorflow"',
                                                 '"/models/sentiment_bilstm" model_platform: "tensorflow" '
                                                 'model_version_policy { all {} }'))
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest, config)
    assert r.returncode == 0, r.stderr
    assert versions(dest)["sentiment_bilstm"] == ["1", "2"] and "1 version(s) copied" in r.stdout


@pytest.mark.parametrize("source,message", [
    (f"s3://no-such-bucket/{PREFIX}", "bucket 'no-such-bucket' does not exist"),
    (f"s3://{BUCKET}/no-such-prefix", f"s3://{BUCKET}/no-such-prefix: no such prefix"),
])
def test_a_missing_bucket_or_prefix_is_named_and_nothing_is_written(s3, tmp_path, source, message):
    env, _ = s3
    dest = tmp_path / "models"
    r = run_pull(env, source, dest)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not dest.exists()


def test_a_missing_version_is_named_and_nothing_is_copied(s3, tmp_path):
    env, _ = s3
    config = tmp_path / "models.config"
    text = MODELS_CONFIG.read_text()
    digits = text[text.index('name: "digits"'):text.index("config {", text.index('name: "digits"'))]
    config.write_text(text.replace(digits, digits.replace("versions: 2", "versions: 9").replace("value: 2", "value: 9")))
    assert "versions: 9" in config.read_text()
    dest = tmp_path / "models"
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest, config)
    assert r.returncode == 1, r.stdout
    assert f"model 'digits': version(s) [9] not under s3://{BUCKET}/{PREFIX}/digits/ (there: [1, 2])" in r.stderr
    assert versions(dest) == {}, "the other models' versions were copied although the pull failed"


def test_a_partial_upload_is_named_and_nothing_is_copied(s3, s3fs_client, tmp_path):
    """saved_model.pb uploaded, variables/ not (an upload still running, or one that died)."""
    env, _ = s3
    prefix = f"{BUCKET}/partial"
    s3fs_client.put(str(MODELS / "digits" / "1"), f"{prefix}/digits/1", recursive=True)
    s3fs_client.put_file(str(MODELS / "digits" / "2" / "saved_model.pb"), f"{prefix}/digits/2/saved_model.pb")
    s3fs_client.put(str(MODELS / "digits" / "2" / "assets.extra"), f"{prefix}/digits/2/assets.extra", recursive=True)
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "digits" base_path: "/models/digits" '
                      'model_platform: "tensorflow" model_version_policy { specific { versions: 1 versions: 2 } } } }')
    dest = tmp_path / "models"
    r = run_pull(env, f"s3://{prefix}", dest, config)
    assert r.returncode == 1, r.stdout
    assert "digits/2: incomplete upload, missing variables/ (variables.index, variables.data-*)" in r.stderr
    assert versions(dest) == {}, "digits/1 was copied although the pull failed"
    # The rest of the upload arrives: the same command now succeeds.
    s3fs_client.put(str(MODELS / "digits" / "2" / "variables"), f"{prefix}/digits/2/variables", recursive=True)
    s3fs_client.put_file(str(MODELS / "digits" / "2" / "fingerprint.pb"), f"{prefix}/digits/2/fingerprint.pb")
    r = run_pull(env, f"s3://{prefix}", dest, config)
    assert r.returncode == 0, r.stderr
    assert versions(dest) == {"digits": ["1", "2"]} and tree(dest / "digits" / "2") == tree(MODELS / "digits" / "2")


def test_a_version_that_fails_its_check_after_copying_is_removed_whole(s3, s3fs_client, tmp_path):
    """Every file is there, but the vocabulary is not the one the model was trained with: caught
    after the copy (sha256 in preprocessing.json), the temporary folder removed, nothing visible."""
    env, _ = s3
    prefix = f"{BUCKET}/corrupt"
    src = MODELS / "sentiment_lstm" / "4"
    s3fs_client.put(str(src), f"{prefix}/sentiment_lstm/4", recursive=True)
    s3fs_client.pipe_file(f"{prefix}/sentiment_lstm/4/assets.extra/vocab.txt",
                          (src / "assets.extra" / "vocab.txt").read_bytes().replace(b"\ngood\n", b"\ngood-corrupted\n"))
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "sentiment_lstm" base_path: "/models/sentiment_lstm" '
                      'model_platform: "tensorflow" model_version_policy { specific { versions: 4 } } } }')
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "sentiment_lstm" / ".tmp-pull-4-deadbeef").mkdir(parents=True)  # a killed pull's leftover
    r = run_pull(env, f"s3://{prefix}", dest, config)
    assert r.returncode == 1, r.stdout
    assert f"s3://{prefix}/sentiment_lstm/4/: " in r.stderr and "vocab.txt does not match its sha256" in r.stderr
    assert versions(dest) == {"sentiment_lstm": []}, "a half-checked version or a temporary folder was left"


def test_a_local_version_that_differs_from_the_source_is_an_error(s3, tmp_path):
    env, _ = s3
    dest = tmp_path / "models"
    (dest / "digits" / "2" / "variables").mkdir(parents=True)
    (dest / "digits" / "2" / "saved_model.pb").write_bytes(b"trained elsewhere")
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest)
    assert r.returncode == 1 and f"{dest / 'digits' / '2'} exists and differs" in r.stderr, r.stderr
    assert (dest / "digits" / "2" / "saved_model.pb").read_bytes() == b"trained elsewhere", "overwritten"
    assert versions(dest) == {"digits": ["2"]}


def test_watch_pulls_versions_added_to_models_config(s3, tmp_path):
    """The sidecar mode: a rollout that adds a version to the ConfigMap finds it on the pod's disk."""
    env, _ = s3
    config = tmp_path / "models.config"
    one = ('model_config_list { config { name: "digits" base_path: "/models/digits" model_platform: "tensorflow" '
           'model_version_policy { specific { versions: %s } } } }')
    config.write_text(one % "1")
    dest = tmp_path / "models"
    p = subprocess.Popen([sys.executable, "-m", "serving", "pull", f"s3://{BUCKET}/{PREFIX}", str(dest),
                          "--models-config", str(config), "--watch", "0.2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def wait_for(want: dict) -> None:
            deadline = time.monotonic() + 60
            while versions(dest) != want:
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, versions(dest)
                time.sleep(0.05)

        wait_for({"digits": ["1"]})
        config.write_text(one % "1 versions: 9")  # not uploaded (yet): logged, retried, the watch goes on
        time.sleep(1)
        assert p.poll() is None and versions(dest) == {"digits": ["1"]}
        config.write_text(one % "1 versions: 2")
        wait_for({"digits": ["1", "2"]})
    finally:
        p.terminate()
        out, err = p.communicate(timeout=30)
    assert "version(s) [9] not under" in err, err
    # Quiet while nothing changes: the first round's summary, then only copies (and errors).
    assert out.splitlines() == ["pull: copied digits/1 (6 files, 1305614 bytes)",
                                "pull: 1 version(s) copied (1.3 MB), 0 kept, "
                                f"from s3://{BUCKET}/{PREFIX} into {dest}",
                                "pull: copied digits/2 (6 files, 1306110 bytes)",
                                "pull: 1 version(s) copied (1.3 MB), 1 kept, "
                                f"from s3://{BUCKET}/{PREFIX} into {dest}"], out
    assert tree(dest / "digits" / "2") == tree(MODELS / "digits" / "2")


def test_credentials_come_from_a_shared_credentials_file_and_none_is_a_clear_error(s3, tmp_path):
    """k8s/components/models-from-s3 mounts the Secret as a file (AWS_SHARED_CREDENTIALS_FILE)."""
    env, _ = s3
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(HOME=str(tmp_path), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "secret" / "credentials"))
    dest = tmp_path / "models"
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest)  # the optional Secret is absent: no credentials at all
    assert r.returncode == 1 and "NoCredentialsError" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not dest.exists()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "credentials").write_text("[default]\naws_access_key_id = testing\n"
                                                     "aws_secret_access_key = testing\n")
    r = run_pull(env, f"s3://{BUCKET}/{PREFIX}", dest)
    assert r.returncode == 0, r.stderr
    assert versions(dest) == configured()


def test_a_local_folder_is_a_source_too(tmp_path):
    dest = tmp_path / "models"
    r = run_pull(dict(os.environ), str(MODELS), dest)
    assert r.returncode == 0, r.stderr
    assert versions(dest) == configured()


def test_without_the_storage_extra_the_error_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['fsspec'] = None; from serving.pull import main; "
            f"sys.exit(main([{str(MODELS)!r}, {str(tmp_path / 'm')!r}, '--models-config', {str(MODELS_CONFIG)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "needs fsspec: pip install 'classifier-service[storage]'" in r.stderr, r.stderr
    # And nothing imports fsspec unless a pull runs: the gateway itself does not need it.
    r = subprocess.run([sys.executable, "-c", "import sys, serving.pull, contract.pull, serving.__main__; "
                        "sys.exit('fsspec' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
