"""Retrieval metrics: hand-worked examples, then every reported metric against pytrec_eval.

The reference is BEIR's `EvaluateRetrieval.evaluate` restated over pytrec_eval (trec_eval):
identical query/document ids dropped first, per-query `ndcg_cut`, `recall` and `recip_rank`,
averaged over the queries pytrec_eval returns (judged and in the run). MRR@k is trec_eval's
`recip_rank` on the run cut to depth k, the cut made in trec_eval's own order.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dprpipe.evaluate import (EvaluateConfig, evaluate_run, evaluate_runs, first_answer_rank, missing_queries,
                              mrr_at_k, ndcg_at_k, rank, ranked_run, recall_at_k, recall_curve)
from dprpipe.io import read_run, write_run
from dprpipe.records import Passage, Query, read_queries
from dprpipe.search import hybrid_run

ROOT = Path(__file__).resolve().parents[1]

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


def test_rank_orders_by_score_then_docid_descending():
    hits = [("d1", 1.0), ("d10", 1.0), ("x", 0.5), ("d2", 1.0), ("B", 1.0), ("top", 3.0)]
    # equal scores: d2 > d10 > d1 > B as strings (byte order: upper case sorts before lower case)
    assert rank(hits) == ["top", "d2", "d10", "d1", "B", "x"]
    assert rank(list(reversed(hits))) == rank(hits)            # the order of the run's lines does not matter
    assert rank([("a", 1.0), ("b", 2.0), ("a", 3.0)]) == ["a", "b"]   # a twice: counted once, at 3.0
    assert rank([("q1", 9.0), ("d", 1.0)], qid="q1") == ["d"]
    assert rank([("q1", 9.0), ("d", 1.0)]) == ["q1", "d"]


def q(qid, relevant=None, answers=()):
    return Query(qid, f"question {qid}", tuple(answers), relevant or {})


def test_evaluate_run_averages_over_judged_queries_in_the_run():
    queries = [q("q1", {"a": 1}), q("q2", {"b": 1}), q("q3", {"c": 1, "d": 1}),
               q("q4", {"z": 0}),                           # judged, nothing relevant: scores 0
               q("q5")]                                     # no judgements: not averaged
    run = {
        "q1": [("a", 9.0), ("x", 1.0)],                    # perfect
        "q3": [("x", 5.0), ("d", 4.0), ("c", 3.0)],        # ranks 2 and 3
        # q2 is missing from the run: left out of the averages
        "q4": [("z", 1.0)],
        "q5": [("a", 1.0)],
    }
    m = evaluate_run(run, queries, ks=(1, 3))
    assert m["queries"] == 3                                # q1, q3, q4
    assert missing_queries(run, queries) == ["q2"]
    # nDCG@10: q1 = 1; q3 = (1/log2 3 + 1/log2 4) / (1 + 1/log2 3) = 1.13093 / 1.63093 = 0.69343; q4 = 0
    assert m["ndcg@10"] == pytest.approx((1 + 0.69343 + 0) / 3, abs=1e-5)
    # MRR@10: 1, 1/2, 0
    assert m["mrr@10"] == pytest.approx(1.5 / 3)
    # Recall@1: 1, 0, 0; Recall@3: 1, 1, 0
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert not any(k.startswith("accuracy") for k in m)


def test_evaluate_run_ranks_by_score_not_run_order():
    m = evaluate_run({"q": [("x", 0.1), ("a", 0.9)]}, [q("q", {"a": 1})], ks=(1,))
    assert m["mrr@10"] == 1.0 and m["recall@1"] == 1.0
    # a tie: "b" > "a", so b ranks first whatever the file order
    m = evaluate_run({"q": [("a", 1.0), ("b", 1.0)]}, [q("q", {"a": 1})], ks=(1,))
    assert m["mrr@10"] == 0.5 and m["recall@1"] == 0.0


def test_identical_ids_dropped_by_default():
    # ArguAna-like: the query is itself a document of the corpus and retrieves itself first
    queries = [q("q1", {"d1": 1})]
    run = {"q1": [("q1", 9.0), ("d1", 5.0)]}
    assert evaluate_run(run, queries, ks=(1,))["recall@1"] == 1.0
    assert evaluate_run(run, queries, ks=(1,), ignore_identical_ids=False)["recall@1"] == 0.0
    # a query whose only hit is itself is still in the run: it scores 0, not left out
    m = evaluate_run({"q1": [("q1", 9.0)], "q2": [("d2", 1.0)]}, [q("q1", {"d1": 1}), q("q2", {"d2": 1})], ks=(1,))
    assert m["queries"] == 2 and m["recall@1"] == 0.5


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
    # hits: q1 at rank 3, q2 at rank 1, q3 none, q4 none (4 questions: DPR counts a missing one as a miss)
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
    queries = [q("q1", {"a": 1, "b": 1}), q("q2", {"c": 1}), q("q3", {"d": 1})]   # q3 not in the run
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
    # dense: q1 relevant a at rank 2; q2 missing, so the judged metrics average over q1 alone.
    # nDCG@10 = 1/log2(3) = 0.63093 -> rounded to 4 decimals
    assert metrics["dense"]["queries"] == 1
    assert metrics["dense"]["ndcg@10"] == 0.6309
    assert metrics["dense"]["mrr@10"] == 0.5
    assert metrics["dense"]["accuracy@1"] == 0.5  # b contains Paris at rank 1; q2 missing is a miss
    assert list(curve) == [1, 2, 5]
    assert curve == {1: {"bm25": 1.0, "dense": 0.0}, 2: {"bm25": 1.0, "dense": 1.0},
                     5: {"bm25": 1.0, "dense": 1.0}}


def test_config_default_ignores_identical_ids():
    assert EvaluateConfig().ignore_identical_ids is True


# ---------------------------------------------------------------- against pytrec_eval

KS = tuple(sorted(set(EvaluateConfig().ks) | set(EvaluateConfig().curve_ks) | {2, 3}))


def trec_order(hits: dict[str, float]) -> list[tuple[str, float]]:
    """Score descending, then docid descending: two stable sorts, kept apart from `rank`'s code."""
    return sorted(sorted(hits.items(), key=lambda h: h[0], reverse=True), key=lambda h: h[1], reverse=True)


