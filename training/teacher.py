"""An n-gram teacher for the sentiment models' windows (distillation in the review objective).

The gateway's whole-text mode scores every 20-token window of a review and takes the
mean log-probability per class; for two classes its decision is the sign of the mean of
the windows' log-odds. A linear model has exactly that form when a review's features are
the **mean of its windows' feature vectors**: its decision w.(1/k sum_i c_i) + b is the
mean over the k windows of the per-window logit w.c_i + b. So a logistic regression fitted
that way on the training reviews gives every window a target log-odds, consistent with
the review's label as a whole, that says how much *that* window's words lean either way.

Features: counts of the kept token ids (out-of-vocabulary id 2 included; padding and the
start id not) and of adjacent pairs of them, seen in at least ``min_count`` training
windows. The model itself is scikit-learn's L2-regularised logistic regression.

The review objective (:mod:`training.review_objective`, ``teacher_weight``) adds the
cross-entropy between the model's probabilities for each window (and each short piece)
and the teacher's ``sigmoid(logit)``. A training window's target comes from a teacher
fitted *without* its review (:func:`cross_fitted_logits`, 5 folds): a teacher scoring its
own training reviews is right on 94 % of them and would hand its memorised n-grams on. The teacher only shapes training: nothing of it is
exported or served. ``python -m training.experiments --teacher`` prints its validation
and test figures (whole text, last window, short-text proxy; :meth:`NgramTeacher.figures`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from contract.text import NUM_WORDS, START_ID
from contract.whole_text import owners_of
from training.windows import review_windows

PAIR_BASE = 1 << 20  # pair (a, b) -> PAIR_BASE + a * num_words + b, above every single id


def features(ids: Sequence[int], num_words: int = NUM_WORDS) -> list[int]:
    """Feature keys of one window: each kept id (not padding, not start), then each adjacent pair."""
    t = [int(j) for j in ids if j > START_ID]
    return t + [PAIR_BASE + a * num_words + b for a, b in zip(t, t[1:])]


class NgramTeacher:
    def __init__(self, index: dict[int, int], weights: np.ndarray, bias: float, c: float, min_count: int,
                 train_accuracy: float):
        self.index, self.weights, self.bias = index, weights.astype(np.float32), float(bias)
        self.c, self.min_count, self.train_accuracy = c, min_count, train_accuracy

    @classmethod
    def fit(cls, windows: Sequence[np.ndarray], labels: np.ndarray, c: float = 1.0, min_count: int = 2) -> NgramTeacher:
        """``windows[r]``: review r's windows ([k_r, maxlen] ids, as the gateway scores them)."""
        import scipy.sparse as sp
        from sklearn.linear_model import LogisticRegression

        rows = [w for ws in windows for w in ws]
        seen = Counter(f for w in rows for f in set(features(w)))
        index = {f: i for i, f in enumerate(sorted(k for k, n in seen.items() if n >= min_count))}
        x = feature_matrix(rows, index)
        n = np.array([len(ws) for ws in windows])
        owner = owners_of(n)
        mean = sp.csr_matrix((1.0 / n[owner], (owner, np.arange(len(owner)))), shape=(len(windows), len(rows))) @ x
        y = np.asarray(labels)
        lr = LogisticRegression(C=c, max_iter=3000).fit(mean, y)
        acc = float(np.mean(lr.predict(mean) == y))
        return cls(index, lr.coef_[0], float(lr.intercept_[0]), c, min_count, acc)

    def logits(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """The teacher's log-odds of "positive" for each window ([n] float32)."""
        if len(rows) == 0:
            return np.zeros(0, np.float32)
        return (feature_matrix(rows, self.index) @ self.weights + self.bias).astype(np.float32)

    def window_logits(self, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per review, the logits of its windows (one sparse product for all of them)."""
        if not len(windows):
            return []
        z = self.logits(np.concatenate(windows))
        return np.split(z, np.cumsum([len(ws) for ws in windows])[:-1])

    def review_logits(self, windows: Sequence[np.ndarray]) -> np.ndarray:
        """Per review, the mean of its windows' logits: the teacher's own whole-text decision."""
        return np.array([z.mean() for z in self.window_logits(windows)], dtype=np.float32)

    def figures(self, prep, texts: Sequence[str], y) -> dict:
        """The teacher's own accuracy on ``texts``, scored as the models are: the mean of its window
        logits (whole text, stride 20, uncapped as the cards'), its logit of the last window alone
        (last 20), and of the short-text proxy's sentences."""
        from training.metrics import short_text_proxy

        y = np.asarray(y)
        short_x, short_y = short_text_proxy(texts, y)
        windows = review_windows(prep, [prep.token_ids(t) for t in texts], 20)
        acc = lambda z, yy: round(float(np.mean((z > 0) == yy)), 4) if len(yy) else None  # noqa: E731
        return {
            "whole_text_stride_20": acc(self.review_logits(windows), y),
            "last20": acc(self.logits(prep.encode_batch(texts)), y),
            "short_text_proxy": acc(self.logits(prep.encode_batch(short_x)), short_y),
        }

    def describe(self) -> dict:
        return {
            "model": "logistic regression (scikit-learn, L2) on counts of kept token ids and adjacent id pairs; "
            "a review's features = the mean of its windows' (so its decision = the mean of per-window logits, "
            "the form of the served whole-text combination)",
            "features": len(self.index),
            "min_windows_per_feature": self.min_count,
            "C": self.c,
            "train_accuracy": round(self.train_accuracy, 4),
        }


def cross_fitted_logits(windows: Sequence[np.ndarray], labels: np.ndarray, c: float = 1.0, folds: int = 5,
                        seed: int = 0, min_count: int = 2) -> list[np.ndarray]:
    """Per review, its windows' logits from a teacher fitted on the other folds' reviews."""
    fold = np.random.default_rng(seed).permutation(len(windows)) % folds  # folds as equal as can be
    labels = np.asarray(labels)
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(windows)
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        rest = np.flatnonzero(fold != k)
        t = NgramTeacher.fit([windows[i] for i in rest], labels[rest], c, min_count)
        for i, z in zip(held, t.window_logits([windows[i] for i in held])):
            out[i] = z
    return out


def feature_matrix(rows: Sequence[Sequence[int]], index: dict[int, int]):
    """Sparse [rows, features] counts of the features that ``index`` numbers (others dropped)."""
    import scipy.sparse as sp

    r, c = [], []
    for i, w in enumerate(rows):
        for f in features(w):
            j = index.get(f)
            if j is not None:
                r.append(i)
                c.append(j)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(rows), len(index)))

