"""Property-based tests (hypothesis, fixed seed): the text preprocessor and image decoding.

Every test is derandomised (same examples on every run) and has a small example
budget, so the file runs in seconds and never flakes on timing (deadline=None).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from PIL import Image

import grpc

from serving.errors import InvalidInput, PayloadTooLarge, ServiceError
from serving.images import SIZE, check_pixels, decode_image
from contract.repository import read_version
from tests.fuzzing import fixed_seed
from testkit.gateway import ROOT
from contract.text import (
    FIRST_WORD_ID,
    MAXLEN,
    OOV_ID,
    PAD_ID,
    START_ID,
    TextPreprocessor,
    pad_sequence,
    tokenize,
)




# ---------------------------------------------------------------------------
# Text preprocessor, with the vocabularies that ship with the models
# ---------------------------------------------------------------------------

SHIPPED = {name: read_version(ROOT / "models", name, 1).preprocessor for name in ("sentiment_lstm", "sentiment_bilstm")}
PREPS = list(SHIPPED.values())
VOCAB_WORDS = sorted({w for p in PREPS for w in p.vocab.tokens[FIRST_WORD_ID:]})
STOP_WORDS = sorted({w for p in PREPS for w in p.stopwords})

# Pieces that have tripped (or could trip) a tokeniser: line-break tags and their
# fragments, apostrophes, case mappings that change length or depend on context
# (İ -> i + U+0307, final sigma, ß, ligatures), combining marks, control
# characters, Unicode line/paragraph separators, emoji with modifiers, digits of
# other scripts, underscores (not a token character).
PIECES = [
    "<br />", "<BR>", "<br  />", "<br/>", "<Br\t/>", "<br", "/>", "<", ">", "br", "<br />br",
    "'", "’", "''", "’s", "don't", "it's", "a'b'c", "'quoted'", "not", "NOT", "never", "Good", "BAD",
    "ΟΔΟΣ", "Σ", "ς", "İstanbul", "ǅ", "ß", "ﬁne", "café", "e\u0301", "\u0301", "K", "x_y", "_", "10/10", "٣",
    "...", "!", "?", "—", "…", "-", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\x00", "\x1b[31m", "\x1c", "\x7f", "\x85",
    "\u200b", "\u2028", "\u2029", "\ufeff", "\u00a0", "\u3000", " ", "  ", "\n", "\t", "\r\n", "\x0b\x0c",
]

whitespace_runs = st.one_of(
    st.integers(1, 3000).map(lambda n: " " * n),
    st.text(alphabet=" \t\n\r\x0b\x0c\x1c\x85\u00a0\u2028\u3000", min_size=1, max_size=1500),
)
chunks = st.one_of(
    st.sampled_from(PIECES),
    st.sampled_from(VOCAB_WORDS),
    st.sampled_from(STOP_WORDS),
    st.sampled_from(VOCAB_WORDS).map(str.upper),
    st.text(max_size=12),  # any code point except surrogates
    whitespace_runs,
)
texts = st.one_of(
    st.text(max_size=300),
    st.lists(chunks, max_size=60).map("".join),
    st.lists(chunks, max_size=120).map(" ".join),
)
preps = st.sampled_from(PREPS)


def test_shipped_vocabularies_have_the_expected_size():
    for name, prep in SHIPPED.items():
        assert prep is not None and len(prep.vocab) == 1000 and prep.maxlen == MAXLEN, name


@fixed_seed(400)
@given(prep=preps, text=texts)
@example(prep=PREPS[0], text="")
@example(prep=PREPS[0], text=" " * 100_000)
@example(prep=PREPS[0], text="<br />" * 5000)
@example(prep=PREPS[0], text="good " * 25)
@example(prep=PREPS[0], text="\x00\x01\x02 \ud7ff \U0010ffff")
def test_encode_never_raises_and_has_the_documented_shape(prep: TextPreprocessor, text: str):
    enc = prep.encode(text)
    ids = enc.ids
    assert isinstance(ids, list) and len(ids) == MAXLEN
    assert all(isinstance(i, int) and 0 <= i < len(prep.vocab) for i in ids)

    # Padding (0) only at the front ("pre" padding).
    n_pad = next((k for k, i in enumerate(ids) if i != PAD_ID), MAXLEN)
    assert PAD_ID not in ids[n_pad:]

    # Short: [0]*k + [START] + word ids; long: the last 20 word ids, no start token.
    assert 0 <= enc.tokens <= MAXLEN
    if enc.tokens < MAXLEN:
        assert n_pad == MAXLEN - 1 - enc.tokens
        assert ids[n_pad] == START_ID
        words = ids[n_pad + 1 :]
    else:
        assert n_pad == 0
        words = ids
    assert len(words) == enc.tokens
    assert all(i == OOV_ID or i >= FIRST_WORD_ID for i in words)

    # unknown_tokens = OOV ids among the kept (non-padding) slots.
    assert enc.unknown_tokens == words.count(OOV_ID) == ids.count(OOV_ID)
    assert 0 <= enc.unknown_tokens <= enc.tokens

    # And both agree with the tokeniser: the ids of its last 20 tokens.
    toks = tokenize(text, prep.stopwords)
    assert enc.tokens == min(MAXLEN, len(toks))
    kept = toks[len(toks) - enc.tokens :]
    assert words == [prep.vocab.index.get(t, OOV_ID) for t in kept]


@fixed_seed(500)
@given(prep=preps, text=texts, tail_chars=st.one_of(st.sampled_from([1, 2, 7, 50, 250]), st.integers(1, 400)))
@example(prep=PREPS[0], text="ΟΔΟΣ ΟΔΟΣ", tail_chars=1)
@example(prep=PREPS[0], text="<br" + " " * 300 + "/> good", tail_chars=1)
def test_tail_fast_path_equals_the_full_pipeline(prep: TextPreprocessor, text: str, tail_chars: int):
    """encode() tokenises only the end of a text; it must give exactly ids_full()."""
    fast = TextPreprocessor(prep.vocab, maxlen=prep.maxlen, stopwords=prep.stopwords, tail_chars=tail_chars)
    assert fast.encode(text).ids == prep.ids_full(text)


@fixed_seed(200)
@given(prep=preps, text=texts, stride=st.integers(1, 25), cap=st.one_of(st.none(), st.integers(1, 5)))
def test_windows_end_with_the_encoding_and_cover_the_whole_text(prep, text, stride, cap):
    """Whole-text windows: maxlen ids each, the last is exactly encode()'s, the first starts at
    the start id, consecutive windows end ``stride`` ids apart (the first may overlap more),
    and ``max_windows`` keeps the last ones."""
    ids = prep.token_ids(text)
    windows = prep.windows(text, stride)
    assert all(len(w) == prep.maxlen for w in windows)
    assert windows[-1] == prep.encode(text).ids == prep.ids_full(text)
    assert windows[0] == pad_sequence(ids[:prep.maxlen], prep.maxlen)
    ends = [len(ids) - k * stride for k in range(len(windows) - 1)]
    assert [w for w in windows[1:][::-1]] == [pad_sequence(ids[max(0, e - prep.maxlen):e], prep.maxlen) for e in ends]
    assert len(windows) == 1 + max(0, -(-(len(ids) - prep.maxlen) // stride))
    if cap is not None:
        assert prep.windows(text, stride, cap) == windows[-cap:]


@fixed_seed(200)
@given(
    prep=preps,
    prefix=texts,
    sep=st.sampled_from([" ", "\n", "\t", " <br /> ", ". ", "\u2028"]),
    words=st.lists(st.sampled_from(VOCAB_WORDS + ["zzzqqq", "don't", "10"]), min_size=MAXLEN, max_size=60),
    glue=st.lists(st.sampled_from([" ", "  ", ", ", "! ", "\n", " the ", " <br /> ", " ... "]), min_size=1, max_size=5),
)
def test_words_in_front_of_a_long_text_do_not_change_its_encoding(prep, prefix, sep, words, glue):
    """Only the last 20 tokens count: once a text has >= 20 kept tokens, whatever is
    put in front of it (after a separator, so no token can merge across) is irrelevant."""
    tail = "".join(w + glue[i % len(glue)] for i, w in enumerate(words))
    assert len(tokenize(tail, prep.stopwords)) >= MAXLEN  # every drawn word is a kept token
    assert prep.encode(prefix + sep + tail) == prep.encode(tail)
    assert prep.ids_full(prefix + sep + tail) == prep.ids_full(tail)


@fixed_seed(150)
@given(seqs=st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=60), min_size=1, max_size=20))
@example(seqs=[[]])
@example(seqs=[list(range(1, 21)), list(range(1, 20)), list(range(1, 22))])
def test_pad_sequence_equals_keras_pad_sequences(seqs):
    import keras

    expected = keras.utils.pad_sequences(seqs, maxlen=MAXLEN, padding="pre", truncating="pre", value=0, dtype="int32")
    ours = np.array([pad_sequence(s, MAXLEN) for s in seqs], dtype=np.int64).reshape(len(seqs), MAXLEN)
    np.testing.assert_array_equal(ours, expected)


@fixed_seed(100)
@given(prep=preps, batch=st.lists(texts, max_size=8))
def test_encode_batch_is_the_stacked_encodings(prep, batch):
    arr = prep.encode_batch(batch)
    assert arr.shape == (len(batch), MAXLEN) and arr.dtype == np.int32
    assert arr.tolist() == [prep.encode(t).ids for t in batch]


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit gray pixels and holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (12, 9, 4), dtype=np.uint8)
    digit = np.full((48, 40), 255, np.uint8)
    digit[8:40, 15:22] = 0  # a "1", dark on light
    out = [
        _encode(Image.fromarray(digit), "PNG"),
        _encode(Image.fromarray(digit), "JPEG", quality=90),
        _encode(Image.fromarray(digit), "PNG", compress_level=0),
        _encode(Image.fromarray(gray), "PNG"),
        _encode(Image.fromarray(gray), "PNG", optimize=True),
        _encode(Image.fromarray(rgb), "PNG"),
        _encode(Image.fromarray(rgba), "PNG"),
        _encode(Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE), "PNG", transparency=0),
        _encode(Image.fromarray(gray > 127), "PNG"),
        _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        _encode(Image.fromarray(gray), "JPEG"),
        _encode(Image.fromarray(rgb), "JPEG", quality=50),
        _encode(Image.fromarray(rgb), "JPEG", progressive=True),
        _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        _encode(Image.fromarray(gray), "GIF"),
        _encode(Image.fromarray(gray), "BMP"),
        _encode(Image.fromarray(gray), "TIFF"),
        _encode(Image.fromarray(rgb), "WEBP") if "WEBP" in Image.SAVE else b"RIFF\x00\x00\x00\x00WEBP",
        png_header_only(3, 3),
        png_header_only(0, 5),
        png_header_only(2**31 - 1, 2**31 - 1),
        png_header_only(6000, 6000),
    ]
    return out


SEED_IMAGES = _seed_images()
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF89a", b"BM", b"II*\x00", b""]


@st.composite
def corrupted_images(draw) -> bytes:
    """A valid image with a few bytes flipped, cut, inserted or removed, or random bytes
    behind a real magic number (so that Pillow gets past identifying the format)."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "delete"]))
        if not data:
            break
        # Mostly past the signature (else Pillow just fails to identify the format).
        at = draw(st.integers(0 if draw(st.integers(0, 4)) == 0 else min(8, len(data) - 1), len(data) - 1))
        if op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