def reference(run, queries, ks, ignore_identical_ids=True):
    """Per-query and averaged metrics from pytrec_eval, as BEIR's EvaluateRetrieval computes them."""
    qrels = {x.id: dict(x.relevant) for x in queries if x.relevant}
    results = {qid: {d: s for d, s in hits if not (ignore_identical_ids and d == qid)} for qid, hits in run.items()}
    measures = {"ndcg_cut." + ",".join(map(str, ks)), "recall." + ",".join(map(str, ks)), "recip_rank"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(results)
    # MRR@10 as trec_eval sees it: recip_rank of the run cut to depth 10 (cut in trec_eval's order)
    cut = {qid: dict(trec_order(hits)[:10]) for qid, hits in results.items()}
    per_query_cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    for qid, scores in per_query.items():
        scores["mrr_10"] = per_query_cut[qid]["recip_rank"]
        # the same from the uncut run: 1/rank if the first relevant passage is within the top 10
        assert scores["mrr_10"] == (scores["recip_rank"] if scores["recip_rank"] >= 1 / 10 else 0.0)
    n = len(per_query)
    if not qrels:
        return per_query, {"queries": 0}

    def mean(key):
        return sum(s[key] for s in per_query.values()) / n if n else 0.0

    avg = {"ndcg@10": mean("ndcg_cut_10"), "mrr@10": mean("mrr_10"), "queries": n}
    avg.update({f"recall@{k}": mean(f"recall_{k}") for k in ks})
    return per_query, avg


def assert_matches_pytrec_eval(run, queries, ks=KS, ignore_identical_ids=True):
    per_query, want = reference(run, queries, ks, ignore_identical_ids)
    got = evaluate_run(run, queries, ks, ignore_identical_ids=ignore_identical_ids)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert recall_curve(run, queries, ks, ignore_identical_ids) == pytest.approx([want.get(f"recall@{k}", 0.0) for k in ks],
                                                                                 abs=1e-6)
    # query by query, so that a difference points at its query
    ranked = ranked_run(run, ignore_identical_ids)
    relevant = {x.id: x.relevant for x in queries}
    for qid, scores in per_query.items():
        for k in ks:
            assert ndcg_at_k(ranked[qid], relevant[qid], k) == pytest.approx(scores[f"ndcg_cut_{k}"], abs=1e-6), (qid, k)
            assert recall_at_k(ranked[qid], relevant[qid], k) == pytest.approx(scores[f"recall_{k}"], abs=1e-6)
        assert mrr_at_k(ranked[qid], relevant[qid], 10) == pytest.approx(scores["mrr_10"], abs=1e-6), qid
    return got


def test_tie_order_is_pytrec_evals():
    # every hit ties; the relevant one's rank (1 / recip_rank) must be its place in `rank`
    docids = ["d1", "d10", "d2", "D2", "a", "b", "10", "9", "é", "z", "_"]
    for target in docids:
        hits = [(d, 1.0) for d in docids]
        rr = pytrec_eval.RelevanceEvaluator({"q": {target: 1}}, {"recip_rank"}).evaluate({"q": dict(hits)})
        assert rank(hits).index(target) + 1 == round(1 / rr["q"]["recip_rank"]), target


def test_matches_pytrec_eval_with_missing_query_and_identical_ids():
    queries = [q("q1", {"a": 1, "b": 2}), q("q2", {"c": 1}), q("q3", {"q3": 1, "d": 1}), q("q4", {"e": 0}),
               q("q5", {"a": -1, "f": 3})]
    run = {"q1": [("b", 1.0), ("a", 1.0), ("x", 1.0), ("q1", 5.0)],     # ties and itself
           "q3": [("q3", 2.0), ("d", 1.0)],                              # itself is judged relevant here
           "q4": [("e", 1.0)],
           "q5": [("a", 2.0), ("f", 1.0)],
           "q9": [("a", 1.0)]}                                           # not a judged query
    # q2 is missing
    for ignore in (True, False):
        got = assert_matches_pytrec_eval(run, queries, ignore_identical_ids=ignore)
        assert got["queries"] == 4
    # MRR@10 over q1, q3, q4, q5. q1: x, b, a (ties: docid descending), or q1, x, b, a; q3: d, or q3, d
    # (q3 is judged relevant to itself); q4: nothing relevant; q5: a (grade -1 is not relevant), f
    assert evaluate_run(run, queries, KS)["mrr@10"] == pytest.approx((1 / 2 + 1 + 0 + 1 / 2) / 4)
    assert evaluate_run(run, queries, KS, ignore_identical_ids=False)["mrr@10"] == pytest.approx((1 / 3 + 1 + 0 + 1 / 2) / 4)


IDS = ["d1", "d2", "d10", "D2", "a", "b", "10", "9", "é", "q1", "q2", "q3"]   # some doc ids are query ids
QIDS = ["q1", "q2", "q3", "q4", "q5"]


@st.composite
def judged_run(draw):
    queries = [q(qid, draw(st.dictionaries(st.sampled_from(IDS), st.sampled_from([-1, 0, 1, 1, 2, 3]), max_size=5)))
               for qid in QIDS]
    # a few distinct scores, so that ties are common; any query may be missing from the run
    scores = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, -1.5, 1e-9])
    run = {qid: list(draw(st.dictionaries(st.sampled_from(IDS), scores, max_size=12)).items())
           for qid in draw(st.lists(st.sampled_from(QIDS), unique=True))}
    return queries, run


