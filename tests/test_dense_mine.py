"""dense_mine: exact top-k equals NumPy's argsort; negatives leave out gold, skipped ranks and the margin."""

import numpy as np
import pytest

from dprpipe.dense_mine import DenseMineConfig, exact_search, filter_negatives, mine_dense, positive_scores
from dprpipe.records import Query


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_exact_search_equals_numpy_argsort(block):
    rng = np.random.default_rng(0)
    p = rng.normal(size=(200, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    ids = [f"d{i}" for i in range(len(p))]
    got = exact_search(p, ids, q, 25, block=block)
    scores = q @ p.T
    for row, hits in zip(scores, got):
        want = np.argsort(-row, kind="stable")[:25]
        assert [d for d, _ in hits] == [ids[i] for i in want]
        np.testing.assert_allclose([s for _, s in hits], row[want], rtol=1e-6)


def test_exact_search_reads_a_memmap_and_caps_k(tmp_path):
    p = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(3, 2))
    p[:] = [[1, 0], [0, 1], [0.6, 0.8]]
    p.flush()
    hits = exact_search(np.load(tmp_path / "p.npy", mmap_mode="r"), ["a", "b", "c"],
                        np.array([[1, 0]], np.float32), 10, block=2)
    assert [d for d, _ in hits[0]] == ["a", "c", "b"]


def test_gold_and_answer_passages_are_never_negatives():
    q = Query("q", "who", answers=("Paris",), relevant={"p": 1, "n": 0})
    ranked = [("p", 0.9), ("x", 0.8), ("n", 0.7), ("y", 0.6)]
    texts = {"x": "born in Paris", "n": "nothing", "y": "London"}
    negs = filter_negatives(q, ranked, 0.9, DenseMineConfig(), texts.__getitem__)
    assert negs == [("n", 0.7), ("y", 0.6)]   # grade 0 is judged non-relevant: a negative


def test_margin_is_relative_to_the_best_positive():
    q = Query("q", "x", relevant={"p": 1, "p2": 1})
    q_emb = np.array([[1.0, 0.0]], np.float32)
    p_emb = np.array([[0.5, 0.0], [1.0, 0.0], [0.95, 0.0], [0.85, 0.0]], np.float32)
    ids = ["p", "p2", "a", "b"]
    best = positive_scores([q], q_emb, p_emb, {d: i for i, d in enumerate(ids)})
    assert best == [1.0]
    negs = mine_dense([q], q_emb, lambda e, k: exact_search(p_emb, ids, e, k), best,
                      DenseMineConfig(relative_margin=0.1))
    assert negs == {"q": [("b", pytest.approx(0.85))]}


def test_a_question_without_a_positive_in_the_corpus_has_no_margin():
    q = Query("q", "x", relevant={"gone": 1})
    assert positive_scores([q], np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), {"a": 0}) == [None]
    assert filter_negatives(q, [("a", 5.0)], None, DenseMineConfig(relative_margin=0.5)) == [("a", 5.0)]


def test_config_is_checked():
    with pytest.raises(ValueError, match="relative_margin"):
        DenseMineConfig(relative_margin=1.0)
    with pytest.raises(ValueError, match="depth"):
        DenseMineConfig(depth=0)
