"""Dataset readers (BEIR, DPR), transforms and the prepare step, on tiny files written here."""

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dprpipe.data import (Passage, PrepareConfig, Query, carry_labels, content_id, detect_format,
                          hold_out, iter_json_array, prepare, read_corpus, read_dataset, read_queries,
                          split_passages, write_corpus, write_queries)
from dprpipe.io import DataError

# ---------------------------------------------------------------- fixture writers


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_beir(folder: Path, corpus, queries, qrels, header=True) -> Path:
    """corpus/queries: lists of dicts; qrels: {split: [(qid, docid, grade), ...]}."""
    write_lines(folder / "corpus.jsonl", [json.dumps(d) for d in corpus])
    write_lines(folder / "queries.jsonl", [json.dumps(q) for q in queries])
    for split, rows in qrels.items():
        lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{g}" for q, d, g in rows]
        write_lines(folder / "qrels" / f"{split}.tsv", lines)
    return folder


BEIR_CORPUS = [
    {"_id": "d1", "title": "Aspirin", "text": "Aspirin reduces fever."},
    {"_id": "d2", "title": "", "text": "Ibuprofen is an NSAID."},
    {"_id": 3, "text": "An integer id and no title."},
    {"_id": "d4", "title": "Long", "text": "one two three four five six seven"},
]
BEIR_QUERIES = [{"_id": "q1", "text": "what reduces fever"}, {"_id": "q2", "text": "nsaid"},
                {"_id": 7, "text": "integer query id"}]


def beir_dataset(folder: Path) -> Path:
    return write_beir(folder, BEIR_CORPUS, BEIR_QUERIES,
                      {"train": [("q1", "d1", 1), ("q1", "d2", 0), ("7", "3", 2)], "test": [("q2", "d2", 1)]})


def assert_data_error(excinfo, path, line):
    err = excinfo.value
    assert Path(err.path) == Path(path)
    assert err.line == line
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(prefix), str(err)


# ---------------------------------------------------------------- BEIR


def test_read_beir(tmp_path):
    ds = read_dataset(beir_dataset(tmp_path / "beir"))
    assert ds.corpus == [Passage("d1", "Aspirin", "Aspirin reduces fever."),
                         Passage("d2", "", "Ibuprofen is an NSAID."),
                         Passage("3", "", "An integer id and no title."),
                         Passage("d4", "Long", "one two three four five six seven")]
    assert set(ds.splits) == {"train", "test"}
    train = {q.id: q for q in ds.splits["train"]}
    assert train["q1"] == Query("q1", "what reduces fever", (), {"d1": 1, "d2": 0})
    assert train["q1"].positives == ["d1"]           # grade 0 is judged, not relevant
    assert train["7"].relevant == {"3": 2}
    assert train["7"].text == "integer query id"
    assert [q.id for q in ds.splits["test"]] == ["q2"]


def test_beir_qrels_header_is_optional(tmp_path):
    with_header = read_dataset(beir_dataset(tmp_path / "a"))
    folder = write_beir(tmp_path / "b", BEIR_CORPUS, BEIR_QUERIES,
                        {"train": [("q1", "d1", 1), ("q1", "d2", 0), ("7", "3", 2)], "test": [("q2", "d2", 1)]},
                        header=False)
    assert read_dataset(folder).splits == with_header.splits


def test_beir_without_qrels_raises(tmp_path):
    folder = write_beir(tmp_path / "beir", BEIR_CORPUS, BEIR_QUERIES, {})
    with pytest.raises(DataError, match="qrels"):
        read_dataset(folder)


# ---------------------------------------------------------------- DPR


def dpr_item(question, answers, positives=(), negatives=(), hard=()):
    return {"dataset": "toy", "question": question, "answers": list(answers), "positive_ctxs": list(positives),
            "negative_ctxs": list(negatives), "hard_negative_ctxs": list(hard)}


