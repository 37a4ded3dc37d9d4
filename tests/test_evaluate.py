"""Retrieval metrics: hand-worked examples, then every reported metric against pytrec_eval.

The reference is BEIR's `EvaluateRetrieval.evaluate` restated over pytrec_eval (trec_eval):
identical query/document ids dropped first, per-query `ndcg_cut`, `recall` and `recip_rank`,
averaged over the queries pytrec_eval returns (judged and in the run). MRR@k is trec_eval's
`recip_rank` on the run cut to depth k, the cut made in trec_eval's own order.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dprpipe.evaluate import (EvaluateConfig, evaluate_run, evaluate_runs, first_answer_rank, fold_judgements,
                              fold_run, missing_queries, mrr_at_k, ndcg_at_k, rank, ranked_run, recall_at_k,
                              recall_curve)
from dprpipe.io import read_run, write_run
from dprpipe.prepare import carry_labels
from dprpipe.records import Passage, Query, owners, read_queries
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
    for run in (sparse, dense, hybrid_run(sparse, dense, 1.0, True)):
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


# ---------------------------------------------------------------- split documents: MaxP folding

# Documents A (pieces A#0-A#2) and B (B#0, B#1) were split; C and D were kept whole.
PIECES = {"A": ["A#0", "A#1", "A#2"], "B": ["B#0", "B#1"]}
DOC_OF = owners(PIECES)
PIECE_RUN = {"q": [("A#1", 0.9), ("B#0", 0.8), ("A#0", 0.7), ("C", 0.6), ("B#1", 0.95), ("D", 0.1), ("A#2", 0.2)]}


def test_fold_run_hand_worked():
    # each document at its best piece: B 0.95 (B#1), A 0.9 (A#1), C 0.6, D 0.1
    assert fold_run(PIECE_RUN, DOC_OF) == {"q": [("B", 0.95), ("A", 0.9), ("C", 0.6), ("D", 0.1)]}
    assert fold_run({"q": [("A#0", 1.0), ("C", 1.0), ("A#2", 1.0)]}, DOC_OF) == {"q": [("C", 1.0), ("A", 1.0)]}
    assert fold_run(PIECE_RUN, {}) == {"q": sorted(PIECE_RUN["q"], key=lambda h: -h[1])}   # no map: as it is


def test_folded_metrics_hand_worked():
    # the dataset judges documents A (grade 1) and C (grade 2); prepare gives A's grade to each piece
    carried = carry_labels([q("q", {"A": 1, "C": 2})], PIECES)
    assert carried[0].relevant == {"A#0": 1, "A#1": 1, "A#2": 1, "C": 2}
    m = evaluate_run(PIECE_RUN, carried, ks=(1, 2, 3), document_of=DOC_OF)
    # documents ranked B, A, C, D: A at rank 2, C at rank 3
    # DCG = 1/log2(3) + 2/log2(4) = 0.63093 + 1 = 1.63093; IDCG = 2/log2(2) + 1/log2(3) = 2.63093 -> 0.61990
    assert m["ndcg@10"] == pytest.approx(0.61990, abs=1e-5)
    assert m["mrr@10"] == 0.5
    assert (m["recall@1"], m["recall@2"], m["recall@3"]) == (0.0, 0.5, 1.0)
    assert recall_curve(PIECE_RUN, carried, [1, 2, 3], document_of=DOC_OF) == [0.0, 0.5, 1.0]
    # passage-level, every piece a relevant unit: B#1, A#1, B#0, A#0, C, A#2, D -> 4 relevant, 1 in the top 2
    flat = evaluate_run(PIECE_RUN, carried, ks=(2,))
    assert flat["recall@2"] == 0.25


def test_fold_keeps_answer_accuracy_on_passages_and_drops_the_querys_own_pieces():
    corpus = [Passage("A#0", "", "nothing"), Passage("A#1", "", "the answer is Paris"), Passage("A#2", "", "x"),
              Passage("B#0", "", "Paris"), Passage("B#1", "", "y"), Passage("C", "", "z"), Passage("D", "", "w")]
    queries = carry_labels([q("q", {"A": 1, "C": 2}, answers=["Paris"])], PIECES)
    cfg = EvaluateConfig(ks=(1, 2, 3), curve_ks=(1, 2))
    folded, curve = evaluate_runs({"s": PIECE_RUN}, queries, corpus, cfg, PIECES)
    flat, _ = evaluate_runs({"s": PIECE_RUN}, queries, corpus, cfg)
    # accuracy reads passages: B#1 (no answer), A#1 (answer) -> accuracy@1 0, @2 1, with or without folding
    assert folded["s"]["accuracy@1"] == flat["s"]["accuracy@1"] == 0.0
    assert folded["s"]["accuracy@2"] == flat["s"]["accuracy@2"] == 1.0
    assert (folded["s"]["recall@2"], flat["s"]["recall@2"]) == (0.5, 0.25)
    assert curve == {1: {"s": 0.0}, 2: {"s": 0.5}}
    # fold_to_documents off: passage-level figures even with a piece map
    off, _ = evaluate_runs({"s": PIECE_RUN}, queries, corpus, EvaluateConfig(ks=(1, 2, 3), fold_to_documents=False),
                           PIECES)
    assert off == flat
    # a query that is a document of the corpus (ArguAna): its own pieces are dropped, whichever level
    own = {"A": ["A#0", "A#1", "A#2"]}
    run = {"A": [("A#1", 9.0), ("B#0", 2.0), ("A#0", 1.0)]}
    m = evaluate_run(run, [q("A", {"B#0": 1}, answers=["Paris"])], ks=(1,), text_of={p.id: p.text for p in corpus}.get,
                     document_of=owners(own))
    assert (m["recall@1"], m["accuracy@1"]) == (1.0, 1.0)      # A#1 (it holds "Paris") is not counted


def test_fold_judgements_gives_back_document_judgements():
    docs = [q("q1", {"A": 2, "C": 0, "gone": 1}), q("q2", {"B": -1, "D": 1}), q("q3")]
    assert fold_judgements(carry_labels(docs, PIECES), DOC_OF) == docs
    # pieces of different grades (not what prepare writes): the document takes the best
    assert fold_judgements([q("q", {"A#0": 0, "A#1": 2, "A#2": 1})], DOC_OF)[0].relevant == {"A": 2}


DOCS = ["d1", "d2", "d10", "a", "b", "q1", "q2"]             # q1, q2 are query ids too


@st.composite
def split_case(draw):
    # each document split into 1-3 pieces (1: kept whole under its own id) or kept whole
    pieces = {}
    for d in DOCS:
        n = draw(st.integers(0, 3))
        if n > 1:
            pieces[d] = [f"{d}#{i}" for i in range(n)]
    units = [p for d in DOCS for p in pieces.get(d, [d])]
    queries = [q(qid, draw(st.dictionaries(st.sampled_from(DOCS), st.sampled_from([-1, 0, 1, 1, 2]), max_size=4)))
               for qid in QIDS]
    scores = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, -1.5])
    run = {qid: list(draw(st.dictionaries(st.sampled_from(units), scores, max_size=14)).items())
           for qid in draw(st.lists(st.sampled_from(QIDS), unique=True))}
    return pieces, queries, run


@settings(max_examples=300, deadline=None)
@given(split_case(), st.booleans())
def test_folded_scores_match_pytrec_eval_on_the_folded_run(case, ignore):
    """Scoring a passage run with the piece map equals pytrec_eval on the run folded by hand (max per
    document) against the dataset's document judgements."""
    pieces, doc_queries, run = case
    doc_of = {p: d for d, ps in pieces.items() for p in ps}
    folded = {}
    for qid, hits in run.items():
        best = {}
        for pid, s in hits:
            best[doc_of.get(pid, pid)] = max(s, best.get(doc_of.get(pid, pid), s))
        folded[qid] = list(best.items())
    _, want = reference(folded, doc_queries, KS, ignore)
    got = evaluate_run(run, carry_labels(doc_queries, pieces), KS, ignore_identical_ids=ignore, document_of=doc_of)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert recall_curve(run, carry_labels(doc_queries, pieces), KS, ignore, doc_of) == \
        pytest.approx([want.get(f"recall@{k}", 0.0) for k in KS], abs=1e-6)


