"""The shared text preprocessor: keras equivalence, tail fast path, vocabulary."""

import random
import subprocess
import sys

import numpy as np
import pytest

from contract.text import (
    MAXLEN,
    OOV_ID,
    PAD_ID,
    START_ID,
    STOPWORDS,
    TextPreprocessor,
    Vocabulary,
    normalize,
    pad_sequence,
    tokenize,
)


def test_pad_sequence_matches_keras_pad_sequences():
    import keras

    rng = random.Random(0)
    seqs = [[rng.randrange(1, 1000) for _ in range(rng.randrange(0, 101))] for _ in range(3000)]
    expected = keras.utils.pad_sequences(seqs, maxlen=MAXLEN)  # defaults: padding='pre', truncating='pre'
    ours = np.array([pad_sequence(s) for s in seqs])
    assert ours.shape == (3000, MAXLEN)
    np.testing.assert_array_equal(ours, expected)
    # Both edge lengths are in the sample.
    assert {len(s) for s in seqs} >= {0, 20, 100}


def test_normalise_and_tokenise():
    text = "I DIDN'T like it.<br /><br />The plot—awful!! 10/10 would NOT watch… café’s"
    assert normalize(text).startswith("i didn't like it.  ")
    assert tokenize(text) == ["didn't", "like", "awful", "10", "10", "not", "café's"]
    assert tokenize(text, stopwords=frozenset())[:4] == ["i", "didn't", "like", "it"]


def test_negations_and_intensifiers_are_not_stopwords():
    for word in ("not", "no", "never", "don't", "didn't", "isn't", "but", "very", "too", "only", "nothing"):
        assert word not in STOPWORDS


@pytest.fixture(scope="module")
def small_prep(imdb):
    return TextPreprocessor(Vocabulary.build(imdb.train.x[:5000]))


def test_short_text_gets_start_token_and_left_padding(small_prep):
    idx = small_prep.vocab.index
    enc = small_prep.encode("A great movie, great acting, zzzqqq!")
    assert enc.ids == [PAD_ID] * 15 + [START_ID, idx["great"], idx["great"], idx["acting"], OOV_ID]
    assert (enc.tokens, enc.unknown_tokens) == (4, 1)
    assert small_prep.encode("").ids == [PAD_ID] * 19 + [START_ID]
    assert small_prep.encode("the a an of ... !!!").ids == [PAD_ID] * 19 + [START_ID]


def test_long_text_keeps_the_last_20_tokens(small_prep):
    idx = small_prep.vocab.index
    words = ["bad"] * 100 + ["good"] * 20
    enc = small_prep.encode(" ".join(words))
    assert enc.ids == [idx["good"]] * 20
    assert (enc.tokens, enc.unknown_tokens) == (20, 0)


def test_tail_encoding_equals_the_full_pipeline_on_real_reviews(imdb, small_prep):
    texts = imdb.train.x[:4000] + imdb.test.x[:4000]
    assert all(small_prep.encode(t).ids == small_prep.ids_full(t) for t in texts)


def _random_text(rng: random.Random) -> str:
    pieces = ["good", "Bad", "NOT", "don't", "it's", "the", "<br />", "<BR>", "<br  />", "<br", "/>", "’s",
              "ΟΔΟΣ", "İstanbul", "café", "x_y", "10/10", "...", "!", "'", "  ", "\n", "\t", "a'b'c", "''"]
    n = rng.randrange(0, 400)
    seps = [" ", "", " ", "\n"]
    return "".join(rng.choice(pieces) + rng.choice(seps) for _ in range(n))


@pytest.mark.parametrize("tail_chars", [1, 7, 50, 250])
def test_tail_encoding_equals_the_full_pipeline_on_adversarial_text(small_prep, tail_chars):
    prep = TextPreprocessor(small_prep.vocab, tail_chars=tail_chars)
    rng = random.Random(tail_chars)
    for _ in range(1500):
        t = _random_text(rng)
        assert prep.encode(t).ids == prep.ids_full(t), repr(t)


def test_encode_batch_shape_and_dtype(small_prep):
    arr = small_prep.encode_batch(["good", "bad movie", ""])
    assert arr.shape == (3, MAXLEN) and arr.dtype == np.int32
    assert small_prep.encode_batch([]).shape == (0, MAXLEN)


def test_vocabulary_is_deterministic_and_breaks_ties_by_token(imdb):
    texts = imdb.train.x[:3000]
    shuffled = list(texts)
    random.Random(1).shuffle(shuffled)
    a, b = Vocabulary.build(texts), Vocabulary.build(shuffled)
    assert a == b and a.sha256() == b.sha256()
    assert len(a) == 1000 and a.tokens[:3] == ("<pad>", "<start>", "<oov>")

    v = Vocabulary.build(["zeta beta", "beta alpha zeta", "gamma"], num_words=6)
    # beta and zeta occur twice; alpha and gamma once: ties go in token order.
    assert v.tokens == ("<pad>", "<start>", "<oov>", "beta", "zeta", "alpha")


def test_vocabulary_and_preprocessor_round_trip(tmp_path, small_prep):
    small_prep.save(tmp_path)
    loaded = TextPreprocessor.load(tmp_path)
    assert loaded.vocab == small_prep.vocab
    assert loaded.config() == small_prep.config()
    assert loaded.encode("Not good at all, sadly").ids == small_prep.encode("Not good at all, sadly").ids

    (tmp_path / "vocab.txt").write_text(small_prep.vocab.to_text().replace("\ngood\n", "\ngoood\n"))
    with pytest.raises(ValueError, match="sha256"):
        TextPreprocessor.load(tmp_path)


def test_preprocessor_module_imports_no_tensorflow():
    code = (
        "import sys, contract.text as t;"
        "p = t.TextPreprocessor(t.Vocabulary(list(t.RESERVED_TOKENS) + ['good']));"
        "p.encode_batch(['good']);"
        "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- what the model saw (the gateway's explain option) -------------------------
def test_explain_names_each_slot(small_prep):
    idx = small_prep.vocab.index
    slots = small_prep.explain("A great movie, great acting, zzzqqq!")
    assert slots == [(PAD_ID, "<pad>")] * 15 + [(START_ID, "<start>"), (idx["great"], "great"), (idx["great"], "great"),
                                                (idx["acting"], "acting"), (OOV_ID, "zzzqqq")]
    assert small_prep.explain("") == [(PAD_ID, "<pad>")] * 19 + [(START_ID, "<start>")]


def _check_explained(prep, text):
    slots = prep.explain(text)
    assert [i for i, _ in slots] == prep.encode(text).ids, repr(text)
    # The words are the text's own tokens, in order: the last ones that fit.
    words = [w for i, w in slots if i > START_ID]
    assert words == tokenize(text, prep.stopwords)[-len(words):] if words else True, repr(text)
    for stride in (5, 20):
        explained = prep.explain_windows(text, stride, 7)
        assert [[i for i, _ in w] for w in explained] == prep.windows(text, stride, 7), repr(text)
        assert explained[-1] == slots


def test_explain_matches_the_preprocessor_on_real_reviews(imdb, small_prep):
    for t in imdb.test.x[:1500]:
        _check_explained(small_prep, t)


@pytest.mark.parametrize("tail_chars", [1, 250])
def test_explain_matches_the_preprocessor_on_adversarial_text(small_prep, tail_chars):
    prep = TextPreprocessor(small_prep.vocab, tail_chars=tail_chars)
    rng = random.Random(100 + tail_chars)
    for _ in range(800):
        _check_explained(prep, _random_text(rng))