def write_dpr(folder: Path, splits, passages=None, indent=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
    if passages is not None:
        write_lines(folder / "passages.tsv", passages)
    return folder


def test_read_dpr_with_passages_tsv(tmp_path):
    passages = ["id\ttext\ttitle",
                "1\tParis is the capital of France.\tParis",
                '2\t"He said ""bonjour"" twice."\tGreeting',     # csv-quoted text
                '3\tA film.\t"The ""Best"" Film"']               # csv-quoted title
    no_id = {"title": "Lyon", "text": "Lyon is a city in France."}
    items = [
        dpr_item("capital of france?", ["Paris"],
                 positives=[{"title": "Paris", "text": "Paris is the capital of France.", "passage_id": "1"}],
                 negatives=[{"title": "Greeting", "text": "ignored: the TSV text wins", "passage_id": "2"}],
                 hard=[no_id]),
        dpr_item("a city in france", ["Lyon"], positives=[no_id],
                 hard=[{"title": "Other", "text": "Not in the TSV.", "passage_id": "99"}]),
    ]
    folder = write_dpr(tmp_path / "dpr", {"train": items, "dev": items[:1]}, passages)
    assert detect_format(folder) == "dpr"
    ds = read_dataset(folder)
    lyon_id = "h" + hashlib.sha1("Lyon\nLyon is a city in France.".encode()).hexdigest()[:16]
    assert content_id("Lyon", "Lyon is a city in France.") == lyon_id
    assert ds.corpus == [
        Passage("1", "Paris", "Paris is the capital of France."),
        Passage("2", "Greeting", 'He said "bonjour" twice.'),
        Passage("3", 'The "Best" Film', "A film."),
        # contexts that the TSV does not have join the corpus, in the order first seen
        Passage(lyon_id, "Lyon", "Lyon is a city in France."),
        Passage("99", "Other", "Not in the TSV."),
    ]
    train = ds.splits["train"]
    assert [q.id for q in train] == ["train-0", "train-1"]
    assert train[0] == Query("train-0", "capital of france?", ("Paris",), {"1": 1})
    assert train[1].relevant == {lyon_id: 1}                # positives only; negatives are not judged
    assert [q.id for q in ds.splits["dev"]] == ["dev-0"]


def test_read_dpr_without_passages_tsv_uses_every_context(tmp_path):
    items = [dpr_item("q", ["a"], positives=[{"title": "T", "text": "pos", "passage_id": "7"}],
                      negatives=[{"title": "", "text": "neg"}],
                      hard=[{"title": "H", "text": "hard", "psg_id": 8}])]
    ds = read_dataset(write_dpr(tmp_path / "dpr", {"test": items}))
    assert [p.id for p in ds.corpus] == ["7", content_id("", "neg"), "8"]
    assert ds.splits["test"][0].relevant == {"7": 1}


def test_read_dpr_integer_passage_id_zero(tmp_path):
    items = [dpr_item("q", [], positives=[{"title": "T", "text": "zero", "passage_id": 0}])]
    ds = read_dataset(write_dpr(tmp_path / "dpr", {"train": items}, ["0\tzero\tT"]))
    assert ds.corpus == [Passage("0", "T", "zero")]
    assert ds.splits["train"][0].relevant == {"0": 1}


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


# ---------------------------------------------------------------- transforms


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


# ---------------------------------------------------------------- prepared layout


def test_corpus_and_queries_round_trip(tmp_path):
    corpus = [Passage("a", "T", "text with \"quotes\" and \t tab"), Passage("b", "", "caf\u00e9 \u4e16")]
    queries = [Query("q1", "text", ("x", "y"), {"a": 2, "b": 0}), Query("q2", "other")]
    write_corpus(tmp_path / "corpus.jsonl", corpus)
    write_queries(tmp_path / "q.jsonl", queries)
    assert read_corpus(tmp_path / "corpus.jsonl") == corpus
    assert read_queries(tmp_path / "q.jsonl") == queries


def test_read_prepared_errors(tmp_path):
    write_lines(tmp_path / "q.jsonl", ['{"id": "q1", "text": "t", "relevant": {"a": 1}}',
                                       '{"id": "q2", "text": "t", "relevant": {"a": "high"}}'])
    with pytest.raises(DataError, match="integer grades") as e:
        read_queries(tmp_path / "q.jsonl")
    assert_data_error(e, tmp_path / "q.jsonl", 2)
    write_lines(tmp_path / "c.jsonl", [])
    with pytest.raises(DataError, match="empty") as e:
        read_corpus(tmp_path / "c.jsonl")
    assert_data_error(e, tmp_path / "c.jsonl", None)


# ---------------------------------------------------------------- prepare end to end


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


# ---------------------------------------------------------------- bad input: file and line


@pytest.mark.parametrize("line,problem", [
    ('{"_id": "x", "text": "unterminated}', "malformed JSON"),
    ('{"_id": "x", "text": "a"} trailing', "malformed JSON"),
    ('["_id", "x"]', "expected a JSON object"),
    ('{"_id": "x"}', "missing field 'text'"),
    ('{"_id": "x", "text": null}', "missing field 'text'"),
    ('{"text": "no id"}', "missing field '_id'"),
    ('{"_id": "x", "text": ["a", "list"]}', "field 'text' must be str, got list"),
    ('{"_id": 1.5, "text": "a"}', "field '_id' must be str, got float"),
    ('{"_id": "x", "title": true, "text": "a"}', "field 'title' must be str, got bool"),
])
def test_bad_corpus_line(tmp_path, line, problem):
    folder = beir_dataset(tmp_path / "beir")
    lines = [json.dumps(d) for d in BEIR_CORPUS]
    lines.insert(2, line)                                 # becomes line 3
    write_lines(folder / "corpus.jsonl", lines)
    with pytest.raises(DataError, match=problem) as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "corpus.jsonl", 3)


