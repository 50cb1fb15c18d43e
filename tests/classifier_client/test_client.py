"""classifier_client and its CLI against real gateways, on the real IMDB test split and MNIST digits."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from testkit.gateway import ROOT, free_port, gateway_process, wait_until

CLI = [sys.executable, "-m", "classifier_client.cli"]
GATEWAY = dict(models='["sentiment_lstm", "digits"]', drain_settle_s=0, max_queue_wait_s=5)


@pytest.fixture(scope="module")
def gateway():
    with gateway_process(**GATEWAY) as gw:
        yield gw


@pytest.fixture(scope="module")
def reviews(data_dir, tmp_path_factory) -> Path:
    """The full IMDB test split as jsonl {"text", "label" (0/1)} (25,000 reviews)."""
    path = tmp_path_factory.mktemp("imdb") / "imdb_test.jsonl"
    with gzip.open(data_dir / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for line in f:
            r = json.loads(line)
            out.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    return path


def head(src: Path, n: int, dst: Path) -> Path:
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return dst


def run_cli(*args, check=True, timeout=240) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


@pytest.fixture(scope="module")
def full_run(gateway, reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out.jsonl"
    p = run_cli("sentiment", reviews, "--target", gateway.grpc, "-o", out, "--evaluate", "label")
    return out, p


def card_accuracy() -> float:
    from testkit.gateway import stable_version
    from contract.layout import ASSETS_EXTRA, CARD_FILE

    v = stable_version("sentiment_lstm")
    return json.loads((ROOT / "models" / "sentiment_lstm" / str(v) / ASSETS_EXTRA / CARD_FILE).read_text())["test_accuracy"]


def test_full_split_accuracy_equals_model_card(full_run):
    out, p = full_run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(25_000))
    line = next(line for line in p.stdout.splitlines() if line.startswith("accuracy:"))
    right, n = map(int, line.split("(")[1].rstrip(")").split("/"))
    assert n == 25_000
    # The card stores the accuracy rounded to 4 decimals (0.7708): equal at that precision.
    assert round(right / n, 4) == card_accuracy(), p.stdout
    assert "confusion matrix" in p.stdout and p.stdout.count("\n") >= 4


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_and_resume_gives_the_uninterrupted_output(gateway, reviews, full_run, tmp_path):
    src = head(reviews, 6000, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    args = ["sentiment", src, "--target", gateway.grpc, "-o", out, "--chunk-size", 50, "--window", 1, "--streams", 1]
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: lines(out) >= 500 or proc.poll() is not None, timeout=60, interval=0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    killed_at = lines(out)
    assert 0 < killed_at < 6000, f"the run was not interrupted half-way ({killed_at} rows)"
    with open(out, "ab") as f:
        f.write(b'{"index":')  # a torn last line, as a kill in the middle of a write leaves
    p = run_cli(*args, "--resume")
    assert f"{lines(out) - killed_at} rows" in p.stderr and f"{killed_at} kept" in p.stderr, p.stderr
    reference = b"".join(full_run[0].read_bytes().splitlines(keepends=True)[:6000])
    assert out.read_bytes() == reference


def start_gateway(rest: int, grpc_port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "CLASSIFIER_HOST": "127.0.0.1", "CLASSIFIER_REST_PORT": str(rest), "CLASSIFIER_GRPC_PORT": str(grpc_port),
           "CLASSIFIER_MODELS": '["sentiment_lstm"]', "CLASSIFIER_DRAIN_SETTLE_S": "0", "CLASSIFIER_MAX_QUEUE_WAIT_S": "5"}
    return subprocess.Popen([sys.executable, "-m", "serving"], cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_gateway_restart_mid_run_costs_retries_not_rows(reviews, full_run, tmp_path):
    rest, grpc_port = free_port(), free_port()
    ready = lambda: httpx.get(f"http://127.0.0.1:{rest}/readyz", timeout=2).status_code == 200  # noqa: E731
    first = start_gateway(rest, grpc_port, tmp_path / "gw1.log")
    second = None
    src, out = head(reviews, 8000, tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    try:
        wait_until(ready, timeout=120)
        cli = subprocess.Popen([*CLI, "sentiment", str(src), "--target", f"127.0.0.1:{grpc_port}", "-o", str(out),
                                "--chunk-size", "32", "--window", "2", "--streams", "1", "--retries", "60"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: lines(out) >= 300 or cli.poll() is not None, timeout=60, interval=0.005)
        first.terminate()  # drains: streams end with UNAVAILABLE, then the process exits
        first.wait(30)
        assert cli.poll() is None, f"the CLI finished before the gateway went away: {cli.communicate()[1]}"
        stopped_at = lines(out)
        second = start_gateway(rest, grpc_port, tmp_path / "gw2.log")
        _, err = cli.communicate(timeout=180)
        assert cli.returncode == 0, err
    finally:
        for p in (first, second):
            if p and p.poll() is None:
                p.terminate()
                p.wait(30)
    assert stopped_at < 8000
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8000))  # every row once, in order
    assert out.read_bytes() == b"".join(full_run[0].read_bytes().splitlines(keepends=True)[:8000])
    summary = next(line for line in err.splitlines() if "retries:" in line)
    assert "retries: 0" not in summary and "UNAVAILABLE" in summary, summary


# Readers, writers, errors, digits -----------------------------------------------------------

def test_readers(tmp_path):
    from classifier_client.io import read_records

    (tmp_path / "a.txt").write_text("good film\nbad, \"really\" bad\n")
    assert read_records(str(tmp_path / "a.txt")).items == ["good film", 'bad, "really" bad']
    (tmp_path / "a.jsonl").write_text('{"review": "x", "y": 1}\n\n{"review": "z", "y": "negative"}\n')
    r = read_records(str(tmp_path / "a.jsonl"), field="review", label_field="y")
    assert (r.items, r.labels) == (["x", "z"], [1, "negative"])
    (tmp_path / "a.csv").write_text('id,body,y\n1,"multi\nline, text",positive\n2,plain,0\n')
    r = read_records(str(tmp_path / "a.csv"), field="body", label_field="y")
    assert (r.items, r.labels) == (["multi\nline, text", "plain"], ["positive", "0"])
    with pytest.raises(ValueError, match="no column 'text'"):
        read_records(str(tmp_path / "a.csv"))


def test_kept_fields_pass_through_to_the_output_rows(gateway, tmp_path):
    """--keep copies input fields into each output row (after index), for downstream joins, in
    jsonl (JSON values as given) and csv (the column's text); a resumed run keeps them too."""
    records = [{"id": f"r-{i}", "text": t, "meta": {"shop": i % 3}} for i, t in
               enumerate(["a wonderful film", "dull and far too long", "great acting", "awful plot"] * 5)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", src, "--target", gateway.grpc, "--keep", "id,meta", "-o", out, "--chunk-size", 7)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["id"], r["meta"]) for r in rows] == [(i, r["id"], r["meta"]) for i, r in enumerate(records)]
    assert list(rows[0])[:4] == ["index", "id", "meta", "label"]
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]))  # an interrupted run
    run_cli("sentiment", src, "--target", gateway.grpc, "--keep", "id", "--keep", "meta", "-o", out, "--resume")
    assert out.read_text().splitlines(keepends=True) == lines
    csv_src = tmp_path / "in.csv"
    csv_src.write_text("review_id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in records))
    run_cli("sentiment", csv_src, "--rest", "--target", gateway.rest, "--keep", "review_id", "-o", tmp_path / "o.csv")
    import csv

    got = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert [(r["index"], r["review_id"]) for r in got] == [(str(i), r["id"]) for i, r in enumerate(records)]
    assert [r["label"] for r in got] == [r["label"] for r in rows]
    for args, message in [(["--keep", "nope"], "no field 'nope'"), (["--keep", "label"], "--keep label: the output has"),
                          (["--keep", "id", "--format", "txt"], "--keep needs fields")]:
        p = run_cli("sentiment", src, "--target", gateway.grpc, *args, check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)


def test_progress_lines_without_a_terminal(gateway, reviews, tmp_path):
    """stderr is a pipe here: a plain progress line every --progress-every seconds (there was none)."""
    src = head(reviews, 400, tmp_path / "in.jsonl")
    p = run_cli("sentiment", src, "--target", gateway.grpc, "--chunk-size", 8, "--window", 1,
                "--progress-every", 0.05, "-o", tmp_path / "o.jsonl")
    progress = [line for line in p.stderr.splitlines() if line.startswith("classifier-client: progress ")]
    assert progress, p.stderr
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    done = [int(line.split()[2].split("/")[0]) for line in progress]
    assert done == sorted(done) and all(line.split()[2].endswith("/400") for line in progress) and "rows/s" in progress[0]
    p = run_cli("sentiment", src, "--target", gateway.grpc, "--chunk-size", 8, "--window", 1,
                "--progress-every", 0, "-o", tmp_path / "o.jsonl")
    assert "progress" not in p.stderr


def test_writers_and_rows_done(tmp_path):
    from classifier_client.io import Writer, rows_done

    rows = [{"index": i, "label": "positive", "score": 0.5, "negative": 0.5, "positive": 0.5, "tokens": 3, "unknown_tokens": 1}
            for i in range(3)]
    for fmt in ("jsonl", "csv"):
        path = str(tmp_path / f"o.{fmt}")
        w = Writer(path, fmt, "sentiment")
        w.write(rows[:2])
        w.close()
        with open(path, "a") as f:
            f.write("2,posi")  # torn
        assert [int(r["index"]) for r in rows_done(path, fmt)] == [0, 1]
        w = Writer(path, fmt, "sentiment", append=True)
        w.write(rows[2:])
        w.close()
        assert [int(r["index"]) for r in rows_done(path, fmt)] == [0, 1, 2]
    assert Path(tmp_path / "o.csv").read_text().count("index,") == 1


def test_non_retryable_error_exits_non_zero_with_the_servers_message(gateway, tmp_path):
    (tmp_path / "t.txt").write_text("a good film\n\nbad\n")
    p = run_cli("sentiment", tmp_path / "t.txt", "--target", gateway.grpc, check=False)
    assert p.returncode == 1
    assert "INVALID_ARGUMENT" in p.stderr and "texts[1] is empty" in p.stderr
    p = run_cli("sentiment", tmp_path / "t.txt", "--target", gateway.grpc, "--model", "nope", check=False)
    assert p.returncode == 1 and "NOT_FOUND" in p.stderr and "nope" in p.stderr
    p = run_cli("sentiment", tmp_path / "t.txt", "--chunk-size", 2000, check=False)
    assert p.returncode == 2 and "1024" in p.stderr


def test_rest_unary_and_csv_output_agree_with_the_stream(gateway, reviews, full_run, tmp_path):
    src = head(reviews, 700, tmp_path / "in.jsonl")
    run_cli("sentiment", src, "--target", gateway.grpc, "--unary", "-o", tmp_path / "u.jsonl", "--chunk-size", 100)
    reference = b"".join(full_run[0].read_bytes().splitlines(keepends=True)[:700])
    assert (tmp_path / "u.jsonl").read_bytes() == reference
    run_cli("sentiment", src, "--rest", "--target", gateway.rest, "-o", tmp_path / "r.csv")
    import csv

    rest_rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    ref_rows = [json.loads(x) for x in reference.splitlines()]
    assert [r["label"] for r in rest_rows] == [r["label"] for r in ref_rows]
    assert [float(r["score"]) for r in rest_rows] == [r["score"] for r in ref_rows]


def test_digits_from_a_directory_of_pngs_and_jsonl(gateway, data_dir, tmp_path):
    import numpy as np
    from PIL import Image

    with np.load(data_dir / "mnist.npz") as d:
        x, y = d["x_test"][:20], d["y_test"][:20]
    (tmp_path / "png").mkdir()
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / "png" / f"{i:02d}.png")
    p = run_cli("digits", tmp_path / "png", "--target", gateway.grpc, "--chunk-size", 8)
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["id"] for r in rows] == [f"{i:02d}.png" for i in range(20)]
    assert sum(r["label"] == int(t) for r, t in zip(rows, y)) >= 18
    with open(tmp_path / "d.jsonl", "w") as f:
        for img, t in zip(x, y):
            f.write(json.dumps({"image": img.tolist(), "digit": int(t)}) + "\n")
    p = run_cli("digits", tmp_path / "d.jsonl", "--target", gateway.grpc, "-o", tmp_path / "d.csv", "--evaluate", "digit")
    assert p.stdout.startswith("accuracy: ") and float(p.stdout.split()[1]) >= 0.9


