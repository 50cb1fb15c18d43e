"""Training on windows of whole reviews, not only on their last 20 tokens.

``python -m training sentiment_lstm --windows r3s1`` trains on, for every
training review:

- its tail (exactly :meth:`TextPreprocessor.encode`'s ids, as version 1),
- ``r`` random full windows: ``maxlen`` consecutive ids of the review's id sequence
  (start id + kept tokens) ending anywhere before the tail (reviews no longer than
  ``maxlen`` get none: their tail is the whole text),
- ``s`` short windows: one sentence of the review that has 1-``SHORT_MAX_TOKENS``
  kept tokens, encoded like a short text (start id, tokens, padded 'pre'); when the
  review has no such sentence, a random run of 2-8 consecutive kept tokens.

Every window carries its review's label. Scheme names: ``tail`` (version 1's data),
``r<N>``, ``s<M>``, ``r<N>s<M>``. Sampling is seeded, so a run is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from contract.text import MAXLEN, OOV_ID, START_ID, TextPreprocessor, pad_sequence, tokenize
from contract.whole_text import window_rows

SHORT_MAX_TOKENS = 12
SNIPPET_MIN, SNIPPET_MAX = 2, 8
_SCHEME_RE = re.compile(r"(?:r(\d+))?(?:s(\d+))?")
# Sentence ends: . ! ? followed by space, or an HTML line break.
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|<br\s*/?>", re.IGNORECASE)


@dataclass(frozen=True)
class WindowScheme:
    random: int = 0
    short: int = 0

    @classmethod
    def parse(cls, name: str | None) -> WindowScheme:
        if not name or name == "tail":
            return cls()
        m = _SCHEME_RE.fullmatch(name)
        if not m or not name:
            raise ValueError(f"window scheme {name!r}: use 'tail', 'r<N>', 's<M>' or 'r<N>s<M>' (e.g. r3s1)")
        return cls(int(m.group(1) or 0), int(m.group(2) or 0))

    @property
    def name(self) -> str:
        if not self.random and not self.short:
            return "tail"
        return (f"r{self.random}" if self.random else "") + (f"s{self.short}" if self.short else "")

    def describe(self) -> dict:
        return {
            "scheme": self.name,
            "per_review": {"tail": 1, "random_full_windows": self.random, "short_windows": self.short},
            "short_window": f"a sentence with 1-{SHORT_MAX_TOKENS} kept tokens as a short text "
            f"(start id, padded 'pre'), else {SNIPPET_MIN}-{SNIPPET_MAX} consecutive kept tokens",
        }


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_SPLIT_RE.split(text) if s and s.strip()]


def random_window(ids: Sequence[int], rng: np.random.Generator, maxlen: int = MAXLEN) -> list[int] | None:
    """``maxlen`` consecutive ids ending before the tail, or None if the text has no more than the tail."""
    if len(ids) <= maxlen:
        return None
    end = int(rng.integers(maxlen, len(ids)))  # in [maxlen, len-1]: never the tail itself
    return list(ids[end - maxlen : end])


def short_window(
    prep: TextPreprocessor, text: str, ids: Sequence[int], rng: np.random.Generator
) -> list[int]:
    """A short piece of the text encoded as a short text would be."""
    index = prep.vocab.index
    candidates = []
    for s in sentences(text):
        toks = tokenize(s, prep.stopwords)
        if 1 <= len(toks) <= SHORT_MAX_TOKENS:
            candidates.append([index.get(t, OOV_ID) for t in toks])
    if candidates:
        words = candidates[int(rng.integers(len(candidates)))]
    else:
        body = list(ids[1:])
        k = min(int(rng.integers(SNIPPET_MIN, SNIPPET_MAX + 1)), len(body))
        start = int(rng.integers(0, len(body) - k + 1)) if body else 0
        words = body[start : start + k]
    return pad_sequence([START_ID] + words[-(prep.maxlen - 1):], prep.maxlen)


def review_windows(prep: TextPreprocessor, ids_per_text: Sequence[Sequence[int]], stride: int,
                   max_windows: int | None = None) -> list[np.ndarray]:
    """Per text, its whole-text windows ([k, maxlen] int32), exactly the rows of
    :func:`contract.whole_text.window_rows` (what the gateway scores), one array per text."""
    rows, sizes = window_rows(prep, ids_per_text, stride, max_windows)
    return np.split(rows, np.cumsum(sizes)[:-1]) if sizes else []


def sample(
    prep: TextPreprocessor,
    texts: Sequence[str],
    labels: np.ndarray,
    scheme: WindowScheme,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Training inputs [n, maxlen] int32 and labels for ``scheme``, shuffled (seeded)."""
    rng = np.random.default_rng(seed)
    xs: list[list[int]] = []
    ys: list[int] = []
    for text, label in zip(texts, labels):
        ids = prep.token_ids(text)
        xs.append(pad_sequence(ids[-prep.maxlen :], prep.maxlen))
        ys.append(int(label))
        for _ in range(scheme.random):
            w = random_window(ids, rng, prep.maxlen)
            if w is not None:
                xs.append(w)
                ys.append(int(label))
        for _ in range(scheme.short):
            xs.append(short_window(prep, text, ids, rng))
            ys.append(int(label))
    x = np.asarray(xs, dtype=np.int32).reshape(len(xs), prep.maxlen)
    y = np.asarray(ys, dtype=np.int64)
    order = rng.permutation(len(y))
    return x[order], y[order]


# How the scheme was chosen: ``python -m training.experiments --model sentiment_bilstm
# --epochs 2 --windows tail,r3,r3s1`` (same seed, validation split only).
SCHEME_COMPARISON = {
    "command": "python -m training.experiments --model sentiment_bilstm --epochs 2 --windows tail,r3,r3s1",
    "validation": {
        "tail": {"train_examples": 22500, "last20": 0.7692, "whole_text_s20": 0.8172, "whole_text_s10": 0.8152,
                 "short_proxy": 0.6856, "short_positive_share": 0.6211, "seconds_per_epoch": 12.0},
        "r3": {"train_examples": 89442, "last20": 0.7764, "whole_text_s20": 0.8432, "whole_text_s10": 0.8368,
               "short_proxy": 0.6294, "short_positive_share": 0.7761, "seconds_per_epoch": 62.5},
        "r3s1": {"train_examples": 111942, "last20": 0.7792, "whole_text_s20": 0.8416, "whole_text_s10": 0.8336,
                 "short_proxy": 0.6528, "short_positive_share": 0.3128, "seconds_per_epoch": 47.8},
    },
    "chosen": "r3s1",
}