# What decode_image may raise: a client error (gRPC INVALID_ARGUMENT, REST 400/413)
# that names the image. Over the pixel budget is PayloadTooLarge, the rest InvalidInput.
REJECTED = (InvalidInput, PayloadTooLarge)


def _assert_rejection(e: ServiceError, where: str) -> None:
    assert isinstance(e, REJECTED)
    assert e.grpc_status == grpc.StatusCode.INVALID_ARGUMENT
    assert e.message.startswith(where), e.message


def _assert_mnist_like(out) -> None:
    assert isinstance(out, np.ndarray)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255


@fixed_seed(1000)
@given(
    data=st.one_of(st.binary(max_size=600), corrupted_images(), corrupted_images()),
    max_pixels=st.one_of(st.none(), st.sampled_from([1, 100, 10_000, 1_000_000])),
)
@example(data=b"", max_pixels=None)
@example(data=png_header_only(0, 5), max_pixels=None)
@example(data=png_header_only(6000, 6000), max_pixels=None)
def test_decode_image_of_arbitrary_bytes_returns_pixels_or_invalid_input(data: bytes, max_pixels):
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    try:
        out = decode_image(data, "images[0]", **kw)
    except REJECTED as e:
        _assert_rejection(e, "images[0]")
        event(f"rejected: {e.message.split(' ', 1)[1][:60]}")
        return
    event("decoded")
    _assert_mnist_like(out)


