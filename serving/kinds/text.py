"""Text classification (the sentiment models): texts -> the version's own preprocessor ->
``maxlen`` token ids per row -> labels with probabilities.

Inputs: :class:`Texts` (tokenised here, the last ``maxlen`` tokens as in training; with
``whole_text`` every window of each text, combined by mean log-probability as the model
cards measure it) or :class:`TokenIds` (rows a client made itself, checked, not tokenised).
"""

from __future__ import annotations

import functools
import hashlib
import string
from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np

from contract.repository import ModelVersion
from contract.text import OOV_ID, PAD_ID, START_ID
from contract.whole_text import combine_windows, window_rows
from serving.errors import InvalidInput, PayloadTooLarge
from serving.kinds.base import ModelKind, Prepared, classifier_outputs, expect, probabilities_tensor
from serving.request import Result
from serving.settings import Limits
from serving.tensor import INTEGER_TYPES, Tensor

# What makes a text empty: Python's whitespace plus the byte-order mark, i.e. the same set
# in Python and in the OpenAPI schema's ECMA regex (TEXT_PATTERN), written out so that
# both read it alike (their \s differ).
BLANK = "\t\n\v\f\r \x1c\x1d\x1e\x1f\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
TEXT_PATTERN = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
# Requests up to these sizes are preprocessed on the event loop (cheaper than a thread hop).
INLINE_TEXTS = 16
INLINE_CHARS = 32_000
SLOT_KINDS = {PAD_ID: "pad", START_ID: "start", OOV_ID: "oov"}  # any other id: "word"
# Whole-text admission (TextClassification.rows). Characters per kept token of IMDB reviews (11.05
# on 5,000 of the test and of the train split; per review, 5 % below 9.8): a text's windows as
# estimated for admission from its length alone.
CHARS_PER_KEPT_TOKEN = 11
# The lower bound that may refuse a request reads at most this many characters per kept token it
# looks for, per text (so a text of stop words costs a bounded read).
SCAN_CHARS_PER_TOKEN = 16
# ASCII punctuation that is neither a word character nor an apostrophe (which joins "don't") nor
# '<' (which starts an HTML line break, "<br />", whose "br" is no token): separates words like
# whitespace when kept_tokens_at_least counts them.
EDGE_PUNCTUATION = "".join(c for c in string.punctuation if c not in "'<")
_EDGE_TO_SPACE = bytes.maketrans(EDGE_PUNCTUATION.encode(), b" " * len(EDGE_PUNCTUATION))


@dataclass
class Texts:
    texts: list[str]
    whole_text: bool = False


@dataclass
class TokenIds:
    ids: np.ndarray  # [n, maxlen], the model's vocabulary


# -- answers (msgspec structs: the REST adapter encodes them as they are) -----------------
class Slot(msgspec.Struct):
    """One of the ``maxlen`` ids the model saw: the id, its word (out-of-vocabulary words as
    written in the text; ``<pad>``/``<start>`` for those ids) and its kind (pad, start, word, oov)."""

    id: int
    token: str
    kind: Literal["pad", "start", "word", "oov"]


def slots(pairs: list[tuple[int, str]]) -> list[Slot]:
    return [Slot(i, t, SLOT_KINDS.get(i, "word")) for i, t in pairs]


class WindowScore(msgspec.Struct):
    """Whole-text mode: one window of a text, in reading order, and the model's answer for it."""

    slots: list[Slot]
    label: str
    probabilities: dict[str, float]


class SentimentExplanation(msgspec.Struct, omit_defaults=True):
    slots: list[Slot]  # what the default path scores: the last maxlen tokens
    windows: list[WindowScore] | None = None  # whole-text mode: every window scored


class SentimentPrediction(msgspec.Struct, omit_defaults=True):
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: int
    unknown_tokens: int
    windows: int  # rows scored for this text (1; whole-text mode: its windows)
    explanation: SentimentExplanation | None = None  # only when asked for (omitted otherwise)


def top(row: list[float]) -> int:
    """The class of a two-class row of probabilities (a tie goes to the first)."""
    return 0 if row[0] >= row[1] else 1


@dataclass
class TextInfo:
    counts: list[tuple[int, int]]  # (tokens, unknown tokens) per text
    windows: list[int] | None = None  # whole-text mode: rows per text