def test_blank_lines_count_in_line_numbers(tmp_path):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "queries.jsonl", ['{"_id": "q1", "text": "a"}', "", "   ", '{"_id": "q2"}'])
    with pytest.raises(DataError, match="missing field 'text'") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "queries.jsonl", 4)


def test_duplicate_query_id(tmp_path):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "queries.jsonl", ['{"_id": "q1", "text": "a"}', '{"_id": "q1", "text": "b"}'])
    with pytest.raises(DataError, match="duplicate query id 'q1'") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "queries.jsonl", 2)


@pytest.mark.parametrize("row,line,problem", [
    ("q1\tnope\t1", 3, "passage 'nope', which is not in the corpus"),   # an unknown document
    ("q9\td1\t1", 3, "query 'q9'"),                          # an unknown query
    ("q1\td1\thigh", 3, "relevance 'high' is not an integer"),
    ("q1\td1", 3, "expected 3 tab-separated columns, got 2"),
])
def test_bad_qrels_row(tmp_path, row, line, problem):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q2\td2\t1", row, "q2\td1\t0"])
    with pytest.raises(DataError, match=problem) as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "qrels" / "test.tsv", line)


def test_empty_corpus(tmp_path):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "corpus.jsonl", ["", "  "])
    with pytest.raises(DataError, match="corpus is empty") as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "corpus.jsonl", None)


def test_empty_dpr_corpus(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]})
    with pytest.raises(DataError, match="corpus is empty"):
        prepare(PrepareConfig(dataset=str(folder)))


@pytest.mark.parametrize("bad_line", [1, 4, 700])
def test_non_utf8_bytes_name_their_line(tmp_path, bad_line):
    # short lines, so the bad byte sits well inside the text layer's first read-ahead buffer
    folder = beir_dataset(tmp_path / "beir")
    lines = [json.dumps({"_id": f"x{i}", "text": f"text {i}"}).encode() for i in range(800)]
    lines[bad_line - 1] = b'{"_id": "bad", "text": "caf\xe9 latin-1"}'
    (folder / "corpus.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "corpus.jsonl", bad_line)


def test_non_utf8_in_dpr_json(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item(f"q{i}", ["a"]) for i in range(30)]})
    lines = (folder / "train.json").read_bytes().split(b"\n")
    bad = lines.index(b'    "question": "q20",')
    assert bad > 100
    lines[bad] = lines[bad].replace(b"q20", b"q\xff20")
    (folder / "train.json").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", bad + 1)


def test_non_utf8_in_passages_tsv(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]})
    (folder / "passages.tsv").write_bytes(b"id\ttext\ttitle\n1\tfine\tT\n2\tna\xefve\tT\n")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "passages.tsv", 3)


