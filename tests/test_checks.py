"""Data checks (dprpipe.checks) by hand-worked example, and their error/warn policies in prepare."""

import json
import re
from pathlib import Path

import pytest
import yaml

from dprpipe import checks
from dprpipe.prepare import PrepareConfig, prepare
from dprpipe.io import DataError

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"


# ---------------------------------------------------------------- the pure checks

def at(*lines, path="f.jsonl"):
    return [(path, n) for n in lines]


def test_duplicate_ids_keep_the_first_and_name_it():
    found = checks.duplicate_ids(["a", "b", "a", "a", "c", "b"], at(1, 2, 3, 4, 5, 6), lambda k: f"id {k!r}")
    assert [(f.index, f.where, f.message) for f in found] == [
        (2, ("f.jsonl", 3), "duplicate id 'a' (first at line 1)"),
        (3, ("f.jsonl", 4), "duplicate id 'a' (first at line 1)"),
        (5, ("f.jsonl", 6), "duplicate id 'b' (first at line 2)"),
    ]
    assert checks.duplicate_ids(["a", "b"], at(1, 2), str) == []
    # across files (a DPR passages.tsv and a context), the first one's file is named
    [f] = checks.duplicate_ids(["x", "x"], [("p.tsv", 4), ("train.json", 9)], lambda k: k)
    assert f.message == "duplicate x (first at p.tsv:4)"


def test_empty_texts():
    found = checks.empty_texts(["text", "", " \t\n", "x"], ["a", "b", "c", "d"], at(1, 2, 3, 4), "passage",
                               skip={2})
    assert [(f.index, f.message) for f in found] == [(1, "passage 'b' has an empty text")]


def test_missing_ids_names_passage_or_query():
    pairs = [("q1", "d1"), ("q1", "gone"), ("ghost", "d1"), ("q1", "gone")]
    found = checks.missing_ids(pairs, at(2, 3, 4, 5, path="qrels/test.tsv"), {"q1"}, {"d1"}, skip={3})
    assert [(f.index, f.where[1], f.message) for f in found] == [
        (1, 3, "query 'q1' is judged against passage 'gone', which is not in the corpus"),
        (2, 4, "judgement of query 'ghost', which is not among the queries"),
    ]


def test_unjudged_queries():
    found = checks.unjudged_queries(["a", "b", "c", "d"], at(1, 2, 3, 4), judged={"a"}, in_split={"a", "b", "d"},
                                    skip={3})
    assert [(f.index, f.message) for f in found] == [
        (1, "query 'b' has no relevant passage"),
        (2, "query 'c' has no relevant passage (no qrels file names it)"),
    ]


def test_leakage_across_splits_not_within():
    splits = {"train": [("1", "Obesity decreases life quality."), ("2", "obesity decreases  life quality.")],
              "dev": [("3", "A new claim")],
              "test": [("4", "OBESITY decreases life quality."), ("5", "a NEW claim"), ("6", "unseen")]}
    where = {q: ("queries.jsonl", int(q)) for q in "123456"}
    found = checks.leakage(splits, where)
    assert [(f.where, f.message) for f in found] == [
        (("queries.jsonl", 4), "query '4' of test has the text of query '1' of train"),
        (("queries.jsonl", 5), "query '5' of test has the text of query '3' of dev"),
    ]
    assert checks.leakage({"train": splits["train"]}, where) == []   # repeats inside one split


def test_enforce_error_and_warn():
    found = checks.duplicate_ids(["a", "a", "a"], at(1, 2, 3), lambda k: f"passage id {k!r}")
    with pytest.raises(DataError) as e:
        checks.enforce(found, "duplicate_ids", "error", print)
    assert (e.value.path, e.value.line) == ("f.jsonl", 2)
    assert "(2 such cases)" in str(e.value) and "prepare.on_duplicate_ids: warn" in str(e.value)
    lines = []
    checks.enforce(found, "duplicate_ids", "warn", lines.append)
    assert lines == ["warning: f.jsonl:2: duplicate passage id 'a' (first at line 1) (2 such cases); "
                     "prepare.on_duplicate_ids is warn: keep the first record of each id"]
    checks.enforce([], "duplicate_ids", "error", lines.append)          # nothing found: silent
    assert len(lines) == 1