class TextClassification(ModelKind):
    name = "text"
    items = "texts"
    v2_inputs = ("text", "token_ids")

    def count(self, inputs: Texts | TokenIds) -> tuple[int, str]:
        if isinstance(inputs, TokenIds):
            return len(inputs.ids), "token id rows"
        return len(inputs.texts), "texts"

    def heavy(self, inputs: Texts | TokenIds) -> bool:
        if isinstance(inputs, TokenIds):
            return False
        texts = inputs.texts
        return inputs.whole_text or len(texts) > INLINE_TEXTS or sum(map(len, texts)) > INLINE_CHARS

    def rows(self, v: ModelVersion, inputs: Texts | TokenIds, limits: Limits) -> int:
        """One row per text, or per token id row; whole text: the texts' windows, estimated before
        tokenising. From each text's length: at most ``len + 1`` ids (a token takes at least one
        character), so at most :func:`windows_of` that many windows, and about ``len / 11 + 1`` ids
        (:data:`CHARS_PER_KEPT_TOKEN`), the estimate admitted. When the most the texts could make
        exceeds ``max_windows_per_request``, their windows are also counted from below
        (:func:`kept_tokens_at_least`, a count that never exceeds the real one): 413 at once when
        even that count is over the limit, before any text is tokenised. The admitted estimate is
        at most the limit (the exact count is checked again by :meth:`prepare`)."""
        if not self._whole(inputs):
            return self.count(inputs)[0]
        texts = inputs.texts
        check_texts(texts, limits.max_text_chars)  # its errors first, as prepare would give them
        prep, stride = v.preprocessor, v.whole_text_stride
        cap, limit = limits.max_windows_per_text, limits.max_windows_per_request
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        most = windows_of(lengths + 1, prep.maxlen, stride, cap)
        about = windows_of(lengths // CHARS_PER_KEPT_TOKEN + 1, prep.maxlen, stride, cap)
        if int(most.sum()) <= limit:
            return int(about.sum())
        at_least, estimate = len(texts), 0  # every text makes at least one window
        for text, hi, guess in zip(texts, most.tolist(), about.tolist()):
            low = 1
            if hi > 1:
                need = kept_for_windows(hi, prep.maxlen, stride)
                kept = kept_tokens_at_least(text, prep.stopwords, need, SCAN_CHARS_PER_TOKEN * need)
                low = int(windows_of(kept + 1, prep.maxlen, stride, cap))
            at_least += low - 1
            if at_least > limit:
                raise PayloadTooLarge(f"too many windows: {len(texts)} texts make at least {at_least} windows > "
                                      f"max_windows_per_request={limit}; send fewer or shorter texts")
            estimate += max(low, guess)
        return min(estimate, limit)

    def rows_heavy(self, v: ModelVersion, inputs: Texts | TokenIds, limits: Limits) -> bool:
        """Off the event loop when :meth:`rows` may read the texts (whole text, more windows possible
        than allowed) and they are long."""
        if not self._whole(inputs):
            return False
        if len(inputs.texts) * limits.max_windows_per_text <= limits.max_windows_per_request:
            return False  # cannot be over: rows() reads nothing
        try:
            return sum(map(len, inputs.texts)) > INLINE_CHARS
        except TypeError:  # not all strings: rows refuses it at once
            return False

    def prepare(self, v: ModelVersion, inputs: Texts | TokenIds, limits: Limits) -> Prepared:
        if isinstance(inputs, TokenIds):
            return self._token_ids(v, inputs.ids)
        texts, prep = inputs.texts, v.preprocessor
        check_texts(texts, limits.max_text_chars)
        if not inputs.whole_text:
            encoded = [prep.encode(t) for t in texts]
            return Prepared(np.array([e.ids for e in encoded], dtype=np.int32),
                            TextInfo([(e.tokens, e.unknown_tokens) for e in encoded]))
        ids = [prep.token_ids(t) for t in texts]
        rows, sizes = window_rows(prep, ids, v.whole_text_stride, limits.max_windows_per_text)
        if len(rows) > limits.max_windows_per_request:
            raise PayloadTooLarge(f"too many windows: {len(texts)} texts make {len(rows)} windows > "
                                  f"max_windows_per_request={limits.max_windows_per_request}; send fewer or shorter texts")
        return Prepared(rows, TextInfo([(len(i) - 1, i.count(OOV_ID)) for i in ids], sizes))

    @staticmethod
    def _token_ids(v: ModelVersion, ids: np.ndarray) -> Prepared:
        vocab, maxlen = len(v.preprocessor.vocab), v.preprocessor.maxlen
        if ids.ndim != 2 or ids.shape[1] != maxlen:
            raise InvalidInput(f"token ids have shape {list(ids.shape)}; {v.name}/{v.version} takes [n, {maxlen}]")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InvalidInput(f"token ids must be in 0..{vocab - 1} (the vocabulary of {v.name}/{v.version})")
        ids = ids.astype(np.int32, copy=False)
        tokens, unknown = np.count_nonzero(ids > START_ID, axis=1), np.count_nonzero(ids == OOV_ID, axis=1)
        return Prepared(ids, TextInfo([(int(t), int(u)) for t, u in zip(tokens, unknown)]))

    def observe(self, series, prepared: Prepared) -> None:
        info: TextInfo = prepared.info
        ratio = series.unknown_ratio
        for tokens, unknown in info.counts:
            if tokens:
                ratio.observe(unknown / tokens)
        if info.windows is not None:
            series.windows.inc(len(prepared.rows))

    def result(self, v: ModelVersion, prepared: Prepared, probs: np.ndarray) -> Result:
        info: TextInfo = prepared.info
        rows = probs
        if info.windows is not None:
            probs = combine_windows(rows, info.windows)
        labels, preds = v.labels, []
        for (tokens, unknown), row, w in zip(info.counts, probs.tolist(), info.windows or [1] * len(info.counts)):
            k = top(row)
            preds.append(SentimentPrediction(labels[k], row[k], dict(zip(labels, row)), tokens, unknown, w))
        return Result(v.name, v.version, preds, probs, rows if info.windows is not None else None)

    def explain(self, v: ModelVersion, inputs: Texts | TokenIds, prepared: Prepared, r: Result, limits: Limits) -> None:
        """The slots the model saw, from the version's own preprocessor (the same code that made
        the ids); whole-text: every window's slots and probabilities."""
        if isinstance(inputs, TokenIds):
            return
        prep, labels, windows = v.preprocessor, v.labels, prepared.info.windows
        if windows is None:
            for p, t in zip(r.predictions, inputs.texts):
                p.explanation = SentimentExplanation(slots(prep.explain(t)))
            return
        stride, cap = v.whole_text_stride, limits.max_windows_per_text
        rows, start = r.rows.tolist(), 0
        for p, t, n in zip(r.predictions, inputs.texts, windows):
            scored = []
            for pairs, row in zip(prep.explain_windows(t, stride, cap), rows[start:start + n]):
                scored.append(WindowScore(slots(pairs), labels[top(row)], dict(zip(labels, row))))
            start += n
            p.explanation = SentimentExplanation(scored[-1].slots, scored)

    # -- the payload log: texts as sent, or their SHA-256 and length (token ids: digests) ----------
    def log_keep(self, inputs: Texts | TokenIds, rows: np.ndarray | None) -> tuple[object, int]:
        if isinstance(inputs, TokenIds):
            return super().log_keep(inputs, rows)
        return inputs.texts, sum(map(len, inputs.texts))

    def log_inputs(self, kept, redact: bool) -> list[dict] | None:
        if not isinstance(kept, list):
            return super().log_inputs(kept, redact)
        if not redact:
            return [{"text": t} for t in kept]
        return [{"sha256": hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest(), "chars": len(t)}
                for t in kept]

    # -- V2: 'text' BYTES [n] (or [n, 1]) or 'token_ids' INT [n, maxlen]; parameter whole_text --
    def v2_io(self, v: ModelVersion) -> tuple[list[dict], list[dict]]:
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                  {"name": "token_ids", "datatype": "INT32", "shape": [-1, v.preprocessor.maxlen]}]
        return inputs, classifier_outputs(v, "BYTES")

    def v2_parse(self, name: str, t: Tensor, parameters: dict, version) -> Texts | TokenIds:
        whole_text = parameters.get("whole_text", False)
        if not isinstance(whole_text, bool):
            raise InvalidInput(f"parameter whole_text must be true or false, got {whole_text!r:.40}")
        if t.name == "text":
            expect(t, {"BYTES"}, t.shape[:1] + (1,) if len(t.shape) == 2 else None, "[n] or [n, 1]")
            texts = []
            for i, b in enumerate(t.data):
                try:
                    texts.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidInput(f"text[{i}] is not valid UTF-8") from None
            return Texts(texts, whole_text)
        if t.name == "token_ids":
            if whole_text:
                raise InvalidInput("whole_text needs the 'text' input: token ids are already one window each")
            maxlen = version().preprocessor.maxlen
            expect(t, INTEGER_TYPES, (t.shape[0] if t.shape else 0, maxlen), f"[n, {maxlen}]", rank=2)
            return TokenIds(np.asarray(t.data).reshape(t.shape))
        raise InvalidInput(f"model {name!r} takes input 'text' (BYTES) or 'token_ids' (INT32 [n, maxlen]), not {t.name[:100]!r}")

    def v2_output_names(self, inputs: Texts | TokenIds) -> list[str]:
        return ["probabilities", "label"] + (["windows"] if self._whole(inputs) else [])

    def v2_outputs(self, r: Result, inputs: Texts | TokenIds) -> dict[str, Tensor]:
        n = len(r.predictions)
        out = {"probabilities": probabilities_tensor(r),
               "label": Tensor("label", "BYTES", (n,), [p.label.encode() for p in r.predictions])}
        if self._whole(inputs):  # how many windows each text's answer combines
            out["windows"] = Tensor("windows", "INT32", (n,), np.array([p.windows for p in r.predictions], dtype=np.int32))
        return out

    @staticmethod
    def _whole(inputs) -> bool:
        return isinstance(inputs, Texts) and inputs.whole_text


