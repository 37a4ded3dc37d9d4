"""dprpipe.search.hybrid_run against hand-worked fusions."""

from __future__ import annotations

import pytest

from dprpipe.search import hybrid_run

SPARSE = {"q": [("a", 10.0), ("b", 6.0), ("c", 2.0)]}
DENSE = {"q": [("b", 0.9), ("d", 0.5), ("a", 0.1)]}


def _approx(run):
    return {q: [(d, pytest.approx(s)) for d, s in hits] for q, hits in run.items()}


@pytest.mark.parametrize("weight, expected", [
    # min-max: sparse a 1, b .5, c 0; dense b 1, d .5, a 0; a missing doc gets the list's minimum, 0
    (1.0, [("b", 1.5), ("a", 1.0), ("d", 0.5), ("c", 0.0)]),
    # b .5 + 2*1; a 1 + 0 and d 0 + 2*.5 tie at 1.0 and are ordered by id
    (2.0, [("b", 2.5), ("a", 1.0), ("d", 1.0), ("c", 0.0)]),
    # weight 0: the sparse ranking, with the dense-only d at the sparse minimum
    (0.0, [("a", 1.0), ("b", 0.5), ("c", 0.0), ("d", 0.0)]),
])
def test_normalised_fusion_by_hand(weight, expected):
    assert hybrid_run(SPARSE, DENSE, weight, normalize=True) == _approx({"q": expected})


def test_raw_fusion_by_hand():
    # the paper's BM25 + 1.1 * dense on raw scores; missing docs get the raw minimum of the list
    # a 10 + 1.1*.1, b 6 + 1.1*.9, c 2 + 1.1*.1 (dense min), d 2 (sparse min) + 1.1*.5
    got = hybrid_run(SPARSE, DENSE, 1.1, normalize=False)
    assert got == _approx({"q": [("a", 10.11), ("b", 6.99), ("d", 2.55), ("c", 2.11)]})


def test_raw_fusion_with_negative_dense_scores():
    # the dense minimum is -3, not 0: a missing doc must not be lifted above a retrieved one
    sparse = {"q": [("x", 1.0), ("z", 0.5)]}
    dense = {"q": [("x", -1.0), ("y", -3.0)]}
    got = hybrid_run(sparse, dense, 1.0, normalize=False)
    # x 1 - 1, y .5 (sparse min) - 3, z .5 - 3 (dense min): y and z tie, by id
    assert got == _approx({"q": [("x", 0.0), ("y", -2.5), ("z", -2.5)]})


def test_depth_cuts_each_query():
    got = hybrid_run(SPARSE, DENSE, 1.0, normalize=True, depth=2)
    assert got == _approx({"q": [("b", 1.5), ("a", 1.0)]})


def test_queries_in_only_one_run_and_constant_lists():
    sparse = {"q1": [("a", 3.0), ("b", 1.0)], "q2": [("only", 7.0)]}
    dense = {"q3": [("c", 0.2), ("d", 0.6)], "q2": [("only", 0.3), ("e", 0.1)]}
    got = hybrid_run(sparse, dense, 1.0, normalize=True)
    assert list(got) == ["q1", "q2", "q3"]  # sorted query ids, the union of both runs
    assert got["q1"] == _approx({"q": [("a", 1.0), ("b", 0.0)]})["q"]
    assert got["q3"] == _approx({"q": [("d", 1.0), ("c", 0.0)]})["q"]
    # a one-hit list normalises to 1.0 and its minimum is that same 1.0: a constant that does
    # not change the dense order (only 1 + 1, e 1 + 0)
    assert got["q2"] == _approx({"q": [("only", 2.0), ("e", 1.0)]})["q"]


def test_empty_runs():
    assert hybrid_run({}, {}, 1.0, True) == {}
    assert hybrid_run({"q": []}, {"q": []}, 1.0, True) == {"q": []}
