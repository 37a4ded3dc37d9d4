"""has_answer and dpr_tokens against DPR's qa_validation.py semantics; the BM25 Analyzer."""

import unicodedata

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dprpipe.text import Analyzer, dpr_tokens, has_answer

# ---------------------------------------------------------------- a reference of DPR's has_answer
# Written from DPR's documented behaviour (dpr/data/qa_validation.py and dpr/utils/tokenizers.py):
# NFD-normalise, tokenise with SimpleTokenizer's regex (compiled with IGNORECASE | UNICODE |
# MULTILINE), lowercase each token; an answer matches when its tokens are a contiguous window of
# the text's. Regex mode compiles each NFD answer with the `regex` module, case-insensitively;
# a pattern that does not compile is no match.

_REF_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                           flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)


def ref_tokens(text):
    return [m.group().lower() for m in _REF_TOKEN.finditer(text)]


def ref_has_answer(answers, text, match_type="string"):
    text = unicodedata.normalize("NFD", text)
    if match_type == "string":
        words = ref_tokens(text)
        for answer in answers:
            ans = ref_tokens(unicodedata.normalize("NFD", answer))
            for i in range(0, len(words) - len(ans) + 1):
                if ans == words[i:i + len(ans)]:
                    return True
    elif match_type == "regex":
        for answer in answers:
            try:
                pattern = regex.compile(unicodedata.normalize("NFD", answer),
                                        flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)
            except BaseException:
                continue
            if pattern.search(text) is not None:
                return True
    return False


def ours_expected(answers, text, match_type="string"):
    """DPR's result, except that answers with no tokens (or empty patterns) never match here."""
    if match_type == "string":
        answers = [a for a in answers if ref_tokens(unicodedata.normalize("NFD", a))]
    else:
        answers = [a for a in answers if a]
    return ref_has_answer(answers, text, match_type)


# ---------------------------------------------------------------- hand-checked cases

CAFE_NFC = "Caf\u00e9"          # é as one code point
CAFE_NFD = "Cafe\u0301"         # e + combining acute accent

STRING_CASES = [
    # (answers, text, expected)
    (["U.S."], "He moved to the U.S. in 1990.", True),
    (["U.S"], "He moved to the U.S. in 1990.", True),       # u . s is a window of u . s .
    (["U.S."], "He moved to the U.S in 1990.", False),      # the final '.' is a token
    (["US"], "He moved to the U.S. in 1990.", False),
    (["new york"], "NEW YORK city", True),                 # case-insensitive
    (["New York"], "new-york", False),                     # '-' is a token between them
    (["New York"], "new\nyork", True),                      # any whitespace separates tokens
    ([CAFE_NFC], f"the {CAFE_NFD} on the corner", True),    # composed vs decomposed: equal after NFD
    ([CAFE_NFD], f"the {CAFE_NFC} on the corner", True),
    (["Cafe"], f"the {CAFE_NFC} on the corner", False),      # NFD keeps the accent as a mark
    ([CAFE_NFC], "the Cafe on the corner", False),
    (["the Beatles"], "A Beatles song", False),             # articles are not stripped
    (["Beatles"], "the Beatles", True),
    (["York"], "Yorkshire pudding", False),                 # whole tokens only
    (["Yorkshire"], "York shire", False),
    (["1,000"], "about 1,000 people", True),
    (["1000"], "about 1,000 people", False),                # 1 , 000 is three tokens
    (["1,000"], "about 1000 people", False),
    (["1,000"], "about 1, 000 people", True),               # spaces are not tokens
    (["3.14"], "pi is 3.14159", False),
    (["Paris", "London"], "He lives in London.", True),     # any answer
    (["Paris", "London"], "He lives in Rome.", False),
    (["O'Neil"], "Shaquille O'Neil scored", True),
    (["O'Neil"], "Shaquille O\u2019Neil scored", False),    # a different apostrophe
    (["été"], "ÉTÉ 2020", True),                            # lowercasing of accented capitals
]


@pytest.mark.parametrize("answers,text,expected", STRING_CASES)
def test_has_answer_string_mode(answers, text, expected):
    assert ref_has_answer(answers, text) is expected  # the reference agrees with the hand check
    assert has_answer(answers, text) is expected


def test_title_is_not_part_of_the_text():
    # has_answer sees only what it is given; the callers pass passage text without the title
    assert not has_answer(["Einstein"], "He developed relativity.")


@pytest.mark.parametrize("answers", [[""], ["   "], ["\t\n"], ["", "   "]])
def test_empty_answer_matches_nothing(answers):
    # deliberate difference from DPR, where an answer without tokens matches every passage
    assert ref_has_answer(answers, "any passage at all") is True
    assert has_answer(answers, "any passage at all") is False
    assert has_answer(answers, "") is False


def test_empty_answer_does_not_hide_a_real_one():
    assert has_answer(["", "Paris"], "in Paris") is True


def test_no_answers():
    assert has_answer([], "anything") is False


