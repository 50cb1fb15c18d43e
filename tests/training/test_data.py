"""Dataset loading from local files, and clear errors when they are missing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from training.data import DataNotFoundError, load_imdb, load_mnist, split_validation


def test_mnist_from_keras_layout_npz(data_dir):
    ds = load_mnist(data_dir)
    assert ds.train.x.shape == (60000, 28, 28) and ds.train.x.dtype == np.uint8
    assert ds.test.x.shape == (10000, 28, 28)
    assert list(ds.train.y[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(ds.test.y[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert ds.sources["mnist.npz"] == "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"


def test_imdb_from_jsonl(imdb):
    assert len(imdb.train.x) == len(imdb.train.y) == 25000
    assert len(imdb.test.x) == 25000
    assert imdb.train.y.sum() == 12500 and imdb.test.y.sum() == 12500
    assert all(isinstance(t, str) for t in imdb.train.x[:100])
    assert set(imdb.sources) == {"imdb_train.jsonl.gz", "imdb_test.jsonl.gz"}


def test_imdb_from_aclimdb_folder(tmp_path):
    for split in ("train", "test"):
        for folder, reviews in (("neg", {"10_2": "Awful.", "2_1": "Bad<br />bad."}), ("pos", {"3_9": "Great!"})):
            d = tmp_path / "aclImdb" / split / folder
            d.mkdir(parents=True)
            for stem, text in reviews.items():
                (d / f"{stem}.txt").write_text(text, encoding="utf-8")
    ds = load_imdb(tmp_path, allow_download=False)
    assert ds.train.x == ["Bad<br />bad.", "Awful.", "Great!"]  # neg by id, then pos
    assert list(ds.train.y) == [0, 0, 1]
    assert len(ds.test.x) == 3


@pytest.mark.parametrize(("loader", "wanted"), [(load_mnist, "mnist.npz"), (load_imdb, "imdb_train.jsonl.gz")])
def test_missing_data_names_the_file_and_the_fix(tmp_path, loader, wanted):
    with pytest.raises(DataNotFoundError) as err:
        loader(tmp_path, allow_download=False)
    msg = str(err.value)
    assert str(tmp_path / wanted) in msg and "--data-dir" in msg and "CLASSIFIER_DATA_DIR" in msg


def test_cli_reports_missing_data_without_a_traceback(tmp_path):
    env = {**os.environ, "CLASSIFIER_NO_DOWNLOAD": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "training", "digits", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, env=env,
    )
    assert r.returncode == 2
    assert "error: MNIST not found" in r.stderr and "mnist.npz" in r.stderr
    assert "Traceback" not in r.stderr


def test_validation_split_is_disjoint_and_seeded():
    tr, va = split_validation(1000, 0.1, seed=7)
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr) & set(va) and set(tr) | set(va) == set(range(1000))
    np.testing.assert_array_equal(va, split_validation(1000, 0.1, seed=7)[1])
    assert not np.array_equal(va, split_validation(1000, 0.1, seed=8)[1])
