"""Generation fluency: the weighted n-gram entropy of ROME/MEMIT (CounterFact "Fluency").

Definition (kmeng01/rome, experiments/py/eval_utils_counterfact.py, `n_gram_entropy`):

- split a text into word and punctuation tokens (`words`);
- for each n in (2, 3), count its word n-grams; with f the counts normalised to sum 1,
  the entropy in bits is H_n = -sum f log2 f (0 when the text has no n-gram of that size,
  as in the reference, where the sum over no n-grams is 0);
- the text's entropy is the arithmetic mean of the weighted entropies, (2/3 H_2 + 4/3 H_3)/2;
- a record's fluency is the arithmetic mean over its generated texts (one per generation
  prompt, see `seqedit.methods.generation`), and a run's the mean over records.

Repetitive text has few distinct n-grams and so a low entropy. We store the raw value:
the papers print it times 100 (GPT-2 XL's 622 is 6.22 here).

Tokenization. ROME uses `nltk.word_tokenize` (Punkt sentence splitting then the Treebank
word tokenizer), whose data we cannot download. `words` is a documented approximation of
it with one regex; entropy depends only on how many times each distinct n-gram occurs, so
what matters is where tokens split, not how they are spelled. Like Treebank it splits off
punctuation as separate tokens and the clitics n't, 's, 're, 've, 'll, 'd, 'm ("don't" ->
"do", "n't"), and keeps hyphenated words, numbers with separators (1,000 or 3.14) and "..."
whole. Unlike it, it splits every period (Punkt keeps "Mr." and "U.S." whole and splits only
a sentence's last period) and keeps quote characters as they are (Treebank rewrites them to
`` and ''). The text is NFC-normalised first so that accents left decomposed by the NFKD
cleaning of generated texts stay inside their words.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

FLUENCY_VERSION = "ngram-entropy-1"
NGRAM_SIZES = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_TOKEN = re.compile(
    r"\w+(?=n['’]t\b)"  # "do" of "don't": Treebank splits the clitic n't off
    r"|n['’]t\b"
    r"|['’](?:s|re|ve|ll|d|m)\b"  # clitics 's 're 've 'll 'd 'm
    r"|\d+(?:[.,]\d+)+"  # numbers with separators: 1,000 and 3.14
    r"|\w+(?:-\w+)*"  # words, hyphenated ones whole
    r"|\.\.\.|--"  # ellipsis, double dash
    r"|[^\w\s]",  # any other punctuation or symbol, one token each
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """Word and punctuation tokens of `text` (an approximation of `nltk.word_tokenize`)."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text))


def _entropy_bits(counts: Counter[tuple[str, ...]]) -> float:
    """Entropy in bits of the distribution of the normalised counts (0 when empty)."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def ngram_entropy(
    text: str,
    ns: Sequence[int] = NGRAM_SIZES,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """mean_i(weights[i] * H_{ns[i]}) for one text, H_n the entropy in bits of its word
    n-gram frequencies (0 when it has fewer than n words)."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"need one weight per n-gram size, got ns={ns}, weights={weights}")
    if any(n < 1 for n in ns):
        raise ValueError(f"n-gram sizes must be >= 1, got {ns}")
    tokens = words(text)
    weighted = [
        w * _entropy_bits(Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)))
        for n, w in zip(ns, weights, strict=True)
    ]
    return sum(weighted) / len(weighted)


def fluency(texts: Sequence[str]) -> float | None:
    """Mean `ngram_entropy` of `texts` (one record's generations); None without texts."""
    if not texts:
        return None
    return sum(ngram_entropy(t) for t in texts) / len(texts)