@pytest.mark.parametrize("item,problem", [
    ({"answers": ["a"]}, "missing field 'question'"),
    ({"question": "q", "answers": "a"}, "field 'answers' must be list, got str"),
    ({"question": "q", "answers": ["a", 1]}, "'answers' must be a list of strings"),
    ({"question": "q", "positive_ctxs": [{"title": "t"}]}, "missing field 'text'"),
    ({"question": "q", "positive_ctxs": ["just text"]}, "each of 'positive_ctxs' must be an object"),
    ({"question": "q", "hard_negative_ctxs": {"text": "x"}}, "field 'hard_negative_ctxs' must be list"),
    (["not", "an", "object"], "expected a JSON object per question"),
])
def test_bad_dpr_item_names_the_line_where_it_starts(tmp_path, item, problem):
    items = [dpr_item("first", ["a"]), dpr_item("second", ["b"]), item, dpr_item("fourth", ["d"])]
    folder = write_dpr(tmp_path / "dpr", {"train": items})
    # "[" is line 1; each item before the bad one takes as many lines as it does pretty-printed alone
    start = 2 + sum(len(json.dumps(it, indent=2).splitlines()) for it in items[:2])
    assert (folder / "train.json").read_text().splitlines()[start - 1] in ("  {", "  [")
    with pytest.raises(DataError, match=problem) as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", start)


def test_bad_passages_tsv_row(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]},
                       ["id\ttext\ttitle", "1\ta\tT", "2\tb with\ttoo\tmany", "3\tc\tT"])
    with pytest.raises(DataError, match="expected 3 tab-separated columns, got 4") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "passages.tsv", 3)


# ---------------------------------------------------------------- bad input the fuzz tests found


@pytest.mark.parametrize("line,problem", [
    ('{"_id": "a\\tb", "text": "x"}', "not a usable id"),            # a tab would break the run TSVs
    ('{"_id": "a\\nb", "text": "x"}', "not a usable id"),            # a newline would break ids.txt
    ('{"_id": " ", "text": "x"}', "not a usable id"),
    ('{"_id": "x", "text": "caf\\udce9"}', "unpaired UTF-16 surrogate"),  # fails only when written
    ('{"_id": "x", "text": "a", "n": ' + "9" * 5000 + "}", "malformed JSON"),  # ValueError, not JSONDecodeError
    ('{"_id": "x", "text": ' + "[" * 50_000 + "}", "malformed JSON"),     # RecursionError
])
def test_corpus_lines_that_used_to_crash_later(tmp_path, line, problem):
    folder = beir_dataset(tmp_path / "beir")
    lines = [json.dumps(d) for d in BEIR_CORPUS]
    lines.insert(1, line)
    write_lines(folder / "corpus.jsonl", lines)
    with pytest.raises(DataError, match=problem) as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "corpus.jsonl", 2)
    assert len(str(e.value)) < 700                       # one readable line, even for a huge field


def test_a_surrogate_pair_escape_is_text(tmp_path):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "corpus.jsonl", [json.dumps(d) for d in BEIR_CORPUS] +
                ['{"_id": "emoji", "text": "smile \\ud83d\\ude00"}'])
    ds, _ = prepare(PrepareConfig(dataset=str(folder)))
    assert ds.corpus[-1] == Passage("emoji", "", "smile \U0001F600")


def test_utf8_byte_order_mark_is_skipped(tmp_path):
    folder = beir_dataset(tmp_path / "beir")
    qrels = folder / "qrels" / "test.tsv"
    qrels.write_bytes(b"\xef\xbb\xbf" + qrels.read_bytes())      # the header is still recognised
    corpus = folder / "corpus.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + corpus.read_bytes())
    assert read_dataset(folder).splits == read_dataset(beir_dataset(tmp_path / "plain")).splits


def test_huge_line_is_a_data_error(tmp_path, monkeypatch):
    import dprpipe.io

    folder = beir_dataset(tmp_path / "beir")
    lines = [json.dumps(d) for d in BEIR_CORPUS]
    lines.insert(3, json.dumps({"_id": "big", "text": "word " * 400}))
    write_lines(folder / "corpus.jsonl", lines)
    assert len(prepare(PrepareConfig(dataset=str(folder)))[0].corpus) == 5
    monkeypatch.setattr(dprpipe.io, "MAX_LINE", 1000)
    with pytest.raises(DataError, match="line longer than 1000 characters") as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "corpus.jsonl", 4)


