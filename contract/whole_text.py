"""Whole-text scoring, as the model cards measure it and the gateway serves it.

A text longer than ``maxlen`` kept tokens is cut into windows (:meth:`TextPreprocessor.windows`,
``stride`` apart, the last ``max_windows`` of them); each window is scored by the model and the
text's answer is the **mean log-probability** per class over its windows, normalised. Training
(the card's figures, the review objective) and serving (``whole_text``) build and combine the
windows with these functions, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.text import TextPreprocessor

# The windows of one text that are scored (the last ones): the gateway's default
# max_windows_per_text, and what the review objective trains on.
MAX_WINDOWS = 32
EPS = 1e-7


def window_rows(prep: TextPreprocessor, ids_per_text: Sequence[Sequence[int]], stride: int,
                max_windows: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Every text's windows as rows ([m, maxlen] int32, texts in order) and how many each has.
    ``ids_per_text``: each text's :meth:`TextPreprocessor.token_ids`."""
    rows: list[list[int]] = []
    sizes = []
    for ids in ids_per_text:
        w = prep.windows_of(ids, stride, max_windows)
        rows.extend(w)
        sizes.append(len(w))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), prep.maxlen), sizes


def combine_mean_log_prob(window_probs: np.ndarray, owners: np.ndarray, n_texts: int) -> np.ndarray:
    """Per text, the mean over its windows of log p per class -> [n_texts, classes].

    ``owners[i]`` is the text that window ``i`` belongs to. The class is the argmax;
    :func:`log_probs_to_probs` turns the means into probabilities.
    """
    logp = np.log(np.clip(np.asarray(window_probs, dtype=np.float64), EPS, 1.0))
    owners = np.asarray(owners)
    sums = np.zeros((n_texts, logp.shape[1]))
    np.add.at(sums, owners, logp)
    counts = np.bincount(owners, minlength=n_texts).astype(np.float64)
    return sums / np.maximum(counts, 1)[:, None]


def log_probs_to_probs(mean_logp: np.ndarray) -> np.ndarray:
    z = mean_logp - mean_logp.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def owners_of(sizes: Sequence[int]) -> np.ndarray:
    """The text each window row belongs to, from the number of windows of each text."""
    return np.repeat(np.arange(len(sizes)), sizes)


def combine_windows(probs: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Each text's probabilities from its windows' rows (consecutive in ``probs``, ``sizes[i]``
    of text i): the mean log-probability per class, normalised (float32)."""
    return log_probs_to_probs(combine_mean_log_prob(probs, owners_of(sizes), len(sizes))).astype(np.float32)
