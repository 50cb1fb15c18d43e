"""The one text preprocessor, shared by training and the gateway.

It imports no TensorFlow (only the standard library and, for batches, NumPy), so
the gateway can be installed without TensorFlow and still turn raw text into
exactly the ids the models were trained on.

Pipeline for one review::

    text --normalise--> lower-case, HTML line breaks (<br />) -> space, ’ -> '
         --tokenise---> words: runs of letters/digits, inner apostrophes kept
                        ("don't" is one token); punctuation is never a token
         --filter-----> stop words dropped (function words that carry no
                        sentiment; negations such as "not", "no", "don't" kept)
         --ids--------> [START] + [vocab id or OOV for each token]
         --pad/cut----> keras.utils.pad_sequences(maxlen=20, padding="pre",
                        truncating="pre"): the *last* 20 ids are kept and short
                        sequences are left-padded with 0.

Ids: 0 = padding, 1 = start, 2 = out-of-vocabulary, words from 3. A vocabulary of
``num_words`` = 1000 ids therefore holds 997 words, so ids fit Embedding(1000, 8).

Because only the last ``maxlen`` ids survive, :meth:`TextPreprocessor.encode`
tokenises only as much of the end of a text as it needs (a few hundred
characters instead of the whole review); ``tests/contract/test_text.py`` proves that this
gives exactly the ids of the full pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAXLEN = 20
NUM_WORDS = 1000
PAD_ID = 0
START_ID = 1
OOV_ID = 2
FIRST_WORD_ID = 3
RESERVED_TOKENS = ("<pad>", "<start>", "<oov>")

_BR_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
# A token is a run of letters/digits; apostrophes only inside ("don't", "90's").
_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")

# Stop words: tokens dropped before the 20-slot window is filled, so that the
# slots hold words that carry sentiment. Chosen by measurement on the validation
# split (python -m training.experiments; figures in the README). Negations and
# intensifiers ("not", "no", "never", "don't", "but", "very", "too", "only")
# are deliberately *not* here: they change the meaning of what follows.
FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    a an the and or if then than so as of at by for from in into on onto to with
    about above after again against before below between during over under up down
    out off through once here there when where why how all any both each other some
    such own same just now also yet ever
    i me my myself we our ours ourselves you your yours yourself yourselves he him
    his himself she her hers herself it its itself they them their theirs
    themselves what which who whom whose this that these those
    am is are was were be been being have has had having do does did doing
    would should could can will shall may might must
    i'm i've i'd i'll you're you've you'd you'll he's he'd he'll she's she'd she'll
    it's it'd it'll we're we've we'd we'll they're they've they'd they'll
    that's there's here's what's who's let's
    s t d ll m o re ve y
    """.split()
)
# The most frequent words of movie reviews that say nothing about sentiment.
DOMAIN_WORDS: frozenset[str] = frozenset(
    "movie movies film films one see watch story character characters plot".split()
)
STOPWORDS: frozenset[str] = FUNCTION_WORDS | DOMAIN_WORDS


def normalize(text: str) -> str:
    """Lower-case, replace HTML line breaks by spaces and unify apostrophes."""
    return _BR_RE.sub(" ", text).lower().replace("\u2019", "'")