def windows_of(ids, maxlen: int, stride: int, cap: int) -> np.ndarray:
    """How many windows :meth:`TextPreprocessor.windows` makes of texts of ``ids`` ids each (start id
    included; an array, or one count), at most ``cap``: the length of contract.text.window_ends."""
    return np.where(ids <= maxlen, 1, np.minimum(cap, -((maxlen - ids) // stride) + 1))


def kept_for_windows(windows: int, maxlen: int, stride: int) -> int:
    """The fewest kept tokens (ids less the start id) with which a text makes ``windows`` windows."""
    return 0 if windows <= 1 else maxlen + (windows - 2) * stride


def kept_tokens_at_least(text: str, stopwords: frozenset[str], need: int, budget: int) -> int:
    r"""A count of the tokens the preprocessor keeps of ``text`` (:meth:`TextPreprocessor.token_ids`
    less the start id) that never exceeds the real one; it reads the text from its end, at most
    ``budget`` characters, and stops once it has found ``need``.

    It counts, in the text's UTF-8 bytes lower-cased (ASCII only) with :data:`EDGE_PUNCTUATION`
    made spaces, the chunks between ASCII whitespace that are ASCII letters and digits only
    (``bytes.isalnum``) and not stop words. Each is exactly one kept token: it is one whole run
    of the tokeniser's word characters, for what bounds it (whitespace, one of those marks, the
    text's ends) is neither a word character nor an apostrophe (which would join "don't"), and
    no byte of a multi-byte character is ASCII; normalisation leaves it as it is (ASCII
    lower-casing is Python's; an HTML line break starts with '<', which stays, so no such chunk
    is or lies inside one, as "br" of "<br />"); and it is no stop word. Chunks with any other
    byte count nothing even when they hold tokens ("don't", "café", "end.<br"), nor does the
    text before the part read. The pieces read are cut at spaces only: a piece starting inside a
    chunk could count a word that is not one ("ll" of "they'll", "br" of "<br"). It finds
    nearly all kept tokens of English reviews (97 % of IMDB's) at about a third of the cost
    of tokenising them."""
    stop = _stopword_bytes(stopwords)
    count, end, floor = 0, len(text), max(0, len(text) - budget)
    step = max(256, need * 12)  # the first piece: most texts hold a kept token per 12 characters
    while end > floor and count < need:
        start = max(floor, end - step)
        if start > 0:
            start = text.find(" ", start, end)
            if start < 0:  # no space to cut at: stop here, the count stays a lower bound
                break
        piece = text[start:end].encode("utf-8", "surrogatepass").lower().translate(_EDGE_TO_SPACE)
        words = list(filter(bytes.isalnum, piece.split()))
        count += len(words) - sum(map(stop.__contains__, words))
        end, step = start, step * 2
    return count


@functools.lru_cache(maxsize=8)
def _stopword_bytes(stopwords: frozenset[str]) -> frozenset[bytes]:
    return frozenset(w.encode("utf-8", "surrogatepass") for w in stopwords)


def check_texts(texts: list, max_chars: int) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}] must be a string, got {type(t).__name__}")
        if len(t) > max_chars:
            raise PayloadTooLarge(f"texts[{i}] is too long: {len(t)} characters > max_text_chars={max_chars}")
        if not t.strip(BLANK):
            raise InvalidInput(f"texts[{i}] is empty")
