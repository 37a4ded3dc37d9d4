"""Retrieval metrics against hand-worked examples (trec_eval definitions, linear gain)."""

import pytest

from dprpipe.records import Passage, Query
from dprpipe.evaluate import (EvaluateConfig, evaluate_run, evaluate_runs, first_answer_rank, mrr_at_k,
                              ndcg_at_k, recall_at_k, recall_curve)

# One ranking used by several tests: d2 (grade 2) at rank 2, d4 (grade 1) at rank 4, and d9
# (grade 1) judged but not retrieved.
RANKED = ["d1", "d2", "d3", "d4"]
GRADES = {"d2": 2, "d4": 1, "d9": 1}


def test_ndcg_graded_hand_worked():
    # DCG@10  = 2/log2(1+2) + 1/log2(1+4)             = 2/1.58496 + 1/2.32193 = 1.26186 + 0.43068 = 1.69254
    # IDCG@10 = 2/log2(2) + 1/log2(3) + 1/log2(4)      = 2 + 0.63093 + 0.5                       = 3.13093
    # nDCG@10 = 1.69254 / 3.13093                                                                = 0.54059
    assert ndcg_at_k(RANKED, GRADES, 10) == pytest.approx(0.54059, abs=1e-5)


def test_ndcg_cutoff():
    # @2: DCG = 2/log2(3) = 1.26186; IDCG = 2/log2(2) + 1/log2(3) = 2.63093; nDCG = 0.47962
    assert ndcg_at_k(RANKED, GRADES, 2) == pytest.approx(0.47962, abs=1e-5)
    # @1: d1 is not relevant, DCG = 0
    assert ndcg_at_k(RANKED, GRADES, 1) == 0.0


def test_ndcg_gain_is_linear_not_exponential():
    # one document of grade 3 at rank 2, one of grade 1 at rank 1:
    # DCG = 1/log2(2) + 3/log2(3) = 1 + 1.89279 = 2.89279; IDCG = 3 + 1/log2(3) = 3.63093
    # nDCG = 0.79671 (with 2^g - 1 gains it would be (1 + 7*0.63093)/(7 + 0.63093) = 0.70981)
    assert ndcg_at_k(["low", "high"], {"high": 3, "low": 1}, 10) == pytest.approx(0.79671, abs=1e-5)


def test_ndcg_perfect_and_empty():
    assert ndcg_at_k(["d2", "d4", "d9"], GRADES, 10) == pytest.approx(1.0)
    assert ndcg_at_k([], GRADES, 10) == 0.0
    assert ndcg_at_k(RANKED, {}, 10) == 0.0


def test_mrr_hand_worked():
    assert mrr_at_k(RANKED, GRADES, 10) == 0.5        # first relevant at rank 2
    assert mrr_at_k(RANKED, GRADES, 1) == 0.0         # not within the cutoff
    assert mrr_at_k(["x", "y", "d4"], GRADES, 3) == pytest.approx(1 / 3)
    assert mrr_at_k(["x"] * 10 + ["d2"], GRADES, 10) == 0.0  # rank 11 is past @10


def test_recall_hand_worked():
    # 3 relevant documents: d2, d4, d9
    assert recall_at_k(RANKED, GRADES, 1) == 0.0
    assert recall_at_k(RANKED, GRADES, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, GRADES, 4) == pytest.approx(2 / 3)
    assert recall_at_k(RANKED, GRADES, 100) == pytest.approx(2 / 3)  # d9 never retrieved


def test_grade_zero_is_not_relevant():
    rel = {"a": 0, "b": 1}
    ranked = ["a", "b"]
    assert mrr_at_k(ranked, rel, 10) == 0.5                  # a does not count as a hit
    assert recall_at_k(ranked, rel, 1) == 0.0                # denominator is 1 (only b)
    assert recall_at_k(ranked, rel, 2) == 1.0
    assert ndcg_at_k(ranked, rel, 10) == pytest.approx(0.63093, abs=1e-5)  # 1/log2(3) / 1
    assert recall_at_k(["a"], {"a": 0}, 1) == 0.0


def q(qid, relevant=None, answers=()):
    return Query(qid, f"question {qid}", tuple(answers), relevant or {})


def test_evaluate_run_averages_and_missing_queries_count_zero():
    queries = [q("q1", {"a": 1}), q("q2", {"b": 1}), q("q3", {"c": 1, "d": 1}),
               q("q4", {"z": 0})]                           # no relevant document: not averaged
    run = {
        "q1": [("a", 9.0), ("x", 1.0)],                    # perfect
        "q3": [("x", 5.0), ("d", 4.0), ("c", 3.0)],        # ranks 2 and 3
        # q2 is missing from the run: it scores 0 everywhere
        "q4": [("z", 1.0)],
    }
    m = evaluate_run(run, queries, ks=(1, 3))
    assert m["queries"] == 3
    # nDCG@10: q1 = 1; q2 = 0; q3 = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3) = 1.13093 / 1.63093 = 0.69343
    assert m["ndcg@10"] == pytest.approx((1 + 0 + 0.69343) / 3, abs=1e-5)
    # MRR@10: 1, 0, 1/2
    assert m["mrr@10"] == pytest.approx(1.5 / 3)
    # Recall@1: 1, 0, 0; Recall@3: 1, 0, 1
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert not any(k.startswith("accuracy") for k in m)


