"""BM25Index against the reference rank_bm25.BM25Okapi, and `topk` tie behaviour."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_bm25 import BM25Okapi

from dprpipe.bm25 import BM25Index, BM25Params, topk

# "common" is in 5 of 7 documents (more than half): its raw idf is negative and both
# implementations must floor it at epsilon * mean idf. The last document is empty.
#
# One known difference: with b = 1 an empty document has a zero length norm, and rank_bm25
# computes 0 / 0 = nan for it; BM25Index gives it 0 (it contains no query term).
CORPUS = [
    ["common", "apple", "banana", "apple"],
    ["common", "cherry"],
    ["common", "apple", "durian", "elder", "fig", "grape"],
    ["banana", "banana", "banana"],
    ["common", "common", "grape"],
    ["common", "fig", "kiwi", "lemon", "mango", "apple", "cherry", "durian"],
    [],
]

QUERIES = [
    ["apple"],
    ["common"],                             # only the floored term
    ["apple", "apple", "banana"],           # a repeated token counts once per repeat
    ["common", "common", "kiwi", "common"],
    ["zzz"],                                # unknown token: all zero
    ["zzz", "banana", "yyy", "banana"],     # unknown tokens mixed in
    [],
    ["grape", "fig", "lemon", "mango", "cherry", "durian", "elder", "kiwi"],
]

PARAMS = [
    BM25Params(),                             # rank_bm25's defaults
    BM25Params(k1=0.9, b=0.4, epsilon=0.25),  # the project's defaults
    BM25Params(k1=1.2, b=0.0, epsilon=0.5),   # no length normalisation
    BM25Params(k1=2.0, b=1.0, epsilon=0.0),   # full length normalisation, floor at zero
    BM25Params(k1=0.5, b=0.3, epsilon=1.0),
]


def reference(corpus, params):
    return BM25Okapi(corpus, k1=params.k1, b=params.b, epsilon=params.epsilon)


def assert_scores_match(ours, ref, corpus):
    """np.allclose to the reference; where it is nan (an empty document at b = 1), ours is 0."""
    nan = np.isnan(ref)
    assert all(len(corpus[i]) == 0 for i in np.flatnonzero(nan)), "nan only for empty documents"
    assert np.all(ours[nan] == 0)
    assert np.allclose(ours[~nan], ref[~nan], rtol=1e-9, atol=1e-12), (ours, ref)


def test_corpus_really_has_a_negative_idf():
    n = len(CORPUS)
    df = sum("common" in d for d in CORPUS)
    assert math.log(n - df + 0.5) - math.log(df + 0.5) < 0
    ref = reference(CORPUS, BM25Params())
    index = BM25Index(CORPUS, BM25Params())
    floored = 0.25 * ref.average_idf
    assert ref.idf["common"] == pytest.approx(floored)
    assert index.idf[index.vocab["common"]] == pytest.approx(floored)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"k1={p.k1},b={p.b},eps={p.epsilon}")
@pytest.mark.parametrize("query", QUERIES, ids=lambda q: " ".join(q) or "<empty>")
def test_scores_equal_rank_bm25(params, query):
    with np.errstate(invalid="ignore"):
        ref = reference(CORPUS, params).get_scores(query)
    ours = BM25Index(CORPUS, params).get_scores(query)
    assert ours.shape == (len(CORPUS),)
    assert np.isnan(ref).any() == (params.b == 1.0 and len(query) > 0)  # the reference's 0 / 0
    assert_scores_match(ours, ref, CORPUS)


def test_repeated_query_token_counts_twice():
    index = BM25Index(CORPUS)
    once, twice = index.get_scores(["banana"]), index.get_scores(["banana", "banana"])
    assert np.any(once > 0)
    assert np.allclose(twice, 2 * once)


def test_unknown_tokens_score_zero():
    index = BM25Index(CORPUS)
    assert np.array_equal(index.get_scores(["zzz", "qqq"]), np.zeros(len(CORPUS)))
    assert np.allclose(index.get_scores(["zzz", "apple"]), index.get_scores(["apple"]))


tokens = st.sampled_from(["a", "b", "c", "d", "e", "f", "g"])
corpora = st.lists(st.lists(tokens, max_size=8), min_size=1, max_size=12).filter(
    lambda c: any(c))  # rank_bm25 divides by the vocabulary size


@settings(max_examples=150, deadline=None)
@given(corpus=corpora, queries=st.lists(st.lists(st.sampled_from(["a", "b", "c", "z"]), max_size=5),
                                        min_size=1, max_size=4),
       k1=st.floats(0.1, 3.0), b=st.floats(0.0, 1.0), epsilon=st.floats(0.0, 1.0))
def test_scores_equal_rank_bm25_on_random_corpora(corpus, queries, k1, b, epsilon):
    params = BM25Params(k1=k1, b=b, epsilon=epsilon)
    ref = reference(corpus, params)
    index = BM25Index(corpus, params)
    for q in queries:
        with np.errstate(invalid="ignore"):
            expected = ref.get_scores(q)
        assert_scores_match(index.get_scores(q), expected, corpus)


def _check_top_k(idx, scores, ref_scores, k):
    """Top-k against a numpy argsort of the reference scores, up to exact ties."""
    k = min(k, len(ref_scores))
    order = np.argsort(-ref_scores, kind="stable")[:k]
    assert idx.shape == scores.shape == (k,)
    # the score sequence is the reference's sorted scores
    assert np.allclose(scores, ref_scores[order], rtol=1e-9, atol=1e-12)
    # the scores really are the scores of the returned documents
    assert np.allclose(ref_scores[idx], scores, rtol=1e-9, atol=1e-12)
    # where a score is not tied with any other document, the document is the reference's
    for rank, d in enumerate(order):
        if np.sum(np.isclose(ref_scores, ref_scores[d], rtol=1e-9, atol=1e-12)) == 1:
            assert idx[rank] == d, (rank, idx, order)


@pytest.mark.parametrize("params", PARAMS[:3], ids=lambda p: f"k1={p.k1},b={p.b},eps={p.epsilon}")
@pytest.mark.parametrize("k", [1, 3, 7, 20])
@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_search_matches_argsort_of_rank_bm25(params, k, batch_size):
    ref = reference(CORPUS, params)
    idx, scores = BM25Index(CORPUS, params).search(QUERIES, k, batch_size=batch_size)
    assert idx.shape == scores.shape == (len(QUERIES), min(k, len(CORPUS)))
    for n, q in enumerate(QUERIES):
        _check_top_k(idx[n], scores[n], ref.get_scores(q), k)


@settings(max_examples=80, deadline=None)
@given(corpus=corpora, query=st.lists(st.sampled_from(["a", "b", "c", "z"]), min_size=1, max_size=4),
       k=st.integers(1, 15))
def test_search_matches_argsort_on_random_corpora(corpus, query, k):
    ref = BM25Okapi(corpus, k1=0.9, b=0.4)
    idx, scores = BM25Index(corpus, BM25Params(k1=0.9, b=0.4)).search([query], k)
    _check_top_k(idx[0], scores[0], ref.get_scores(query), k)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("batch_size", [None, 1, 5, 64])
def test_search_is_the_same_on_any_threads_and_batches(threads, batch_size):
    # enough queries for several blocks; the result must not depend on how they are split
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    corpus = [list(rng.choice(words, rng.integers(0, 12))) for _ in range(60)]
    queries = [list(rng.choice(words + ["zzz"], rng.integers(0, 6))) for _ in range(37)]
    index = BM25Index(corpus, BM25Params(k1=0.9, b=0.4))
    ref = reference(corpus, BM25Params(k1=0.9, b=0.4))
    idx, scores = index.search(queries, 10, batch_size=batch_size, threads=threads)
    base_idx, base_scores = index.search(queries, 10, batch_size=1, threads=1)
    assert np.array_equal(idx, base_idx) and np.array_equal(scores, base_scores)
    for n, q in enumerate(queries):
        _check_top_k(idx[n], scores[n], ref.get_scores(q), 10)


def test_search_k_zero_and_k_beyond_corpus():
    index = BM25Index(CORPUS)
    idx, scores = index.search(QUERIES, 0)
    assert idx.shape == scores.shape == (len(QUERIES), 0)
    idx, scores = index.search(QUERIES, 100)
    assert idx.shape == (len(QUERIES), len(CORPUS))
    assert all(sorted(row) == list(range(len(CORPUS))) for row in idx.tolist())


def test_search_no_queries():
    idx, scores = BM25Index(CORPUS).search([], 5)
    assert idx.shape == scores.shape == (0, 5)


def test_vocabulary_in_first_seen_order():
    index = BM25Index([["b", "a", "b"], ["c", "a"]])
    assert index.vocab == {"b": 0, "a": 1, "c": 2}


def test_search_breaks_ties_by_position():
    # documents 1, 2 and 4 are identical, so they tie for every query
    corpus = [["x"], ["apple", "pie"], ["apple", "pie"], ["pie"], ["apple", "pie"], ["y"], ["z"], ["w"]]
    idx, scores = BM25Index(corpus).search([["apple"]], 2)
    assert idx[0].tolist() == [1, 2]
    assert scores[0, 0] == scores[0, 1] > 0


# ---------------------------------------------------------------- topk


def test_topk_hand_example():
    s = np.array([[1.0, 3.0, 3.0, 3.0, 2.0],
                  [5.0, 0.0, 5.0, 1.0, 5.0]])
    idx, top = topk(s, 2)
    assert idx.tolist() == [[1, 2], [0, 2]]
    assert top.tolist() == [[3.0, 3.0], [5.0, 5.0]]
    idx, top = topk(s, 4)
    assert idx.tolist() == [[1, 2, 3, 4], [0, 2, 4, 3]]
    assert top.tolist() == [[3.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 1.0]]


def test_topk_k_larger_than_row_is_clipped():
    idx, top = topk(np.array([[0.5, 2.0, 1.0]]), 10)
    assert idx.tolist() == [[1, 2, 0]]
    assert top.tolist() == [[2.0, 1.0, 0.5]]


def test_topk_k_zero_and_empty_rows():
    idx, top = topk(np.ones((3, 4)), 0)
    assert idx.shape == top.shape == (3, 0)
    idx, top = topk(np.ones((0, 4)), 2)
    assert idx.shape == top.shape == (0, 2)


def test_topk_does_not_merge_nearly_equal_scores():
    # differences far below float32 resolution still order the documents
    s = np.array([[1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0 + 2e-12, 0.5]])
    assert topk(s, 3)[0].tolist() == [[3, 1, 0]]


def test_topk_all_equal_keeps_position_order():
    idx, _ = topk(np.zeros((2, 50)), 7)
    assert idx.tolist() == [list(range(7))] * 2


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 40), k=st.integers(1, 45), data=st.data())
def test_topk_equals_stable_sort_with_many_ties(rows, n, k, data):
    # few distinct values, so the cut at k usually falls inside a run of ties
    values = data.draw(st.lists(st.lists(st.sampled_from([0.0, 1.0, 2.5, 3.0]), min_size=n, max_size=n),
                                min_size=rows, max_size=rows))
    s = np.array(values)
    idx, top = topk(s, k)
    for r in range(rows):
        # reference: sort by score descending, then by position ascending
        expected = sorted(range(n), key=lambda j: (-s[r, j], j))[:k]
        assert idx[r].tolist() == expected
        assert top[r].tolist() == [s[r, j] for j in expected]


def test_empty_corpus_raises():
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index([])
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index(iter(()))


@pytest.mark.parametrize("k1,b", [(-0.1, 0.5), (1.0, -0.1), (1.0, 1.5)])
def test_bad_params_raise(k1, b):
    with pytest.raises(ValueError, match="k1"):
        BM25Params(k1=k1, b=b)