@settings(max_examples=300, deadline=None)
@given(judged_run(), st.booleans())
def test_random_runs_match_pytrec_eval(case, ignore):
    queries, run = case
    assert_matches_pytrec_eval(run, queries, ignore_identical_ids=ignore)


def test_generated_runs_match_pytrec_eval(tmp_path):
    """A seeded run the size of SciFact's, through the run file the evaluate stage reads, and its hybrid."""
    rng = np.random.default_rng(13)
    n_docs, n_queries = 2000, 300
    docids = [str(i) for i in rng.permutation(n_docs)]
    queries = [q(f"{i}", {docids[j]: int(rng.integers(1, 3)) for j in rng.choice(n_docs, rng.integers(1, 5))})
               for i in range(n_queries)]

    def generated(step):
        # scores rounded to a coarse step: ties in every query; some queries left out
        return {x.id: [(docids[j], float(np.round(s / step) * step))
                       for j, s in zip(rng.choice(n_docs, 100, replace=False), rng.normal(size=100))]
                for x in queries if rng.random() > 0.05}

    sparse, dense = generated(0.25), generated(0.1)
    write_run(tmp_path / "sparse.tsv", sparse)
    sparse = read_run(tmp_path / "sparse.tsv")
    assert missing_queries(sparse, queries)                   # the case under test is there
    for run in (sparse, dense, hybrid_run(sparse, dense)):
        assert_matches_pytrec_eval(run, queries)


def committed_runs():
    """data/runs/*.tsv with the evaluation split's queries, where a checkout holds them (DVC outputs)."""
    split = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["eval_split"]
    queries = ROOT / "data" / "prepared" / f"{split}.jsonl"
    runs = sorted((ROOT / "data" / "runs").glob("*.tsv"))
    return [pytest.param(run, queries, id=run.name) for run in runs] if queries.exists() else []


@pytest.mark.parametrize("run_path,queries_path", committed_runs() or
                         [pytest.param(None, None, marks=pytest.mark.skip(reason="no data/runs/*.tsv in this "
                                                                                  "checkout (dvc pull or dvc repro)"))])
def test_committed_runs_match_pytrec_eval(run_path, queries_path):
    assert_matches_pytrec_eval(read_run(run_path), read_queries(queries_path), EvaluateConfig().ks)