def tokenize(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """All tokens of ``text`` in order (normalised, punctuation and stop words out)."""
    return [t for t in _TOKEN_RE.findall(normalize(text)) if t not in stopwords]


def pad_sequence(ids: Sequence, maxlen: int = MAXLEN, value=PAD_ID) -> list:
    """One sequence cut and padded as ``keras.utils.pad_sequences`` does.

    padding="pre", truncating="pre", value=0: keep the last ``maxlen`` ids and
    put the padding in front. (``value``: the filler, e.g. ``"<pad>"`` for words.)
    """
    ids = list(ids[-maxlen:]) if maxlen else []
    return [value] * (maxlen - len(ids)) + ids


def window_ends(n: int, maxlen: int, stride: int, max_windows: int | None = None) -> list[int]:
    """Where each whole-text window of a sequence of ``n`` ids ends (exclusive), last window
    first: ``stride`` apart from the end, the first one ending at ``min(maxlen, n)``."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    ends = list(range(n, maxlen, -stride))
    if not ends or ends[-1] != maxlen:
        ends.append(min(maxlen, n))
    return ends[:max_windows] if max_windows is not None else ends


class Vocabulary:
    """The ``num_words`` ids: reserved tokens, then words by falling frequency.

    Stored as a text file with one token per line; the line number is the id.
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[: len(RESERVED_TOKENS)] != list(RESERVED_TOKENS):
            raise ValueError(f"vocabulary must start with the reserved tokens {RESERVED_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate tokens")
        self.tokens: tuple[str, ...] = tuple(words)
        self.index: dict[str, int] = {w: i for i, w in enumerate(words) if i >= FIRST_WORD_ID}

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        num_words: int = NUM_WORDS,
        stopwords: frozenset[str] = STOPWORDS,
    ) -> Vocabulary:
        """The ``num_words - 3`` most frequent tokens of ``texts``.

        Deterministic whatever the order of ``texts``: ties in frequency are
        broken by the token itself (Unicode code point order).
        """
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text, stopwords))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        words = [w for w, _ in ranked[: num_words - FIRST_WORD_ID]]
        return cls(list(RESERVED_TOKENS) + words)

    def to_text(self) -> str:
        return "".join(t + "\n" for t in self.tokens)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_text(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(Path(path).read_text(encoding="utf-8").splitlines())


@dataclass(frozen=True)
class Encoded:
    """One text as the model sees it."""

    ids: list[int]  # exactly maxlen ids
    tokens: int  # word tokens among the kept ids (start and padding not counted)
    unknown_tokens: int  # of those, how many are out of vocabulary


@dataclass
class TextPreprocessor:
    """Text -> fixed-length id sequences, exactly as in training.

    The settings travel with every exported model version as
    ``assets.extra/preprocessing.json`` (see :meth:`config`), so a server
    always tokenises a request the way *that* version was trained.
    """

    vocab: Vocabulary
    maxlen: int = MAXLEN
    stopwords: frozenset[str] = field(default=STOPWORDS)
    # First guess of how many trailing characters hold ``maxlen`` kept tokens;
    # doubled until enough tokens are found (or the whole text is used).
    tail_chars: int = 250

    def ids_full(self, text: str) -> list[int]:
        """Reference pipeline: tokenise everything, then cut/pad. O(len(text))."""
        index = self.vocab.index
        ids = [START_ID] + [index.get(t, OOV_ID) for t in tokenize(text, self.stopwords)]
        return pad_sequence(ids, self.maxlen)

    def _tail_tokens(self, text: str) -> list[str]:
        """The last tokens of ``text``: at least ``maxlen`` of them, or all of them.

        Line-break tags are removed from the whole text first (cheap: a scan
        for ``<``); the rest of normalisation and tokenisation is local, and no
        token can contain a space, so the text can be cut at any space and
        tokenised piece by piece from the end: the tokens of the pieces,
        concatenated, are exactly the tokens of the whole text.
        """
        if "<" in text:
            text = _BR_RE.sub(" ", text)
        maxlen, stopwords, findall = self.maxlen, self.stopwords, _TOKEN_RE.findall
        end, window, toks = len(text), self.tail_chars, []
        while end > 0:
            cut = text.find(" ", end - window, end) if window < end else -1
            start = cut if cut >= 0 else 0
            piece = text[start:end].lower().replace("\u2019", "'")
            toks = [t for t in findall(piece) if t not in stopwords] + toks
            if len(toks) >= maxlen:
                break
            end = start
        return toks

    def encode(self, text: str) -> Encoded:
        toks = self._tail_tokens(text)[-self.maxlen :]
        index = self.vocab.index
        ids = [index.get(t, OOV_ID) for t in toks]
        unknown = ids.count(OOV_ID)
        if len(ids) < self.maxlen:
            ids.insert(0, START_ID)
            ids[:0] = [PAD_ID] * (self.maxlen - len(ids))
        return Encoded(ids, len(toks), unknown)

    def token_ids(self, text: str) -> list[int]:
        """The ids of every kept token of the whole text, the start id first (no cut, no padding)."""
        index = self.vocab.index
        return [START_ID] + [index.get(t, OOV_ID) for t in tokenize(text, self.stopwords)]

    def windows(self, text: str, stride: int | None = None, max_windows: int | None = None) -> list[list[int]]:
        """The whole text as ``maxlen``-id windows, for whole-text scoring: the ids of every
        kept token (the start id first), windows ``stride`` ids apart (default ``maxlen``: no
        overlap), ending with the last window, which is exactly :meth:`encode`'s ids; the
        first window starts at the start id (padded 'pre' like a short text when the text is
        shorter than ``maxlen``). In reading order; with ``max_windows``, only the last ones."""
        return self.windows_of(self.token_ids(text), stride, max_windows)

    def windows_of(self, ids: Sequence[int], stride: int | None = None, max_windows: int | None = None) -> list[list[int]]:
        """:meth:`windows` of ids from :meth:`token_ids`."""
        maxlen = self.maxlen
        ends = window_ends(len(ids), maxlen, stride or maxlen, max_windows)
        return [pad_sequence(ids[max(0, e - maxlen):e], maxlen) for e in reversed(ends)]

    # -- what the model saw (the gateway's explain option) ---------------------
    def explain(self, text: str) -> list[tuple[int, str]]:
        """The ``maxlen`` slots of :meth:`encode`, as (id, token) pairs in order: ``<pad>`` and
        ``<start>`` for those ids, the word itself for a word (out-of-vocabulary ones too, with
        id ``OOV_ID``). The ids are exactly ``encode(text).ids``."""
        toks = self._tail_tokens(text)[-self.maxlen :]
        if len(toks) < self.maxlen:
            toks.insert(0, RESERVED_TOKENS[START_ID])
        return self._slots(pad_sequence(toks, self.maxlen, RESERVED_TOKENS[PAD_ID]))

    def explain_windows(self, text: str, stride: int | None = None,
                        max_windows: int | None = None) -> list[list[tuple[int, str]]]:
        """:meth:`explain` for each of :meth:`windows` (same windows, same order)."""
        maxlen = self.maxlen
        words = [RESERVED_TOKENS[START_ID]] + tokenize(text, self.stopwords)
        ends = window_ends(len(words), maxlen, stride or maxlen, max_windows)
        return [self._slots(pad_sequence(words[max(0, e - maxlen):e], maxlen, RESERVED_TOKENS[PAD_ID]))
                for e in reversed(ends)]

    def _slots(self, tokens: list[str]) -> list[tuple[int, str]]:
        """(id, token) of padded tokens; the reserved names only ever stand for their own ids
        (a text cannot produce "<pad>" or "<start>" as a word: "<" is never part of a token)."""
        index, pad, start = self.vocab.index, RESERVED_TOKENS[PAD_ID], RESERVED_TOKENS[START_ID]
        return [(PAD_ID if t == pad else START_ID if t == start else index.get(t, OOV_ID), t) for t in tokens]

    def encode_batch(self, texts: Sequence[str]):
        """int32 array [len(texts), maxlen], ready for the ``token_ids`` input."""
        import numpy as np

        return np.array([self.encode(t).ids for t in texts], dtype=np.int32).reshape(
            len(texts), self.maxlen
        )

    # -- persistence next to a model version ---------------------------------
    def config(self) -> dict:
        return {
            "maxlen": self.maxlen,
            "num_words": len(self.vocab),
            "padding": "pre",
            "truncating": "pre",
            "ids": {"pad": PAD_ID, "start": START_ID, "oov": OOV_ID, "first_word": FIRST_WORD_ID},
            "normalize": "lower-case; <br /> -> space; U+2019 -> '",
            "token_pattern": _TOKEN_RE.pattern,
            "stopwords": sorted(self.stopwords),
            "vocab_file": "vocab.txt",
            "vocab_sha256": self.vocab.sha256(),
        }

    def save(self, directory: str | Path) -> None:
        """Write ``vocab.txt`` and ``preprocessing.json`` into ``directory``."""
        directory = Path(directory)
        self.vocab.save(directory / "vocab.txt")
        (directory / "preprocessing.json").write_text(
            json.dumps(self.config(), indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | Path) -> TextPreprocessor:
        """Read what :meth:`save` wrote (e.g. a version's ``assets.extra/``)."""
        directory = Path(directory)
        cfg = json.loads((directory / "preprocessing.json").read_text(encoding="utf-8"))
        if cfg["token_pattern"] != _TOKEN_RE.pattern:
            raise ValueError(
                f"{directory}: model was trained with token pattern {cfg['token_pattern']!r}, "
                f"this code uses {_TOKEN_RE.pattern!r}"
            )
        vocab = Vocabulary.load(directory / cfg["vocab_file"])
        if vocab.sha256() != cfg["vocab_sha256"]:
            raise ValueError(f"{directory}: vocab.txt does not match its sha256 in preprocessing.json")
        return cls(vocab, maxlen=cfg["maxlen"], stopwords=frozenset(cfg["stopwords"]))
