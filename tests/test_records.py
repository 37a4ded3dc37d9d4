"""dprpipe.records: the prepared corpus and query files, written and read back."""

import pytest
from dataset_fixtures import assert_data_error, write_lines

from dprpipe.io import DataError
from dprpipe.records import Passage, Query, read_corpus, read_queries, write_corpus, write_queries


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


def test_prepared_queries_answers_must_be_strings(tmp_path):
    write_lines(tmp_path / "q.jsonl", ['{"id": "q1", "text": "t", "answers": ["a", 3]}'])
    with pytest.raises(DataError, match="list of strings") as e:
        read_queries(tmp_path / "q.jsonl")
    assert_data_error(e, tmp_path / "q.jsonl", 1)
    write_lines(tmp_path / "q.jsonl", ['{"id": "q1", "text": "t", "relevant": {"d": true}}'])
    with pytest.raises(DataError, match="integer grades"):
        read_queries(tmp_path / "q.jsonl")
