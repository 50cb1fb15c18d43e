"""The baseline a tutorial would write: FastAPI, one ``model.predict`` per request.

Used only by bench/gateway.py, for comparison: no batching, Keras ``predict``
on every request, tokenisation with the same shared preprocessor.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from contract.text import TextPreprocessor  # noqa: E402

VERSION_DIR = Path(os.environ["NAIVE_MODEL_DIR"])
model = keras.layers.TFSMLayer(str(VERSION_DIR), call_endpoint="serving_default")
wrapped = keras.Sequential([keras.Input((20,), dtype="int32"), model])
prep = TextPreprocessor.load(VERSION_DIR / "assets.extra")
app = FastAPI()


class Req(BaseModel):
    texts: list[str]


@app.post("/v1/sentiment:predict")
def predict(req: Req):
    probs = wrapped.predict(prep.encode_batch(req.texts), verbose=0)
    probs = probs["probabilities"] if isinstance(probs, dict) else probs
    return {"predictions": [{"label": ["negative", "positive"][int(p.argmax())], "score": float(p.max())} for p in probs]}
