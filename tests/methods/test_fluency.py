"""The n-gram entropy fluency metric: hand-computed entropies, tokenization, edge cases."""

from __future__ import annotations

import math

import pytest

from seqedit.methods.fluency import FLUENCY_VERSION, fluency, ngram_entropy, words


def test_a_b_a_b_by_hand() -> None:
    # bigrams: (a,b) x2, (b,a) x1 -> f = 2/3, 1/3
    #   H2 = -(2/3 log2 2/3 + 1/3 log2 1/3) = log2 3 - 2/3 ~ 0.918296
    # trigrams: (a,b,a) x1, (b,a,b) x1 -> H3 = 1 bit
    # entropy = (2/3 H2 + 4/3 H3) / 2 = (2/3 (log2 3 - 2/3) + 4/3) / 2 ~ 0.972765
    h2 = math.log2(3) - 2 / 3
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected, abs=1e-12)
    assert ngram_entropy("a b a b") == pytest.approx(0.9727652780181631, abs=1e-12)


def test_all_distinct_words_by_hand() -> None:
    # "a b c d": 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1)
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b c d") == pytest.approx(expected, abs=1e-12)


def test_punctuation_is_a_token() -> None:
    # "a, b." is a , b . -> 3 distinct bigrams and 2 distinct trigrams, as "a b c d"
    assert ngram_entropy("a, b.") == pytest.approx(ngram_entropy("a b c d"), abs=1e-12)


def test_custom_sizes_and_weights() -> None:
    # unigrams of "a b a b": a x2, b x2 -> 1 bit; one size, weight 3 -> mean of [3 * 1]
    assert ngram_entropy("a b a b", ns=(1,), weights=(3.0,)) == pytest.approx(3.0, abs=1e-12)
    with pytest.raises(ValueError, match="one weight per"):
        ngram_entropy("a b", ns=(2, 3), weights=(1.0,))
    with pytest.raises(ValueError, match=">= 1"):
        ngram_entropy("a b", ns=(0,), weights=(1.0,))


@pytest.mark.parametrize("text", ["", "   ", "word", "two words", "x x x x x"])
def test_no_variety_means_zero_entropy(text: str) -> None:
    # fewer than n words: no n-grams, H_n = 0 (as the reference's sum over nothing);
    # one distinct n-gram (however repeated): H_n = 0
    assert ngram_entropy(text) == 0.0


def test_repetition_lowers_fluency() -> None:
    varied = "The quick brown fox jumps over the lazy dog while the birds sing in the trees."
    looping = "The dog is a dog. The dog is a dog. The dog is a dog. The dog is a dog."
    assert len(words(looping)) > len(words(varied))
    assert ngram_entropy(looping) < ngram_entropy(varied) - 1.0
    assert ngram_entropy(varied + " " + varied) < ngram_entropy(varied) + 0.5


def test_fluency_is_the_mean_over_texts() -> None:
    texts = ["a b a b", "a b c d", ""]
    expected = (ngram_entropy(texts[0]) + ngram_entropy(texts[1]) + 0.0) / 3
    assert fluency(texts) == pytest.approx(expected, abs=1e-12)
    assert fluency([]) is None
    assert FLUENCY_VERSION == "ngram-entropy-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, world!", ["Hello", ",", "world", "!"]),
        ("I don't know", ["I", "do", "n't", "know"]),
        ("It's Smith's, they're", ["It", "'s", "Smith", "'s", ",", "they", "'re"]),
        ("a well-known 1,000 or 3.14...", ["a", "well-known", "1,000", "or", "3.14", "..."]),
        ('He said "no" (twice) -- 2019.', ["He", "said", '"', "no", '"', "(", "twice", ")",
                                           "--", "2019", "."]),
        ("caf\u0065\u0301 crème\n\nnext", ["caf\u00e9", "crème", "next"]),
        ("", []),
    ],
)  # fmt: skip
def test_words(text: str, expected: list[str]) -> None:
    assert words(text) == expected
