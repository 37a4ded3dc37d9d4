"""dprpipe.claims: mean ± sample sd over seeds, each claim's verdict and phrasing when it holds and when it
does not (against hand-worked records), and the experiment records file."""

import dataclasses
import json

import pytest
from claims_fixtures import CFG, rec

from dprpipe.claims import (ExperimentSet, claims, compare, other_comparisons, parse_csv, read_experiments, stat,
                            to_json, write_experiments)
from dprpipe.io import DataError


def by_key(cs):
    return {c.key: c for c in cs}


def test_stat_mean_and_sample_sd_hand_worked():
    # mean 0.72; deviations -0.02, 0, +0.02; sum of squares 0.0008; / (n - 1) = 0.0004; sd 0.02
    s = stat([0.70, 0.72, 0.74])
    assert (round(s.mean, 6), round(s.sd, 6), s.n) == (0.72, 0.02, 3)
    assert s.text() == "0.7200 ± 0.0200"
    assert stat([0.5]).text() == "0.5000"           # one seed: no spread shown
    same = stat([0.6771, 0.6771, 0.6771])            # a figure every seed gives alike (BM25)
    assert (same.mean, same.sd, same.n, same.text()) == (0.6771, 0.0, 3, "0.6771")
    assert stat([None, float("nan")]) is None


def test_claims_all_hold_hand_worked():
    # BM25 0.60, zero-shot 0.62, in-batch 0.66, +1 negative 0.70, +2 negatives 0.705 (one seed each)
    # dense negatives 0.73 (+0.03 over BM25's), batch 128 0.705 (+0.005, a tie)
    records = [rec("dpr_inbatch", 13, 0.66), rec("dpr_hn1", 13, 0.70), rec("dpr_hn2", 13, 0.705),
               rec("dpr_dense", 13, 0.73), rec("dpr_b128", 13, 0.705)]
    c = by_key(claims(records, CFG))
    assert {k: v.verdict for k, v in c.items()} == {"1": "held", "2": "held", "2a": "held", "2b": "held",
                                                     "3": "held", "4": "did not hold"}
    assert c["3"].detail == ("DPR, +1 dense negative (the base model's ranking) 0.7300 vs DPR, +1 BM25 negative "
                             "0.7000 nDCG@10: +0.0300 (also R@20 +0.0300, R@100 +0.0300), more than a tie (0.0100).")
    assert c["4"].detail.endswith("nDCG@10: +0.0050 (also R@20 +0.0050, R@100 +0.0050), within the tie threshold "
                                  "0.0100.")
    # 0.70 - 0.60 = +0.10 >= 0.05; R@20 and R@100 move with nDCG@10 in these records
    assert c["1"].detail == ("DPR, +1 BM25 negative 0.7000 vs BM25 0.6000 nDCG@10: +0.1000 "
                             "(also R@20 +0.1000, R@100 +0.1000), at least the 0.0500 of a wide margin.")
    # 0.66 - 0.62 = +0.04 > tie 0.01
    assert c["2"].detail.startswith("DPR, in-batch negatives only 0.6600 vs the zero-shot starting model 0.6200 "
                                    "nDCG@10: +0.0400")
    assert c["2"].detail.endswith("more than a tie (0.0100).")
    assert "+0.0400" in c["2a"].detail      # 0.70 - 0.66
    # 0.705 - 0.70 = +0.005: within the tie threshold, so "no further gain" held
    assert c["2b"].detail.endswith(
        "nDCG@10: +0.0050 (also R@20 +0.0050, R@100 +0.0050), within the tie threshold 0.0100.")


def test_claims_that_do_not_hold_say_so():
    # BM25 0.70 beats DPR 0.69; training made in-batch worse than zero-shot (0.60 < 0.62); +1 negative
    # ties in-batch (0.605 vs 0.60); a second negative helps by 0.03 (more than a tie)
    records = [rec("dpr_inbatch", 13, 0.60, bm25=0.70), rec("dpr_hn1", 13, 0.605, bm25=0.70),
               rec("dpr_hn2", 13, 0.635, bm25=0.70)]
    c = by_key(claims(records, CFG))
    assert {k: v.verdict for k, v in c.items()} == {"1": "did not hold", "2": "did not hold", "2a": "did not hold",
                                                     "2b": "did not hold", "3": "not measured", "4": "not measured"}
    assert c["4"].detail == "needs runs of `dpr_b128` and `dpr_hn1` (`python -m flows.experiments`)."
    assert c["1"].detail.startswith("DPR, +1 BM25 negative 0.6050 vs BM25 0.7000 nDCG@10: -0.0950")
    assert c["1"].detail.endswith(": BM25 is ahead.")
    assert c["2"].detail.endswith("nDCG@10: -0.0200 (also R@20 -0.0200, R@100 -0.0200): it is worse.")
    assert c["2a"].detail.endswith("+0.0050 (also R@20 +0.0050, R@100 +0.0050), within the tie threshold 0.0100.")
    assert c["2b"].detail.endswith("+0.0300 (also R@20 +0.0300, R@100 +0.0300): the second negative helped, "
                                   "by more than a tie (0.0100).")


