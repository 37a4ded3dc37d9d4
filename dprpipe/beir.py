"""The BEIR dataset format: read a BEIR folder into a `RawDataset` (every record, with its file and line).

Inputs (read streaming): `corpus.jsonl` ({"_id", "title"?, "text"}), `queries.jsonl`
({"_id", "text"}), `qrels/{train,dev,test}.tsv` (`query-id\\tcorpus-id\\tscore`, header row
optional). A split is the queries its qrels file names, in file order. A format error is a
DataError naming the file and line; the data checks run later, in the prepare step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from .io import DataError, clip, read_jsonl, read_tsv
from .raw import Judgement, RawDataset
from .records import SPLITS, Passage, Query, check_id, field_value, id_field


def read_beir_corpus(path: str | os.PathLike) -> Iterator[tuple[int, Passage]]:
    """(line, passage) for each record of a BEIR corpus.jsonl, in file order (repeated ids too)."""
    for lineno, obj in read_jsonl(path):
        yield lineno, Passage(
            id=id_field(obj, "_id", path, lineno),
            title=field_value(obj, "title", path, lineno, required=False, default=""),
            text=field_value(obj, "text", path, lineno),
        )


def read_beir_queries(path: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
    """(line, query id, text) for each record of a BEIR queries.jsonl, in file order."""
    for lineno, obj in read_jsonl(path):
        yield lineno, id_field(obj, "_id", path, lineno), field_value(obj, "text", path, lineno)


def read_qrels_rows(path: str | os.PathLike) -> Iterator[tuple[int, str, str, int]]:
    """(line, qid, docid, grade) for each row of a qrels TSV (`qid\\tdocid\\tgrade`, optional header)."""
    for lineno, (qid, docid, grade) in read_tsv(path, 3, header=("query-id", "corpus-id")):
        try:
            g = int(grade)
        except ValueError:
            raise DataError(path, lineno, f"relevance {clip(grade)} is not an integer") from None
        yield lineno, check_id(qid, path, lineno, "query id"), check_id(docid, path, lineno, "corpus id"), g


def read_beir_raw(folder: str | os.PathLike) -> RawDataset:
    """Every record of a BEIR folder, with where it came from."""
    folder = Path(folder)
    raw = RawDataset()
    path = folder / "corpus.jsonl"
    for lineno, p in read_beir_corpus(path):
        raw.passages.append(p)
        raw.passage_at.append(path, lineno)
    if not raw.passages:
        raise DataError(path, None, "the corpus is empty")
    path = folder / "queries.jsonl"
    for lineno, qid, text in read_beir_queries(path):
        raw.queries.append(Query(qid, text))
        raw.query_at.append(path, lineno)
    for split in SPLITS:
        path = folder / "qrels" / f"{split}.tsv"
        if not path.exists():
            continue
        qids: dict[str, None] = {}
        for lineno, qid, docid, grade in read_qrels_rows(path):
            raw.judgements.append(Judgement(split, qid, docid, grade))
            raw.judgement_at.append(path, lineno)
            qids[qid] = None
        raw.split_queries[split] = list(qids)
    if not raw.split_queries:
        raise DataError(folder / "qrels", None, "no qrels/{train,dev,test}.tsv found")
    return raw