def test_library_sync_client(gateway):
    from classifier_client import Client

    with Client(gateway.grpc, version_label="stable") as c:
        r = c.sentiment(["a wonderful, moving film", "dull and boring"])
    assert r.model.name == "sentiment_lstm" and [p.label for p in r.predictions] == ["positive", "negative"]


def test_imports_without_server_dependencies():
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, tensorflow=None, keras=None, msgspec=None, "
            "prometheus_client=None, pydantic=None, numpy=None); "
            "import classifier_client, classifier_client.cli; from classifier_client import AsyncClient, Client, RestClient; "
            "assert classifier_client.cli.main(['sentiment', '--help']) == 0")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "usage: classifier-client sentiment" in p.stdout, p.stderr


def test_whole_text_option_over_grpc_and_rest(gateway, reviews, tmp_path):
    """--whole-text: the server's whole-text answers, windows column included, on both protocols."""
    small = head(reviews, 20, tmp_path / "small.jsonl")
    texts = [json.loads(line)["text"] for line in small.read_text().splitlines()]
    want = httpx.post(gateway.rest + "/v1/sentiment:predict", json={"texts": texts, "whole_text": True}, timeout=60).json()
    for extra in ([], ["--rest", "--target", gateway.rest]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        target = [] if extra else ["--target", gateway.grpc]
        run_cli("sentiment", small, *target, *extra, "--whole-text", "-o", out, "--chunk-size", "7", "-q")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["windows"] for r in rows] == [p["windows"] for p in want["predictions"]]
        assert max(r["windows"] for r in rows) > 1
        assert [r["positive"] for r in rows] == pytest.approx([p["probabilities"]["positive"] for p in want["predictions"]], abs=1e-5)
