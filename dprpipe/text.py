"""Text processing: the BM25 analyzer and DPR's answer matching (`has_answer`).

- `Analyzer`: lowercase, split on word characters, drop English stop words (Lucene's list,
  the one Elasticsearch's `english` analyzer uses, as in BEIR's BM25), Porter-stem.
- `has_answer`: DPR's `dpr/data/qa_validation.py` semantics. Text and answers are NFD
  normalised and tokenised with `([\\p{L}\\p{N}\\p{M}]+)|([^\\p{Z}\\p{C}])`, lowercased; an answer
  matches when its tokens are a contiguous window of the passage's tokens. Articles and
  punctuation are *not* stripped (that is SQuAD's exact match, not DPR's retrieval accuracy).
  Regex mode searches each answer as a case-insensitive pattern; a bad pattern never matches.
  One deliberate difference: an empty answer matches nothing (in DPR it matches everything).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

# Lucene's EnglishAnalyzer stop set (also Elasticsearch's `_english_`).
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)

_WORD = regex.compile(r"\w+", regex.UNICODE)
_DPR_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", regex.UNICODE)


@dataclass(frozen=True)
class Analyzer:
    """BM25 tokenisation. `stemmer` is a Snowball algorithm name ('porter', 'english') or 'none'."""

    lowercase: bool = True
    stopwords: bool = True
    stemmer: str = "porter"

    def __post_init__(self):
        if self.stemmer != "none":
            _stemmer(self.stemmer)  # fail now, naming the value, not deep inside mining

    def __call__(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        tokens = _WORD.findall(text)
        if self.stopwords:
            tokens = [t for t in tokens if t not in ENGLISH_STOPWORDS]
        if self.stemmer != "none":
            tokens = _stem(self.stemmer, tokens)
        return tokens


# Words repeat (Zipf): a dict lookup per token is ~2x faster than stemming every token, even
# with PyStemmer's own cache. Bounded, so a huge vocabulary cannot grow it without limit
# (words past the bound are stemmed every time, which gives the same stems).
_STEM_CACHE_SIZE = 1 << 18


def _stem(name: str, tokens: list[str]) -> list[str]:
    cache = _stem_cache(name)
    missing = [t for t in set(tokens) if t not in cache]
    if missing:
        stems = _stemmer(name).stemWords(missing)
        if len(cache) + len(missing) <= _STEM_CACHE_SIZE:
            cache.update(zip(missing, stems))
        else:
            local = dict(zip(missing, stems))
            return [cache[t] if t in cache else local[t] for t in tokens]
    return [cache[t] for t in tokens]


@lru_cache(maxsize=None)
def _stem_cache(name: str) -> dict[str, str]:
    return {}


@lru_cache(maxsize=None)
def _stemmer(name: str):
    import Stemmer  # PyStemmer: the C Snowball stemmers, ~50x faster than NLTK's

    if name not in Stemmer.algorithms():
        raise ValueError(f"unknown stemmer {name!r}; expected 'none' or one of {sorted(Stemmer.algorithms())}")
    return Stemmer.Stemmer(name)


def dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer words, uncased, after NFD normalisation.

    >>> dpr_tokens("Don't stop!")
    ['don', "'", 't', 'stop', '!']
    """
    text = unicodedata.normalize("NFD", text)
    return [m.group().lower() for m in _DPR_TOKEN.finditer(text)]


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i:i + n]) == list(needle):
            return True
    return False


def has_answer(answers: Iterable[str], text: str, match: str = "string") -> bool:
    """True when any answer occurs in `text` under DPR's matching rules.

    >>> has_answer(["New York"], "He moved to new york city.")
    True
    >>> has_answer(["the Beatles"], "A Beatles song")
    False
    """
    if match == "string":
        tokens = dpr_tokens(text)
        return any(_contains(tokens, dpr_tokens(a)) for a in answers)
    if match == "regex":
        text = unicodedata.normalize("NFD", text)
        for pattern in answers:
            if not pattern:
                continue  # an empty pattern would match every passage
            try:
                # the `regex` module, as DPR's qa_validation.py (`import regex as re`) uses
                compiled = regex.compile(unicodedata.normalize("NFD", pattern),
                                         flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
            except Exception:
                continue  # DPR: a pattern that does not compile never matches
            if compiled.search(text):
                return True
        return False
    raise ValueError(f"unknown answer match {match!r}; expected 'string' or 'regex'")