MODES = ["L", "RGB", "RGBA", "P", "PT", "LA", "1", "I;16"]  # PT: palette with a transparent index
JPEG_MODES = {"L", "RGB", "1", "CMYK"}


def _make_image(mode: str, arr8: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """An image of ``mode`` whose gray content is ``arr8`` (h x w uint8)."""
    if mode == "L":
        return Image.fromarray(arr8)
    if mode == "1":
        return Image.fromarray(arr8 > 127)
    if mode == "I;16":
        return Image.fromarray(arr8.astype(np.uint16) * 257)
    rgb = np.stack([arr8, arr8, arr8], axis=-1)
    if mode in ("RGB", "CMYK"):
        return Image.fromarray(rgb).convert(mode)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, alpha]))
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(arr8), Image.fromarray(alpha)])
    if mode in ("P", "PT"):
        return Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    raise AssertionError(mode)


@st.composite
def valid_images(draw, blank: bool = False):
    w, h = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    # Blank only in PNG: JPEG is lossy, a black 1x1 JPEG at low quality decodes to gray 8.
    fmt = "PNG" if blank else draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(sorted(JPEG_MODES) if fmt == "JPEG" else MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    alpha = np.full((h, w), 255, np.uint8)
    if blank:
        # Blank = no digit: all black, all white, or (with alpha) fully transparent.
        arr = np.full((h, w), draw(st.sampled_from([0, 255])), np.uint8)
        if mode in ("RGBA", "LA") and draw(st.booleans()):
            arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
            alpha[:] = 0
    else:
        kind = draw(st.sampled_from(["noise", "rect", "constant", "gradient"]))
        bg, fg = draw(st.integers(0, 255)), draw(st.integers(0, 255))
        arr = np.full((h, w), bg, np.uint8)
        if kind == "noise":
            arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
        elif kind == "rect":
            y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
            arr[y0:y1, x0:x1] = fg
        elif kind == "gradient":
            arr = np.linspace(bg, fg, w * h).reshape(h, w).astype(np.uint8)
        if mode in ("RGBA", "LA"):
            alpha = rng.integers(0, 256, (h, w), dtype=np.uint8) if draw(st.booleans()) else alpha
    im = _make_image(mode, arr, alpha)
    kw = {"transparency": 0} if mode == "PT" else {}
    if fmt == "JPEG":
        kw = {"quality": draw(st.integers(5, 95)), "progressive": draw(st.booleans())}
    return _encode(im, fmt, **kw), w, h, mode, fmt


@fixed_seed(150)
@given(img=valid_images())
def test_valid_png_and_jpeg_images_decode_to_28x28_pixels(img):
    data, w, h, mode, fmt = img
    out = decode_image(data, "images[0]")
    _assert_mnist_like(out)


@fixed_seed(80)
@given(img=valid_images(blank=True))
def test_a_blank_image_decodes_to_all_zeros(img):
    """All black, all white or fully transparent (lossless PNG, every mode): no digit, all zeros."""
    data, w, h, mode, fmt = img
    out = decode_image(data, "images[0]")
    _assert_mnist_like(out)
    assert out.max() == 0, (w, h, mode, fmt)


@fixed_seed(100)
@given(img=valid_images(), data=st.data())
def test_images_over_the_pixel_budget_are_refused_naming_pixels(img, data):
    raw, w, h, mode, fmt = img
    if w * h > 1:
        limit = data.draw(st.integers(1, w * h - 1), label="max_pixels")
        with pytest.raises(REJECTED, match="pixels") as e:
            decode_image(raw, "images[3]", max_pixels=limit)
        _assert_rejection(e.value, "images[3]")
        assert str(limit) in e.value.message  # names the limit
    _assert_mnist_like(decode_image(raw, "images[3]", max_pixels=w * h))  # exactly at the budget: accepted


def test_a_forged_huge_header_is_refused_naming_pixels():
    with pytest.raises(REJECTED, match="pixels"):
        decode_image(png_header_only(20_000, 20_000), "images[0]", max_pixels=1_000_000)


# check_pixels: whatever JSON-ish value arrives, a 28x28 float32 array or InvalidInput.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**300), 10**300),  # beyond float range (once an OverflowError escaped)
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 255),
    st.integers(0, 255),
    st.text(max_size=6),
    st.sampled_from(["0", "255", "1e3", " 7 ", "nan", "inf", "-0", "0x10", "١", "1_0"]),
)


