"""dprpipe.beir: reading BEIR folders; every format error names its file and line."""

import json

import pytest
from dataset_fixtures import BEIR_CORPUS, BEIR_QUERIES, assert_data_error, beir_dataset, write_beir, write_lines

from dprpipe.io import DataError
from dprpipe.prepare import PrepareConfig, prepare, read_dataset
from dprpipe.records import Passage, Query


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