def test_claim1_partly_held_and_tie():
    # +0.03: ahead by more than a tie but less than a wide margin; +0.0095: a tie (the committed default run's case)
    partly = by_key(claims([rec("dpr_hn1", 13, 0.63)], CFG))["1"]
    assert partly.verdict == "partly held"
    assert "+0.0300" in partly.detail and "by less than the 0.0500 of a wide margin" in partly.detail
    tie = by_key(claims([rec("dpr_hn1", 13, 0.6866, bm25=0.6771)], CFG))["1"]
    assert tie.verdict == "did not hold"
    assert tie.detail.endswith("within the tie threshold 0.0100: DPR and BM25 tie.")
    assert "+0.0095" in tie.detail


def test_seed_spread_widens_the_tie_threshold():
    # +1 negative: 0.66, 0.69, 0.72 (mean 0.69, sd 0.03); in-batch 0.67 (one seed, sd 0):
    # delta +0.02, tie threshold max(0.01, sqrt(0.03² + 0²)) = 0.03, so a tie
    records = [rec("dpr_hn1", s, d) for s, d in ((13, 0.66), (14, 0.69), (15, 0.72))] + [rec("dpr_inbatch", 13, 0.67)]
    c = by_key(claims(records, CFG))["2a"]
    assert c.verdict == "did not hold"
    assert "0.6900 ± 0.0300 vs DPR, in-batch negatives only 0.6700 nDCG@10: +0.0200" in c.detail
    assert c.detail.endswith("within the tie threshold 0.0300.")
    assert compare(stat([0.66, 0.69, 0.72]), stat([0.67]), 0.01).tie == pytest.approx(0.03)


def test_a_difference_equal_to_the_threshold_is_a_tie():
    # the committed set's +2 vs +1 negatives: means 0.72237 and 0.71237 differ by 0.0100000000000001 in
    # floating point, exactly the 0.01 threshold in 4-decimal metrics: a tie, not "helped"
    records = ([rec("dpr_hn2", s, d) for s, d in ((13, 0.7235), (14, 0.7249), (15, 0.7187))]
               + [rec("dpr_hn1", s, d) for s, d in ((13, 0.7031), (14, 0.7120), (15, 0.7220))])
    c = compare(stat([0.7235, 0.7249, 0.7187]), stat([0.7031, 0.7120, 0.7220]), 0.01)
    assert c.delta > c.tie and c.sign == 0
    assert compare(stat([0.7236]), stat([0.7124]), 0.01).sign == 1     # 0.0112: ahead
    assert by_key(claims(records, CFG))["2b"].verdict == "held"


def test_claims_not_measured_without_their_variants():
    c = by_key(claims([rec("dpr_hn1", 13, 0.70)], CFG))
    assert c["1"].verdict == "held"
    assert {k: c[k].verdict for k in ("2", "2a", "2b")} == {k: "not measured" for k in ("2", "2a", "2b")}
    assert c["2b"].detail == "needs runs of `dpr_hn2` and `dpr_hn1` (`python -m flows.experiments`)."


def test_other_comparisons_separate_encoders_and_hybrid():
    records = [rec("dpr_hn1", 13, 0.70, hybrid=0.75), rec("dpr_sep", 13, 0.68)]
    assert other_comparisons(records, CFG) == [
        "DPR, +1 BM25 negative, separate encoders vs shared (DPR, +1 BM25 negative): 0.6800 vs 0.7000 nDCG@10, "
        "-0.0200 (behind, tie threshold 0.0100).",
        "hybrid vs DPR, +1 BM25 negative: 0.7500 vs 0.7000 nDCG@10, +0.0500 (ahead, tie threshold 0.0100).",
        "hybrid vs BM25: 0.7500 vs 0.6000 nDCG@10, +0.1500 (ahead, tie threshold 0.0100)."]