@st.composite
def pixel_payloads(draw):
    """Mostly almost-right 28x28 grids (so the value checks are reached), sometimes anything."""
    if draw(st.booleans()):
        return draw(st.recursive(scalars, lambda inner: st.lists(inner, max_size=30), max_leaves=60))
    rows, cols = draw(st.sampled_from([28, 28, 28, 27, 29, 0, 1])), draw(st.sampled_from([28, 28, 28, 27, 29, 0]))
    fill = draw(st.sampled_from([0, 255, 0.5, 12]))
    grid = [[fill] * cols for _ in range(rows)]
    for _ in range(draw(st.integers(0, 3))):
        if rows and cols:
            value = draw(st.one_of(scalars, st.lists(scalars, max_size=3)))
            grid[draw(st.integers(0, rows - 1))][draw(st.integers(0, cols - 1))] = value
    if rows and draw(st.booleans()):
        grid[draw(st.integers(0, rows - 1))] = draw(st.one_of(scalars, st.lists(scalars, max_size=30)))
    return grid


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e300 -> inf, then refused
@fixed_seed(400)
@given(img=pixel_payloads())
@example(img=None)
@example(img="x" * 28)
@example(img=[[True] * 28] * 28)
@example(img=[[float("inf")] * 28] * 28)
@example(img=[["nan"] * 28] * 28)
@example(img=[[0] * 28] * 27 + [[0] * 27])
def test_check_pixels_returns_a_28x28_float32_array_or_invalid_input(img):
    try:
        out = check_pixels(img, "images[1]")
    except InvalidInput as e:
        assert e.message.startswith("images[1]")
        return
    assert isinstance(out, np.ndarray) and out.shape == (SIZE, SIZE) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255


def test_check_pixels_with_an_int_beyond_float_range_is_invalid_input():
    with pytest.raises(InvalidInput):
        check_pixels([[10**400] * 28] * 28, "images[0]")


def test_empty_text_means_the_same_to_the_server_and_to_the_openapi_pattern():
    """A text is empty (400) exactly when the schema's pattern finds no character in it (found by schemathesis:
    '\\x1e' is whitespace to Python's str.strip() but not to the ECMA regex \\S the schema had)."""
    import re

    from serving.kinds.text import BLANK, TEXT_PATTERN

    assert set(BLANK) == {chr(c) for c in range(0x110000) if chr(c).isspace()} | {"\ufeff"}
    pattern = re.compile(TEXT_PATTERN)
    for c in range(0x110000):
        assert (pattern.search(chr(c)) is None) == (chr(c) in BLANK), hex(c)