# ---------------------------------------------------------------- policies in prepare

def write_beir(folder: Path, corpus, queries, qrels) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    return folder


CORPUS = [{"_id": f"d{i}", "text": f"document {i}"} for i in range(4)]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}, {"_id": "q3", "text": "third"}]
QRELS = {"train": [("q1", "d0", 1), ("q2", "d1", 1)], "test": [("q3", "d2", 1)]}

# one dataset per check, each with exactly one problem: (corpus, queries, qrels, file, line, message)
CASES = {
    "duplicate_ids": (CORPUS + [{"_id": "d1", "text": "again"}], QUERIES, QRELS,
                      "corpus.jsonl", 5, "duplicate passage id 'd1' (first at line 2)"),
    "empty_texts": ([*CORPUS[:3], {"_id": "d3", "title": "T", "text": "  "}], QUERIES, QRELS,
                    "corpus.jsonl", 4, "passage 'd3' has an empty text"),
    "missing_passages": (CORPUS, QUERIES, {**QRELS, "test": [("q3", "d2", 1), ("q3", "d9", 1)]},
                         "qrels/test.tsv", 2, "query 'q3' is judged against passage 'd9'"),
    "unjudged_queries": (CORPUS, QUERIES + [{"_id": "q4", "text": "fourth"}], QRELS,
                         "queries.jsonl", 4, "query 'q4' has no relevant passage (no qrels file names it)"),
    "leakage": (CORPUS, QUERIES[:2] + [{"_id": "q3", "text": " First"}], QRELS,
                "queries.jsonl", 3, "query 'q3' of test has the text of query 'q1' of train"),
}


def config(folder, **policies):
    return PrepareConfig(dataset=str(folder), dev_fraction=0.0, **{f"on_{k}": v for k, v in policies.items()})


@pytest.mark.parametrize("check", list(CASES))
def test_each_check_errors_or_warns_and_is_counted(tmp_path, check):
    corpus, queries, qrels, file, line, message = CASES[check]
    folder = write_beir(tmp_path / "ds", corpus, queries, qrels)

    with pytest.raises(DataError, match=re.escape(message)) as e:
        prepare(config(folder, **{check: "error"}))
    assert (e.value.path, e.value.line) == (str(folder / file), line)
    assert f"prepare.on_{check}: warn" in str(e.value)

    warnings = []
    ds, report = prepare(config(folder, **{check: "warn"}), warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {folder / file}:{line}: ")
    assert message in warnings[0]
    assert report["checks"] == {c: int(c == check) for c in checks.CHECKS}

    if check == "duplicate_ids":                          # the first record of the id is kept
        assert [p.id for p in ds.corpus] == ["d0", "d1", "d2", "d3"] and ds.corpus[1].text == "document 1"
    if check == "missing_passages":                       # the judgement is dropped, the query stays
        assert ds.splits["test"][0].relevant == {"d2": 1}
    if check == "unjudged_queries":                       # as BEIR: in no split
        assert "q4" not in {q.id for qs in ds.splits.values() for q in qs}
    if check in ("empty_texts", "leakage"):               # kept as they are
        assert len(ds.corpus) == 4 and [q.id for q in ds.splits["test"]] == ["q3"]


def test_clean_data_gives_zero_counts_and_no_warning(tmp_path):
    folder = write_beir(tmp_path / "ds", CORPUS, QUERIES, QRELS)
    warnings = []
    _, report = prepare(config(folder, **{c: "error" for c in checks.CHECKS}), warn=warnings.append)
    assert warnings == [] and report["checks"] == dict.fromkeys(checks.CHECKS, 0)


def test_counts_are_all_cases_and_dropped_records_are_not_counted_twice(tmp_path):
    # d1 twice and judged twice; one judgement of a missing passage; q2's only judgement is that one
    corpus = CORPUS + [{"_id": "d1", "text": ""}]
    qrels = {"train": [("q1", "d0", 1), ("q1", "d0", 1), ("q2", "gone", 1)], "test": [("q3", "d2", 1)]}
    folder = write_beir(tmp_path / "ds", corpus, QUERIES, qrels)
    warnings = []
    ds, report = prepare(config(folder, **dict.fromkeys(checks.CHECKS, "warn")), warn=warnings.append)
    # the empty text belongs to the dropped duplicate d1, so it is not an empty-text case
    assert report["checks"] == {"duplicate_ids": 2, "empty_texts": 0, "missing_passages": 1,
                                "unjudged_queries": 1, "leakage": 0}
    assert len(warnings) == 3
    train = {q.id: q.relevant for q in ds.splits["train"]}
    assert train == {"q1": {"d0": 1}, "q2": {}}


def test_dpr_questions_without_positives_are_unjudged(tmp_path):
    folder = tmp_path / "dpr"
    folder.mkdir()
    items = [{"question": "with", "answers": ["a"], "positive_ctxs": [{"title": "", "text": "a here"}]},
             {"question": "without", "answers": ["b"], "positive_ctxs": []}]
    (folder / "train.json").write_text(json.dumps(items, indent=1))
    with pytest.raises(DataError, match="query 'train-1' has no relevant passage") as e:
        prepare(PrepareConfig(dataset=str(folder), on_unjudged_queries="error"))
    assert e.value.line == 1 + 1 + len(json.dumps(items[0], indent=1).splitlines())
    ds, report = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0), warn=lambda m: None)
    assert report["checks"]["unjudged_queries"] == 1 and len(ds.splits["train"]) == 2


