"""dprpipe.prepare: format detection, passage splitting, the dev hold-out and the prepare step end to end."""

import json
import re
from pathlib import Path

import pytest
from dataset_fixtures import (BEIR_CORPUS, BEIR_QUERIES, assert_data_error, beir_dataset, dpr_item, write_beir,
                              write_dpr, write_dpr_release)

from dprpipe.dpr_format import dpr_files
from dprpipe.io import DataError
from dprpipe.prepare import (PrepareConfig, carry_labels, detect_format, hold_out, negative_records, prepare,
                             read_dataset, split_passages)
from dprpipe.records import Dataset, Passage, Query


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
    assert pieces == {"a": ["a#0", "a#1", "a#2"], "c": ["c#0", "c#1"]}     # b fits: not split, not in the map
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


# ---------------------------------------------------------------- split documents: piece ids, the piece map,
# and the positives rule (every piece of a judged document; mine and validation read it unchanged)

def test_split_passages_refuses_a_piece_id_that_is_already_a_passage_id():
    long = "w1 w2 w3"
    # the piece a#1 of document a would be the id of a real passage: its judgements and hits would mix
    with pytest.raises(ValueError, match="piece id 'a#1' of document 'a' is already the id of a passage"):
        split_passages([Passage("a", "", long), Passage("a#1", "", "x")], 2)
    # a split document's own id counts too, even though the split drops it from the corpus
    with pytest.raises(ValueError, match="piece id 'a#0' of document 'a' is already the id of a passage"):
        split_passages([Passage("a#0", "", long), Passage("a", "", long)], 2)
    # two documents of one id (prepare's duplicate check stops these first) would make pieces twice
    with pytest.raises(ValueError, match="piece id 'a#0' of document 'a' is already the id of a piece of "
                                         "document 'a'"):
        split_passages([Passage("a", "", long), Passage("a", "", long)], 2)
    # look-alike ids are fine where nothing clashes: a#7 is a whole document, not in the map
    out, pieces = split_passages([Passage("a", "", long), Passage("a#7", "", "x"), Passage("a#1#0", "", "y")], 2)
    assert [p.id for p in out] == ["a#0", "a#1", "a#7", "a#1#0"]
    assert pieces == {"a": ["a#0", "a#1"]}


def _split_beir(folder, corpus_extra=()):
    corpus = [{"_id": "long", "title": "Fever", "text": "aspirin lowers fever quickly in adults and children alike"},
              {"_id": "other", "title": "Other", "text": "aspirin thins blood in adults and children"},
              {"_id": "short", "title": "", "text": "fever"}, *corpus_extra]
    queries = [{"_id": "q1", "text": "aspirin fever adults"}, {"_id": "q2", "text": "aspirin thins blood in children"},
               {"_id": "q3", "text": "fever in children"}]
    return write_beir(folder, corpus, queries, {"train": [("q1", "long", 2), ("q1", "short", 0), ("q2", "other", 1)],
                                                "test": [("q3", "long", 1), ("q3", "short", 1)]})


def test_prepare_collision_is_one_data_error_naming_the_dataset_and_the_id(tmp_path):
    folder = _split_beir(tmp_path / "b", [{"_id": "long#1", "text": "a real passage"}])
    with pytest.raises(DataError, match="piece id 'long#1' of document 'long'") as e:
        prepare(PrepareConfig(dataset=str(folder), max_words=3, dev_fraction=0.0))
    assert_data_error(e, folder, None)
    ds, _ = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0))   # kept whole: no pieces, no clash
    assert ds.pieces == {}


def test_prepare_keeps_the_piece_map_and_document_judgements_fold_back(tmp_path):
    from dprpipe.evaluate import fold_judgements
    from dprpipe.records import owners, read_pieces, write_pieces

    folder = _split_beir(tmp_path / "b")
    whole, _ = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0))
    ds, report = prepare(PrepareConfig(dataset=str(folder), max_words=3, dev_fraction=0.0))
    assert ds.pieces == {"long": ["long#0", "long#1", "long#2"], "other": ["other#0", "other#1", "other#2"]}
    assert (report["documents"], report["passages"]) == (3, 7)
    # every piece of a judged document carries its grade, in every split (grade 0 too)
    assert ds.splits["train"][0].relevant == {"long#0": 2, "long#1": 2, "long#2": 2, "short": 0}
    assert ds.splits["test"][0].positives == ["long#0", "long#1", "long#2", "short"]
    # folded with the piece map, each split's judgements are the dataset's document judgements again
    for split, queries in ds.splits.items():
        assert fold_judgements(queries, owners(ds.pieces)) == whole.splits[split], split
    write_pieces(tmp_path / "pieces.json", ds.pieces)
    assert read_pieces(tmp_path / "pieces.json") == ds.pieces