@pytest.mark.parametrize("row,problem", [
    ("q2\t\t1", "corpus id '' is not a usable id"),
    ("\td2\t1", "query id '' is not a usable id"),
    ("q2\td2\t1\x00", "NUL byte"),
    ("q2\td2\t" + "7" * 5000, "is not an integer"),
])
def test_bad_qrels_fields(tmp_path, row, problem):
    folder = beir_dataset(tmp_path / "beir")
    write_lines(folder / "qrels" / "test.tsv", ["q2\td2\t1", row])
    with pytest.raises(DataError, match=problem) as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, folder / "qrels" / "test.tsv", 2)
    assert len(str(e.value)) < 700


@pytest.mark.parametrize("ctx,problem", [
    ({"text": "t", "passage_id": 1.5}, "passage_id must be a string or an integer, got float"),
    ({"text": "t", "passage_id": ["1"]}, "passage_id must be a string or an integer, got list"),
    ({"text": "t", "passage_id": True}, "got bool"),
    ({"text": "t", "passage_id": "a\tb"}, "not a usable id"),
])
def test_bad_dpr_passage_ids(tmp_path, ctx, problem):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"], positives=[ctx])]})
    with pytest.raises(DataError, match=problem) as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", 2)


def test_text_after_the_dpr_list_is_an_error(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": _pretty_list(2)})
    path = folder / "train.json"
    path.write_text(path.read_text() + "\n[]\n")                     # two lists in one file
    with pytest.raises(DataError, match="after the closing") as e:
        read_dataset(folder)
    assert e.value.line == path.read_text().count("\n")


def test_a_huge_dpr_item_reads_in_linear_time(tmp_path):
    # one 4 MB item with a 1 kB chunk: re-parsing from the item's start on every chunk would take minutes
    import time

    item = dpr_item("q", ["a"], positives=[{"title": "", "text": "word " * 800_000, "passage_id": "1"}])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([item, item]))
    t0 = time.perf_counter()
    assert [line for line, _ in iter_json_array(path, chunk_size=1024)] == [1, 1]
    assert time.perf_counter() - t0 < 5


def test_prepared_queries_answers_must_be_strings(tmp_path):
    write_lines(tmp_path / "q.jsonl", ['{"id": "q1", "text": "t", "answers": ["a", 3]}'])
    with pytest.raises(DataError, match="list of strings") as e:
        read_queries(tmp_path / "q.jsonl")
    assert_data_error(e, tmp_path / "q.jsonl", 1)
    write_lines(tmp_path / "q.jsonl", ['{"id": "q1", "text": "t", "relevant": {"d": true}}'])
    with pytest.raises(DataError, match="integer grades"):
        read_queries(tmp_path / "q.jsonl")


# ---------------------------------------------------------------- iter_json_array

CHUNK_SIZES = [1, 2, 7, 16, 64, 1 << 20]