def test_evaluate_stage_folds_where_the_piece_map_exists(tmp_path, monkeypatch):
    import runpy
    import sys
    from unittest import mock

    from dprpipe.records import write_corpus, write_pieces, write_queries

    corpus = [Passage(p, "", p) for p in ["A#0", "A#1", "A#2", "B#0", "B#1", "C", "D"]]
    write_corpus(tmp_path / "corpus.jsonl", corpus)
    write_queries(tmp_path / "test.jsonl", carry_labels([q("q", {"A": 1, "C": 2})], PIECES))
    write_run(tmp_path / "bm25.tsv", PIECE_RUN)
    write_run(tmp_path / "dense.tsv", {"q": [("C", 0.9), ("A#2", 0.8), ("D", 0.7)]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"ks": [1, 2, 3], "curve_ks": [1, 2]}}))
    monkeypatch.syspath_prepend(str(ROOT / "stages"))

    def stage(pieces: Path) -> dict:
        argv = ["evaluate.py", "--params", str(tmp_path / "params.yaml"), "--corpus", str(tmp_path / "corpus.jsonl"),
                "--queries", str(tmp_path / "test.jsonl"), "--run", f"bm25={tmp_path / 'bm25.tsv'}",
                "--run", f"dense={tmp_path / 'dense.tsv'}", "--hybrid", "hybrid=bm25+dense", "--pieces", str(pieces),
                "--metrics", str(tmp_path / "m.json"), "--plot", str(tmp_path / "r.csv")]
        with mock.patch.object(sys, "argv", argv):
            runpy.run_path(str(ROOT / "stages" / "evaluate.py"), run_name="__main__")
        return json.loads((tmp_path / "m.json").read_text())

    whole = stage(tmp_path / "pieces.json")                 # no such file: the corpus is taken as whole
    write_pieces(tmp_path / "pieces.json", PIECES)
    folded = stage(tmp_path / "pieces.json")
    assert (whole["bm25"]["recall@2"], folded["bm25"]["recall@2"]) == (0.25, 0.5)
    assert folded["bm25"]["ndcg@10"] == round(0.61990, 4)
    # the hybrid fuses the passage runs (min-max per query), then is folded like the others
    default = EvaluateConfig()   # the stage's: its params.yaml names no hybrid setting
    fused = hybrid_run(read_run(tmp_path / "bm25.tsv"), read_run(tmp_path / "dense.tsv"),
                       default.hybrid_weight, default.hybrid_normalize)
    want = evaluate_run(fold_run(fused, DOC_OF), fold_judgements(read_queries(tmp_path / "test.jsonl"), DOC_OF),
                        (1, 2, 3))
    assert folded["hybrid"] == {k: round(v, 4) if isinstance(v, float) else v for k, v in want.items()}
