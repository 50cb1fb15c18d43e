import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never download: a missing dataset must fail loudly, not hang on the network.
os.environ["CLASSIFIER_NO_DOWNLOAD"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CLASSIFIER_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    missing = [f for f in ("mnist.npz", "imdb_train.jsonl.gz", "imdb_test.jsonl.gz") if not (SHARED_DATA / f).exists()]
    if missing:
        pytest.fail(f"datasets missing in {SHARED_DATA}: {missing} (set CLASSIFIER_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def imdb(data_dir):
    from training.data import load_imdb

    return load_imdb(data_dir)