def _pretty_list(n=6):
    return [dpr_item(f"question {i}", [f"answer {i}"],
                     positives=[{"title": f"T{i}", "text": f"passage {i}", "passage_id": str(i)}])
            for i in range(n)]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("breakage", [
    ('"answer 3"', '"answer 3" "oops"'),          # missing comma inside the 4th item
    ('"passage 3",', '"passage 3"'),               # missing comma before "passage_id"
    ('"question 3"', "question 3"),                # an unquoted string
    ('"T3"', '"T3\\x"'),                            # a bad escape
    ('"answer 3"\n', '"answer 3",\n'),             # trailing comma in the answers list
])
def test_malformed_item_in_pretty_printed_list_exact_line(tmp_path, chunk_size, breakage):
    text = json.dumps(_pretty_list(), indent=2)
    old, new = breakage
    assert text.count(old) == 1
    text = text.replace(old, new)
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    # reference: the line json.loads reports for the same text
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    items = []
    with pytest.raises(DataError, match="malformed JSON") as e:
        for line, item in iter_json_array(path, chunk_size=chunk_size):
            items.append(item)
    assert_data_error(e, path, ref.value.lineno)
    assert [it["question"] for it in items] == ["question 0", "question 1", "question 2"]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_item_start_lines_in_pretty_printed_list(tmp_path, chunk_size):
    items = _pretty_list()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    # reference: each item occupies len(json.dumps(item, indent=2) lines); "[" is line 1
    expected, line = [], 2
    for item in items:
        expected.append(line)
        line += len(json.dumps(item, indent=2).splitlines())
    got = list(iter_json_array(path, chunk_size=chunk_size))
    assert [item for _, item in got] == items
    assert [line for line, _ in got] == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(alphabet="ab\n\"\\é,[]{} ", max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text("xyz", max_size=3), children,
                                                                      max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(json_values.map(lambda v: {"v": v}), max_size=6),
       indents=st.lists(st.sampled_from([None, 0, 1, 2]), min_size=6, max_size=6),
       gaps=st.lists(st.sampled_from(["", " ", "\n", "\n\n", "\t\n  "]), min_size=8, max_size=8),
       chunk_size=st.sampled_from(CHUNK_SIZES))
def test_iter_json_array_items_and_lines_on_random_layouts(tmp_path_factory, items, indents, gaps, chunk_size):
    # build the file piece by piece, so the start line of each item is known
    parts, expected, line = [gaps[0], "["], [], 1 + gaps[0].count("\n")
    for i, item in enumerate(items):
        if i:
            parts.append(",")
        gap = gaps[1 + i % 6]
        parts.append(gap)
        line += gap.count("\n")
        expected.append(line)
        body = json.dumps(item, indent=indents[i % 6], ensure_ascii=False)
        parts.append(body)
        line += body.count("\n")
    parts += [gaps[7], "]\n"]
    path = tmp_path_factory.mktemp("json") / "list.json"
    path.write_text("".join(parts), encoding="utf-8")
    got = list(iter_json_array(path, chunk_size=chunk_size))
    assert [item for _, item in got] == items
    assert [line for line, _ in got] == expected


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("cut", ["after_item", "mid_item", "after_comma", "only_bracket"])
def test_truncated_list(tmp_path, chunk_size, cut):
    full = json.dumps(_pretty_list(3), indent=2)
    first_end = full.index("\n  },") + len("\n  }")
    text = {"after_item": full[:first_end],
            "mid_item": full[:first_end - 40],
            "after_comma": full[:first_end + 1] + "\n",
            "only_bracket": "[\n"}[cut]
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="truncated|malformed JSON") as e:
        list(iter_json_array(path, chunk_size=chunk_size))
    assert Path(e.value.path) == path
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    # the reported line is where the text runs out (as json.loads reports it)
    assert e.value.line == ref.value.lineno


def test_truncated_dpr_file_in_prepare(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": _pretty_list(3)})
    path = folder / "train.json"
    text = path.read_text()
    truncated = text[: text.rindex("]")]
    path.write_text(truncated)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(truncated)
    with pytest.raises(DataError, match="truncated") as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, path, ref.value.lineno)
    assert ref.value.lineno == text.count("\n") + 1   # the empty line after the last item


@pytest.mark.parametrize("text,line,problem", [
    ('{"question": "not a list"}', 1, "expected a JSON list"),
    ("\n\n  null", 3, "expected a JSON list"),
    ("", 1, "expected a JSON list"),
    ('[{"a": 1}\n {"a": 2}]', 2, "expected ',' or ']'"),
])
def test_not_a_list(tmp_path, text, line, problem):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as e:
        list(iter_json_array(path))
    assert_data_error(e, path, line)


def test_empty_and_compact_lists(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[]")
    assert list(iter_json_array(path)) == []
    path.write_text('[{"a": 1},{"a": [2, 3]} , {"a": "]"}]')
    assert list(iter_json_array(path, chunk_size=3)) == [(1, {"a": 1}), (1, {"a": [2, 3]}), (1, {"a": "]"})]


def test_docstring_examples():
    import doctest

    import dprpipe.data as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