def test_other_comparisons_of_dense_negatives_at_separate_encoders():
    # the default (dense negatives) against dpr_sep (BM25 negatives), both with separate encoders
    records = [rec("dpr_sep", 13, 0.70), rec("dpr_sep_dense", 13, 0.73), rec("dpr_sep_dense", 14, 0.75)]
    assert other_comparisons(records, CFG)[:1] == [       # the hybrids follow
        "DPR, +1 dense negative, separate encoders (the default) vs BM25 negatives (DPR, +1 BM25 negative, "
        "separate encoders): 0.7400 ± 0.0141 vs 0.7000 nDCG@10, +0.0400 (ahead, tie threshold 0.0141)."]


def test_other_comparisons_of_the_default_against_the_papers_dpr():
    # the default's variant is compared with dpr_hn1, and its hybrid shown too: each hybrid then has its full name
    default = [dataclasses.replace(rec("dpr_sep_dense", 13, 0.80, hybrid=0.81), source="workspace"),
               rec("dpr_sep_dense", 14, 0.82, hybrid=0.83)]
    records = [rec("dpr_hn1", 13, 0.70, hybrid=0.75), *default]
    assert other_comparisons(records, CFG) == [
        "DPR, +1 dense negative, separate encoders (the default) vs the paper's DPR: 0.8100 ± 0.0141 vs 0.7000 "
        "nDCG@10, +0.1100 (ahead, tie threshold 0.0141).",
        "hybrid (BM25 + DPR, +1 BM25 negative) vs DPR, +1 BM25 negative: 0.7500 vs 0.7000 nDCG@10, +0.0500 (ahead, "
        "tie threshold 0.0100).",
        "hybrid (BM25 + DPR, +1 BM25 negative) vs BM25: 0.7500 vs 0.6000 nDCG@10, +0.1500 (ahead, tie threshold "
        "0.0100).",
        "hybrid (BM25 + DPR, +1 dense negative, separate encoders (the default)) vs DPR, +1 dense negative, "
        "separate encoders (the default): 0.8200 ± 0.0141 vs 0.8100 ± 0.0141 nDCG@10, +0.0100 (a tie, tie threshold "
        "0.0200).",
        "hybrid (BM25 + DPR, +1 dense negative, separate encoders (the default)) vs BM25: 0.8200 ± 0.0141 vs 0.6000 "
        "nDCG@10, +0.2200 (ahead, tie threshold 0.0141)."]
    # the same whether or not the runs are the workspace's
    assert other_comparisons([rec("dpr_hn1", 13, 0.70, hybrid=0.75), rec("dpr_sep_dense", 13, 0.80, hybrid=0.81),
                              rec("dpr_sep_dense", 14, 0.82, hybrid=0.83)], CFG) == other_comparisons(records, CFG)
    # with the default's runs alone, it is the reference: no comparison with the paper's DPR, one hybrid
    assert [c.split(":")[0] for c in other_comparisons(default, CFG)] == [
        "hybrid vs DPR, +1 dense negative, separate encoders (the default)", "hybrid vs BM25"]


def test_records_json_round_trip_and_errors(tmp_path):
    exps = ExperimentSet("scifact", "test", [rec("dpr_hn1", 13, 0.70), rec("dpr_sep", 14, 0.68)])
    path = tmp_path / "experiments.json"
    write_experiments(path, exps)
    assert read_experiments(path) == exps
    assert path.read_text() == to_json(exps) and to_json(read_experiments(path)) == to_json(exps)
    bad = json.loads(path.read_text())
    bad["records"][1]["seeds"] = bad["records"][1].pop("seed")
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"experiments.json: record 1 \(dpr_sep-s14\): "
                                        r"missing \['seed'\], unknown \['seeds'\]"):
        read_experiments(path)
    path.write_text("{")
    with pytest.raises(DataError, match=r"experiments.json:1: malformed JSON"):
        read_experiments(path)
    with pytest.raises(DataError, match=r"missing.json: cannot read it"):
        read_experiments(tmp_path / "missing.json")


def test_parse_csv_of_the_stage_outputs():
    train = "epoch,loss,val_ndcg@10,val_avg_rank\n0,,0.7651,3.852\n1,0.61488,0.7839,1.531\n"
    assert parse_csv(train) == [{"epoch": 0, "loss": None, "val_ndcg@10": 0.7651, "val_avg_rank": 3.852},
                                {"epoch": 1, "loss": 0.61488, "val_ndcg@10": 0.7839, "val_avg_rank": 1.531}]
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        parse_csv("k,a,b\n1,2\n")