REGEX_CASES = [
    (["new\\s+york"], "NEW   YORK city", True),               # case-insensitive
    (["^york"], "new\nyork", True),                           # MULTILINE
    (["(unclosed"], "(unclosed", False),                      # does not compile: no match
    (["(unclosed", "clos"], "(unclosed", True),               # the next pattern still counts
    (["[0-9]{4}"], "in 1990", True),
    (["[0-9]{4}"], "in 199", False),
    (["\\p{Lu}ondon"], "in London", True),                    # `regex` syntax, as DPR uses
    ([CAFE_NFC], f"a {CAFE_NFD}", True),                      # both sides NFD-normalised
    (["Cafe"], f"a {CAFE_NFC}", True),                        # 'Cafe' is a prefix of 'Cafe\u0301'
    (["York\\b"], "Yorkshire", False),
    (["Cafe\\b"], f"a {CAFE_NFC}", False),                    # the combining mark is a word char
]


@pytest.mark.parametrize("answers,text,expected", REGEX_CASES)
def test_has_answer_regex_mode(answers, text, expected):
    assert ref_has_answer(answers, text, "regex") is expected
    assert has_answer(answers, text, "regex") is expected


def test_empty_regex_matches_nothing():
    assert ref_has_answer([""], "text", "regex") is True   # DPR
    assert has_answer([""], "text", "regex") is False


def test_unknown_match_mode_raises():
    with pytest.raises(ValueError, match="'fuzzy'"):
        has_answer(["a"], "a", "fuzzy")


# ---------------------------------------------------------------- generated cases

# Letters (ASCII, accented, capital), combining marks, digits, punctuation, spaces, a
# non-breaking space, a zero-width joiner (a format character, \p{C}) and a CJK character.
ALPHABET = list("abcAB eé\u00c9\u0301\u0308 0 1 ,.-'\"!?\u00a0\u200d\t\n\u4e16") + ["ß", "İ", "ﬁ"]
texts = st.text(alphabet=ALPHABET, max_size=30)


@st.composite
def text_and_answers(draw):
    text = draw(texts)
    answers = []
    for _ in range(draw(st.integers(0, 3))):
        if text and draw(st.booleans()):  # a slice of the text: often a real match
            i = draw(st.integers(0, len(text) - 1))
            j = draw(st.integers(i, len(text)))
            answer = text[i:j]
            if draw(st.booleans()):
                answer = answer.upper()
            if draw(st.booleans()):
                answer = unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD", "NFKC"])), answer)
        else:
            answer = draw(texts)
        answers.append(answer)
    return answers, text


@settings(max_examples=400, deadline=None)
@given(text_and_answers())
@example(([CAFE_NFC], CAFE_NFD))
@example((["a.b"], "A . B"))
@example((["", "ab"], "ab"))
def test_has_answer_string_equals_reference(case):
    answers, text = case
    assert has_answer(answers, text) == ours_expected(answers, text)


@settings(max_examples=300, deadline=None)
@given(text_and_answers())
@example((["(", "a"], "ab"))
@example((["[", "*"], "[*"))
def test_has_answer_regex_equals_reference(case):
    answers, text = case
    assert has_answer(answers, text, "regex") == ours_expected(answers, text, "regex")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_dpr_tokens_equal_reference_on_any_unicode(text):
    assert dpr_tokens(text) == ref_tokens(unicodedata.normalize("NFD", text))


def test_dpr_tokens_hand_example():
    assert dpr_tokens("Don't stop, U.S.!") == ["don", "'", "t", "stop", ",", "u", ".", "s", ".", "!"]
    assert dpr_tokens(CAFE_NFC) == ["cafe\u0301"]


# ---------------------------------------------------------------- Analyzer


def test_analyzer_drops_stop_words_and_stems():
    assert Analyzer()("The running of the Dogs is not stopping") == ["run", "dog", "stop"]


@pytest.mark.parametrize("word,stem", [("running", "run"), ("cats", "cat"), ("relational", "relat"),
                                       ("generalization", "gener"), ("caresses", "caress")])
def test_porter_stems(word, stem):
    assert Analyzer()(word) == [stem]


def test_analyzer_options():
    text = "The Running dogs"
    assert Analyzer(stemmer="none")(text) == ["running", "dogs"]
    assert Analyzer(stopwords=False, stemmer="none")(text) == ["the", "running", "dogs"]
    assert Analyzer(lowercase=False, stopwords=False, stemmer="none")(text) == ["The", "Running", "dogs"]
    assert Analyzer(stopwords=False)(text) == ["the", "run", "dog"]


def test_analyzer_splits_on_non_word_characters():
    assert Analyzer(stemmer="none")("IL-6 levels, (p<0.05)") == ["il", "6", "levels", "p", "0", "05"]


def test_unknown_stemmer_raises_naming_it():
    with pytest.raises(ValueError, match="klingon"):
        Analyzer(stemmer="klingon")