def test_dpr_contexts_sharing_an_id_with_other_texts_are_duplicates(tmp_path):
    # without a passages file, the same passage_id with another text is a conflict, not the same
    # passage, and an exact repeat is the same passage; with one, a context never overrides it
    folder = tmp_path / "dpr"
    folder.mkdir()
    ctx = {"title": "T", "text": "first text", "passage_id": "7"}
    items = [{"question": "one", "answers": [], "positive_ctxs": [ctx]},
             {"question": "two", "answers": [], "positive_ctxs": [ctx],
              "hard_negative_ctxs": [{"title": "T", "text": "another text", "passage_id": "7"},
                                     {"title": "X", "text": "not the TSV's", "passage_id": "1"}]}]
    (folder / "train.json").write_text(json.dumps(items, indent=1))
    with pytest.raises(DataError, match=r"duplicate passage id '7' \(first at line \d+\)") as e:
        prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0))
    assert e.value.path == str(folder / "train.json")
    warnings = []
    ds, report = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0, on_duplicate_ids="warn"),
                         warn=warnings.append)
    assert report["checks"]["duplicate_ids"] == 1 and len(warnings) == 1
    assert {p.id: p.text for p in ds.corpus} == {"7": "first text", "1": "not the TSV's"}
    (folder / "passages.tsv").write_text("id\ttext\ttitle\n1\tthe corpus text\tX\n7\tseven\tT\n")
    ds, report = prepare(PrepareConfig(dataset=str(folder), dev_fraction=0.0))
    assert report["checks"]["duplicate_ids"] == 0
    assert {p.id: p.text for p in ds.corpus} == {"1": "the corpus text", "7": "seven"}


def test_bad_policy_value():
    with pytest.raises(ValueError, match="on_leakage must be 'error' or 'warn', got 'ignore'"):
        PrepareConfig(on_leakage="ignore")


# ---------------------------------------------------------------- the project's defaults

def test_params_and_dvc_yaml_list_every_check():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    for check in checks.CHECKS:
        assert params[f"on_{check}"] == getattr(PrepareConfig(), f"on_{check}")
    assert "prepare" in stage["params"] and "dprpipe/checks.py" in stage["deps"]   # the whole section


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="SciFact is not on this machine")
def test_scifact_passes_the_default_checks():
    # read-only, ~0.3 s: SciFact's only findings are two test claims whose text is also a train claim
    warnings = []
    ds, report = prepare(PrepareConfig(dataset=str(SCIFACT)), warn=warnings.append)
    assert report["checks"] == {"duplicate_ids": 0, "empty_texts": 0, "missing_passages": 0,
                                "unjudged_queries": 0, "leakage": 2}
    assert len(warnings) == 1 and "of test has the text of query" in warnings[0]
    with pytest.raises(DataError, match="of test has the text of query"):
        prepare(PrepareConfig(dataset=str(SCIFACT), on_leakage="error"))
