"""Load test for the gateway's REST API (Locust).

Traffic mix (task weights): mostly single-review sentiment requests, some batches
of 32 reviews, some single 28x28 digit images. Reviews are short sentences built
from a small word list; images are synthetic strokes (a ring or a bar) at a random
offset. A response counts as a failure unless it is HTTP 200 with one prediction
per input.

Headless, against a gateway on localhost (``python -m serving`` or ``docker compose up``)::

    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 1m \\
        --host http://localhost:8000 --csv bench/results/locust

With the compose stack (web UI on http://localhost:8089, or add ``--headless ...``)::

    docker compose --profile load up locust

Environment: ``SENTIMENT_MODELS`` (comma-separated; default
``sentiment_lstm,sentiment_bilstm``) picks the models the sentiment tasks spread over.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, task

SENTIMENT_MODELS = [m for m in os.environ.get("SENTIMENT_MODELS", "sentiment_lstm,sentiment_bilstm").split(",") if m]
BATCH_SIZE = 32

SUBJECTS = ["this movie", "the film", "the plot", "the acting", "the soundtrack", "the ending", "the cast",
            "the director's latest", "the script", "this sequel"]
VERBS = ["was", "felt", "seemed", "is", "turned out"]
POSITIVE = ["brilliant", "wonderful", "moving", "funny", "gripping", "beautifully shot", "a joy to watch",
            "excellent", "charming", "superb"]
NEGATIVE = ["boring", "awful", "predictable", "a waste of time", "painfully slow", "terrible", "dull",
            "badly written", "forgettable", "a mess"]
CLOSERS = ["", "", "I would watch it again.", "Not recommended.", "Ten out of ten.", "Two hours I won't get back.",
           "The kids loved it.", "Skip it."]
LINKS = ["and", "but", "although", "and honestly"]


def review(rng: random.Random) -> str:
    """A short review: one or two clauses and sometimes a closing remark."""
    words = POSITIVE if rng.random() < 0.5 else NEGATIVE
    text = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(words)}"
    if rng.random() < 0.6:
        other = POSITIVE if rng.random() < 0.7 else NEGATIVE
        text += f" {rng.choice(LINKS)} {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(other)}"
    return (text + ". " + rng.choice(CLOSERS)).strip()


def digit_image(rng: random.Random) -> list[list[int]]:
    """A 28x28 MNIST-like image (white stroke on black, 0-255): a ring ("0") or a bar ("1")."""
    img = [[0] * 28 for _ in range(28)]
    cx, cy = 14 + rng.randint(-2, 2), 14 + rng.randint(-2, 2)
    if rng.random() < 0.5:
        ry, rx = rng.uniform(7, 9), rng.uniform(4.5, 6.5)
        for y in range(28):
            for x in range(28):
                d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
                if 0.6 <= d <= 1.25:
                    img[y][x] = rng.randint(180, 255)
    else:
        for y in range(cy - 9, cy + 10):
            for x in range(cx - 1, cx + 2):
                img[y][x] = rng.randint(200, 255)
    return img


class GatewayUser(FastHttpUser):
    wait_time = between(0.05, 0.25)

    def on_start(self):
        self.rng = random.Random()

    def _predict(self, path: str, body: dict, expected: int, name: str):
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                predictions = resp.json()["predictions"]
            except (ValueError, KeyError, TypeError) as e:
                resp.failure(f"bad response body ({type(e).__name__}): {(resp.text or '')[:200]}")
                return
            if len(predictions) != expected:
                resp.failure(f"{len(predictions)} predictions for {expected} inputs")
            else:
                resp.success()

    @task(10)
    def sentiment_one(self):
        model = self.rng.choice(SENTIMENT_MODELS)
        self._predict("/v1/sentiment:predict", {"texts": [review(self.rng)], "model": model}, 1,
                      f"sentiment x1 [{model}]")

    @task(2)
    def sentiment_batch(self):
        model = self.rng.choice(SENTIMENT_MODELS)
        texts = [review(self.rng) for _ in range(BATCH_SIZE)]
        self._predict("/v1/sentiment:predict", {"texts": texts, "model": model}, BATCH_SIZE,
                      f"sentiment x{BATCH_SIZE} [{model}]")

    @task(3)
    def digits_one(self):
        self._predict("/v1/digits:predict", {"images": [digit_image(self.rng)]}, 1, "digits x1")