@pytest.mark.parametrize("text,problem", [
    ("[1, 2]", "expected a JSON object"),
    ('{"d": "d#0"}', "document 'd': expected a non-empty list of piece ids"),
    ('{"d": []}', "document 'd': expected a non-empty list of piece ids"),
    ('{"d": ["d#0", 3]}', "document 'd': expected a non-empty list of piece ids"),
    ('{"d": ["d#0"], "e": ["d#0"]}', "piece 'd#0' is listed under documents 'd' and 'e'"),
    ('{"d": ', "malformed JSON"),
])
def test_read_pieces_refuses_a_bad_map(tmp_path, text, problem):
    from dprpipe.records import read_pieces

    (tmp_path / "pieces.json").write_text(text)
    with pytest.raises(DataError, match=problem) as e:
        read_pieces(tmp_path / "pieces.json")
    assert_data_error(e, tmp_path / "pieces.json", None)


def test_prepare_stage_writes_the_piece_map_only_for_a_split_corpus(tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path
    from unittest import mock

    import yaml

    from dprpipe.records import read_pieces

    folder = _split_beir(tmp_path / "b")
    script = Path(__file__).resolve().parents[1] / "stages" / "prepare.py"
    monkeypatch.syspath_prepend(str(script.parent))
    for max_words in (0, 3):
        params = tmp_path / f"params{max_words}.yaml"
        params.write_text(yaml.safe_dump({"prepare": {"dataset": str(folder), "max_words": max_words}}))
        out = tmp_path / f"out{max_words}"
        argv = ["prepare.py", "--params", str(params), "--out", str(out), "--report", str(tmp_path / "data.json")]
        with mock.patch.object(sys, "argv", argv):
            runpy.run_path(str(script), run_name="__main__")
        assert (out / "pieces.json").exists() == bool(max_words)
    assert read_pieces(tmp_path / "out3" / "pieces.json")["long"] == ["long#0", "long#1", "long#2"]


def test_split_positives_work_for_mining_sampling_and_validation(tmp_path):
    """Every piece of a judged document is a positive: mine never makes one a negative, train draws a
    positive among them, and validation ranks them all as relevant."""
    from dense_fixtures import tiny_encoder

    from dprpipe.mine import MineConfig, Miner
    from dprpipe.train import TrainConfig, TrainData, epoch_batches, validate

    folder = _split_beir(tmp_path / "b")
    ds, _ = prepare(PrepareConfig(dataset=str(folder), max_words=3, dev_fraction=0.0))
    train = ds.splits["train"]
    negatives = Miner(ds.corpus, MineConfig(depth=10, negatives=10)).negatives(train)
    gold = {"q1": {"long#0", "long#1", "long#2"}, "q2": {"other#0", "other#1", "other#2"}}
    for q in train:
        assert set(q.positives) == gold[q.id]
        mined = {d for d, _ in negatives[q.id]}
        assert mined and not mined & gold[q.id], q.id        # siblings of the gold piece are never negatives
    # q1's BM25 ranking has pieces of both documents on top: the filter is what keeps long's out
    assert {d for d, _ in Miner(ds.corpus, MineConfig(depth=10)).run(train, 10)["q1"][:3]} & gold["q1"]
    negs = {qid: [d for d, _ in hits] for qid, hits in negatives.items()}
    pid = {p.id: i for i, p in enumerate(ds.corpus)}
    data = TrainData(corpus=ds.corpus, train=train, dev=train, negatives=negs)
    drawn = {ds.corpus[pos].id for e in range(20) for batch in epoch_batches(data, TrainConfig(batch_size=2), e, pid)
             for q, pos, _ in batch if q.id == "q1"}
    assert drawn == gold["q1"]                                # any piece, over the epochs
    # validation's pool: every dev positive (all six pieces) and the top two mined negatives of each question
    val = validate(tiny_encoder(), data, TrainConfig(val_negatives=2), pid)
    pool = gold["q1"] | gold["q2"] | {d for hits in negs.values() for d in hits[:2]}
    assert val["pool"] == len(pool) and 0 <= val["avg_rank"] < len(pool) and 0 < val["ndcg@10"] <= 1


# ---------------------------------------------------------------- DPR files: named in prepare.files or found by name

def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("")
    return folder


@pytest.mark.parametrize("names,found", [
    (["train.json", "dev.json", "test.json", "passages.tsv"],
     {"train": "train.json", "dev": "dev.json", "test": "test.json", "passages": "passages.tsv"}),
    (["biencoder-nq-train.json.gz", "biencoder-nq-dev.json.gz", "nq-test.csv", "psgs_w100.tsv.gz"],
     {"train": "biencoder-nq-train.json.gz", "dev": "biencoder-nq-dev.json.gz", "test": "nq-test.csv",
      "passages": "psgs_w100.tsv.gz"}),
    (["biencoder-trivia-dev.json", "trivia-test.csv.gz", "README.md", "nq-train.csv"],
     {"dev": "biencoder-trivia-dev.json", "test": "trivia-test.csv.gz"}),
    (["test.json.gz"], {"test": "test.json.gz"}),
    (["biencoder-nq-train.json", "nq-test.qa.csv", "nq-dev.qa.csv"],      # as DPR's URLs name them
     {"train": "biencoder-nq-train.json", "test": "nq-test.qa.csv"}),
])
def test_dpr_files_found_by_name(tmp_path, names, found):
    folder = _touch(tmp_path / "d", *names)
    assert {role: p.name for role, p in dpr_files(folder).items()} == found
    assert detect_format(folder) == "dpr"


@pytest.mark.parametrize("names,role", [
    (["biencoder-nq-train.json.gz", "biencoder-trivia-train.json.gz"], "train"),
    (["train.json", "train.json.gz"], "train"),
    (["test.json", "nq-test.csv"], "test"),
    (["nq-test.csv", "nq-test.qa.csv"], "test"),
    (["train.json", "psgs_w100.tsv", "psgs_w100.tsv.gz"], "passages"),
])
def test_ambiguous_names_are_one_error_listing_the_candidates(tmp_path, names, role):
    folder = _touch(tmp_path / "d", *names)
    with pytest.raises(DataError, match=f"cannot tell which file is the {role}") as e:
        dpr_files(folder)
    assert_data_error(e, folder, None)
    candidates = sorted(n for n in names if n not in ("train.json",) or role == "train")
    assert str(e.value).endswith(f"{', '.join(candidates)}; name one in prepare.files.{role}")
    # naming the file settles it, and the other roles are still found by name
    chosen = candidates[0]
    assert dpr_files(folder, {role: chosen})[role] == folder / chosen


def test_prepare_files_names_files_and_refuses_what_is_not_there(tmp_path):
    folder = _touch(tmp_path / "d", "q.json", "my-corpus.tsv.gz", "other.csv")
    got = dpr_files(folder, {"train": "q.json", "test": "other.csv", "passages": "my-corpus.tsv.gz"})
    assert got == {"train": folder / "q.json", "test": folder / "other.csv", "passages": folder / "my-corpus.tsv.gz"}
    with pytest.raises(DataError, match=r"file not found \(named by prepare.files.dev\)") as e:
        dpr_files(folder, {"train": "q.json", "dev": "nope.json"})
    assert_data_error(e, folder / "nope.json", None)
    with pytest.raises(DataError, match="the passages file must be a .tsv file") as e:
        dpr_files(folder, {"train": "q.json", "passages": "other.csv"})
    assert_data_error(e, folder / "other.csv", None)
    with pytest.raises(DataError, match=r"the train file must be a .json \(biencoder\) or .csv"):
        dpr_files(folder, {"train": "my-corpus.tsv.gz"})
    # prepare.files alone makes a folder DPR, even one with a corpus.jsonl
    beir = beir_dataset(tmp_path / "beir")
    (beir / "q.json").write_text("[]")
    assert detect_format(beir) == "beir" and detect_format(beir, {"train": "q.json"}) == "dpr"


def test_no_question_files(tmp_path):
    folder = _touch(tmp_path / "d", "psgs_w100.tsv")
    with pytest.raises(DataError, match="no DPR question files found") as e:
        dpr_files(folder)
    assert_data_error(e, folder, None)
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(folder)


def test_prepare_files_in_params(tmp_path):
    from dprpipe.config import ConfigError, from_mapping

    cfg = from_mapping(PrepareConfig, {"files": {"test": "nq-test.csv", "passages": "psgs_w100.tsv.gz"}}, "prepare")
    assert cfg.files == {"test": "nq-test.csv", "passages": "psgs_w100.tsv.gz"}
    assert PrepareConfig().files == {} == from_mapping(PrepareConfig, {"files": {}}, "prepare").files
    for files, problem in [({"corpus": "x.tsv"}, "files: unknown role 'corpus'"),
                           ({"test": "/abs/nq-test.csv"}, "files.test: '/abs/nq-test.csv' is not a file name inside"),
                           ({"test": "../nq-test.csv"}, "is not a file name inside"),
                           ({"test": " "}, "is not a file name inside"),
                           ({"test": 3}, "prepare.files.test: expected str, got int"),
                           ({1: "x"}, "prepare.files key: expected str, got int"),
                           (["nq-test.csv"], "prepare.files: expected a mapping")]:
        with pytest.raises(ConfigError, match=re.escape(problem)) as e:
            from_mapping(PrepareConfig, {"files": files}, "prepare")
        assert e.value.key == "files"
    with pytest.raises(ConfigError, match="cannot be used with format beir"):
        from_mapping(PrepareConfig, {"files": {"test": "t.csv"}, "format": "beir"}, "prepare")


def test_prepare_writes_provided_negatives_in_the_mine_stage_format(tmp_path):
    import subprocess
    import sys

    import yaml

    from dprpipe.io import read_jsonl

    files = write_dpr_release(tmp_path / "nq", train=range(0, 10), dev=range(0, 0), test=range(10, 12))
    files["dev"].unlink()                     # no dev split: prepare holds one out of train
    root = Path(__file__).resolve().parents[1]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"dataset": str(tmp_path / "nq"), "dev_fraction": 0.2}}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(root / "stages" / "prepare.py"), "--params", str(params),
                        "--out", str(out / "prepared"), "--report", str(out / "data.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in (out / "prepared").rglob("*.jsonl")) == \
        ["prepared/corpus.jsonl", "prepared/dev.jsonl", "prepared/negatives/dev.jsonl",
         "prepared/negatives/train.jsonl", "prepared/test.jsonl", "prepared/train.jsonl"]
    # one line per question of each split, in its order; the test split (QA CSV) provides none
    for split in ("train", "dev"):
        qids = [o["id"] for _, o in read_jsonl(out / "prepared" / f"{split}.jsonl")]
        lines = (out / "prepared" / "negatives" / f"{split}.jsonl").read_text().splitlines()
        n = {q: int(q.split("-")[1]) for q in qids}
        # byte for byte what the mine stage writes: json.dumps of {"id", "negatives": [[docid, score]]}
        assert lines == [json.dumps({"id": q, "negatives": [[str(n[q] + 2), 11.5], [str(n[q] + 3), 10.5]]})
                         for q in qids]
    assert len(qids) == 2
    # a BEIR folder provides none: nothing to write
    ds, _ = prepare(PrepareConfig(dataset=str(beir_dataset(tmp_path / "beir"))))
    assert ds.negatives == {} and negative_records(ds) == {}


def test_negative_records_follow_split_documents():
    ds = Dataset(corpus=[], splits={"train": [Query("q1", "t"), Query("q2", "u")], "dev": [Query("q3", "v")]},
                 pieces={"d": ["d#0", "d#1"]}, negatives={"q2": [("d", 2.5), ("e", 1.0)], "q1": []})
    assert negative_records(ds) == {"train": [{"id": "q1", "negatives": []},
                                              {"id": "q2", "negatives": [["d#0", 2.5], ["d#1", 2.5], ["e", 1.0]]}]}
