"""dprpipe.prepare: format detection, passage splitting, the dev hold-out and the prepare step end to end."""

import pytest
from dataset_fixtures import (BEIR_CORPUS, BEIR_QUERIES, assert_data_error, beir_dataset, dpr_item, write_beir,
                              write_dpr)

from dprpipe.io import DataError
from dprpipe.prepare import (PrepareConfig, carry_labels, detect_format, hold_out, prepare, read_dataset,
                             split_passages)
from dprpipe.records import Passage, Query


def test_detect_format(tmp_path):
    assert detect_format(beir_dataset(tmp_path / "beir")) == "beir"
    assert detect_format(write_dpr(tmp_path / "dpr", {"dev": []})) == "dpr"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the format") as e:
        detect_format(tmp_path / "empty")
    assert_data_error(e, tmp_path / "empty", None)
    with pytest.raises(DataError, match="not found"):
        detect_format(tmp_path / "missing")
    with pytest.raises(ValueError, match="'csv'"):
        read_dataset(tmp_path / "beir", "csv")
    # an explicit format overrides detection
    with pytest.raises(DataError, match="no DPR"):
        read_dataset(tmp_path / "beir", "dpr")


def test_split_passages():
    docs = [Passage("a", "T", "w1 w2 w3 w4 w5"), Passage("b", "U", "short one"), Passage("c", "", "x y z")]
    out, pieces = split_passages(docs, 2)
    assert out == [Passage("a#0", "T", "w1 w2"), Passage("a#1", "T", "w3 w4"), Passage("a#2", "T", "w5"),
                   Passage("b", "U", "short one"), Passage("c#0", "", "x y"), Passage("c#1", "", "z")]
    assert pieces == {"a": ["a#0", "a#1", "a#2"], "b": ["b"], "c": ["c#0", "c#1"]}
    out, _ = split_passages(docs, 3)
    assert [p.text for p in out] == ["w1 w2 w3", "w4 w5", "short one", "x y z"]
    with pytest.raises(ValueError, match="max_words"):
        split_passages(docs, 0)


def test_split_passages_normalises_whitespace_inside_pieces():
    out, _ = split_passages([Passage("a", "", "one\ttwo\n three  four")], 2)
    assert [p.text for p in out] == ["one two", "three four"]


def test_carry_labels():
    queries = [Query("q1", "t", ("ans",), {"a": 2, "b": 0, "gone": 1}), Query("q2", "u", (), {})]
    out = carry_labels(queries, {"a": ["a#0", "a#1"], "b": ["b"]})
    assert out[0] == Query("q1", "t", ("ans",), {"a#0": 2, "a#1": 2, "b": 0, "gone": 1})
    assert out[1].relevant == {}


def _queries(n):
    return [Query(f"q{i}", f"text {i}") for i in range(n)]


@pytest.mark.parametrize("n,fraction", [(10, 0.1), (10, 0.25), (7, 0.5), (1, 0.4), (0, 0.3), (50, 0.0)])
def test_hold_out_is_disjoint_and_sized(n, fraction):
    qs = _queries(n)
    kept, held = hold_out(qs, fraction, seed=13)
    assert len(held) == round(n * fraction)
    assert {q.id for q in kept}.isdisjoint({q.id for q in held})
    assert sorted(q.id for q in kept + held) == sorted(q.id for q in qs)
    order = {q.id: i for i, q in enumerate(qs)}
    assert [order[q.id] for q in kept] == sorted(order[q.id] for q in kept)   # original order kept
    assert [order[q.id] for q in held] == sorted(order[q.id] for q in held)


def test_hold_out_is_seeded():
    qs = _queries(40)
    a = hold_out(qs, 0.25, seed=1)
    assert hold_out(qs, 0.25, seed=1) == a
    others = [hold_out(qs, 0.25, seed=s)[1] for s in range(2, 6)]
    assert any(o != a[1] for o in others)   # C(40, 10) choices: four seeds cannot all agree by chance


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_hold_out_bad_fraction(fraction):
    with pytest.raises(ValueError, match="dev_fraction"):
        hold_out(_queries(3), fraction, 0)


def test_prepare_beir(tmp_path):
    corpus = [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i} words"} for i in range(5)]
    corpus.append({"_id": "long", "title": "L", "text": "a b c d e f g"})
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(12)]
    train = [(f"q{i}", f"d{i % 5}", 1) for i in range(10)] + [("q0", "long", 2), ("q1", "d3", 0)]
    folder = write_beir(tmp_path / "beir", corpus, queries, {"train": train, "test": [("q10", "long", 1),
                                                                                      ("q11", "d1", 1)]})
    cfg = PrepareConfig(dataset=str(folder), max_words=3, dev_fraction=0.2, seed=5)
    ds, report = prepare(cfg)
    assert [p.id for p in ds.corpus] == ["d0", "d1", "d2", "d3", "d4", "long#0", "long#1", "long#2"]
    assert {p.title for p in ds.corpus if p.id.startswith("long")} == {"L"}
    assert len(ds.splits["train"]) == 8 and len(ds.splits["dev"]) == 2        # round(10 * 0.2) held out
    all_train = {q.id: q for q in ds.splits["train"] + ds.splits["dev"]}
    assert set(all_train) == {f"q{i}" for i in range(10)}
    assert all_train["q0"].relevant == {"d0": 1, "long#0": 2, "long#1": 2, "long#2": 2}
    assert ds.splits["test"][0].relevant == {"long#0": 1, "long#1": 1, "long#2": 1}
    # the held-out split is a function of the seed
    again, _ = prepare(cfg)
    assert [q.id for q in again.splits["dev"]] == [q.id for q in ds.splits["dev"]]
    judgements = {s: sum(len(q.positives) for q in qs) for s, qs in ds.splits.items()}
    assert report == {"documents": 6, "passages": 8,
                      "train_queries": 8, "train_judgements": judgements["train"],
                      "test_queries": 2, "test_judgements": 4,
                      "dev_queries": 2, "dev_judgements": judgements["dev"],
                      "checks": {"duplicate_ids": 0, "empty_texts": 0, "missing_passages": 0,
                                 "unjudged_queries": 0, "leakage": 0}}
    # q0 has 4 positives and q1's grade-0 judgement does not count: 10 + 3 in all
    assert judgements["train"] + judgements["dev"] == 13


def test_prepare_dpr_keeps_its_dev_split(tmp_path):
    items = [dpr_item(f"question {i}", [f"ans{i}"], positives=[{"title": "", "text": f"passage {i} ans{i}"}])
             for i in range(4)]
    folder = write_dpr(tmp_path / "dpr", {"train": items[:3], "dev": items[3:]})
    ds, report = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.5))
    assert [q.id for q in ds.splits["train"]] == ["train-0", "train-1", "train-2"]
    assert [q.id for q in ds.splits["dev"]] == ["dev-0"]
    assert report["documents"] == report["passages"] == 4
    assert ds.splits["dev"][0].answers == ("ans3",)


def test_prepare_without_dev_fraction_keeps_train(tmp_path):
    ds, report = prepare(PrepareConfig(dataset=str(beir_dataset(tmp_path / "b")), dev_fraction=0.0))
    assert "dev" not in ds.splits and len(ds.splits["train"]) == 2


def test_prepare_rejects_duplicate_ids(tmp_path):
    corpus = BEIR_CORPUS + [{"_id": "d1", "text": "again"}]
    folder = write_beir(tmp_path / "b", corpus, BEIR_QUERIES, {"test": [("q2", "d2", 1)]})
    with pytest.raises(DataError, match="duplicate passage id 'd1'"):
        prepare(PrepareConfig(dataset=str(folder)))