def test_evaluate_run_uses_run_order_not_scores():
    # ranks come from the order of the run (best first), as written by the retrievers
    m = evaluate_run({"q": [("x", 0.1), ("a", 0.9)]}, [q("q", {"a": 1})], ks=(1,))
    assert m["mrr@10"] == 0.5


def test_accuracy_at_k_with_answers():
    texts = {"p1": "Nothing here.", "p2": "Paris is the capital.", "p3": "It is in France.",
             "p4": "No answer in the text."}
    queries = [q("q1", answers=["Paris"]), q("q2", answers=["France", "Gaul"]), q("q3", answers=["Rome"]),
               q("q4", answers=["paris"])]
    run = {"q1": [("p1", 3.0), ("p4", 2.0), ("p2", 1.0)],   # first answer at rank 3
           "q2": [("p3", 1.0)],                            # rank 1
           "q3": [("p1", 1.0), ("p2", 0.5)],               # never
           # q4 missing from the run: a miss
           }
    m = evaluate_run(run, queries, ks=(1, 2, 3, 5), text_of=texts.__getitem__)
    # hits: q1 at rank 3, q2 at rank 1, q3 none, q4 none (4 questions)
    assert m["accuracy@1"] == 0.25
    assert m["accuracy@2"] == 0.25
    assert m["accuracy@3"] == 0.5
    assert m["accuracy@5"] == 0.5
    assert m["queries"] == 4          # no judgements: the answered questions are counted
    assert "ndcg@10" not in m


def test_first_answer_rank():
    texts = {"a": "x", "b": "the answer is 42", "c": "42"}.__getitem__
    assert first_answer_rank(["a", "b", "c"], ["42"], texts) == 1
    assert first_answer_rank(["a"], ["42"], texts) is None
    assert first_answer_rank(["a", "c"], ["4\\d"], texts, "regex") == 1


def test_recall_curve():
    queries = [q("q1", {"a": 1, "b": 1}), q("q2", {"c": 1})]
    run = {"q1": [("a", 3.0), ("x", 2.0), ("b", 1.0)], "q2": [("x", 1.0), ("c", 0.5)]}
    # k=1: (1/2 + 0)/2 = 0.25; k=2: (1/2 + 1)/2 = 0.75; k=3: (1 + 1)/2 = 1
    assert recall_curve(run, queries, [1, 2, 3]) == pytest.approx([0.25, 0.75, 1.0])
    assert recall_curve(run, [q("q9")], [1, 2]) == [0.0, 0.0]


def test_evaluate_runs_shape_and_values():
    corpus = [Passage("a", "Paris", "The city of light."), Passage("b", "", "Paris is big."),
              Passage("c", "", "Rome.")]
    queries = [q("q1", {"a": 1}, answers=["Paris"]), q("q2", {"c": 2}, answers=["Rome"])]
    runs = {"bm25": {"q1": [("a", 2.0), ("b", 1.0)], "q2": [("c", 1.0)]},
            "dense": {"q1": [("b", 2.0), ("a", 1.0)]}}
    cfg = EvaluateConfig(ks=(1, 2), curve_ks=(1, 2, 5))
    metrics, curve = evaluate_runs(runs, queries, corpus, cfg)
    assert list(metrics) == ["bm25", "dense"]
    expected_keys = {"ndcg@10", "mrr@10", "recall@1", "recall@2", "accuracy@1", "accuracy@2", "queries"}
    assert set(metrics["bm25"]) == set(metrics["dense"]) == expected_keys
    assert metrics["bm25"]["ndcg@10"] == 1.0
    assert metrics["bm25"]["queries"] == 2
    # bm25 q1: a's title is "Paris" but its text is not, b's text is: first answer at rank 2
    assert metrics["bm25"]["accuracy@1"] == 0.5   # q2 hit at rank 1, q1 not yet
    assert metrics["bm25"]["accuracy@2"] == 1.0
    # dense: q1 relevant a at rank 2, q2 missing.
    # nDCG@10 = (1/log2(3) + 0)/2 = 0.31546 -> rounded to 4 decimals
    assert metrics["dense"]["ndcg@10"] == 0.3155
    assert metrics["dense"]["mrr@10"] == 0.25
    assert metrics["dense"]["accuracy@1"] == 0.5  # b contains Paris at rank 1; q2 missing
    assert list(curve) == [1, 2, 5]
    assert curve == {1: {"bm25": 1.0, "dense": 0.0}, 2: {"bm25": 1.0, "dense": 0.5},
                     5: {"bm25": 1.0, "dense": 0.5}}


def test_docstring_examples():
    import doctest

    import dprpipe.evaluate as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
