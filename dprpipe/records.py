"""The records every stage sees, and the prepared files that hold them.

Records: `Passage` (id, title, text), `Query` (id, text, answers, judged passages with their
grades) and `Dataset` (a corpus and its query splits).

Files (the prepared layout that prepare writes and every later stage reads), JSONL written atomically:
- `corpus.jsonl`: {"id", "title", "text"} per passage;
- `<split>.jsonl`: {"id", "text", "answers": [...], "relevant": {docid: grade}} per query;
- `pieces.json`, only where documents were split (`prepare.max_words`): the piece map
  {docid: [piece ids]} of the split documents (`write_pieces`, `read_pieces`).
A bad record is a DataError naming the file and the line.

`field_value`, `id_field` and `check_id` are the field checks the dataset readers share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .io import DataError, clip, open_text, read_jsonl, write_json, write_jsonl

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    answers: tuple[str, ...] = ()
    relevant: Mapping[str, int] = field(default_factory=dict)  # docid -> graded relevance

    @property
    def positives(self) -> list[str]:
        """Ids of passages judged relevant (grade > 0), in a stable order."""
        return [d for d, g in self.relevant.items() if g > 0]


@dataclass
class Dataset:
    """A corpus (kept as a list: the later stages index it by position) and query splits.

    `pieces`: of a corpus whose documents were split, document id -> its piece ids, for the
    documents that were split (see `dprpipe.prepare`); empty when documents are kept whole.
    """

    corpus: list[Passage]
    splits: dict[str, list[Query]]
    pieces: dict[str, list[str]] = field(default_factory=dict)
    # query id -> hard negatives the dataset provides [(passage id, score)], best first (DPR's
    # hard_negative_ctxs); empty when it provides none
    negatives: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


# ---------------------------------------------------------------- field checks

def field_value(obj: Mapping, key: str, path, lineno, kind=str, required: bool = True, default=None,
                numeric: bool = False):
    """Fetch `key` from a record, raising a DataError naming file and line when missing or mistyped.

    `numeric`: an integer is taken as its decimal string (numeric ids are common in BEIR files).
    """
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, lineno, f"missing field {key!r}")
        return default
    value = obj[key]
    if numeric and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind):
        raise DataError(path, lineno, f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def check_id(value: str, path, lineno, what: str) -> str:
    """An id must be non-empty and free of tabs and line breaks: run files are TSV, id lists one per line."""
    if not value.strip() or any(c in value for c in "\t\n\r"):
        raise DataError(path, lineno, f"{what} {clip(value)} is not a usable id "
                        "(it must be non-empty, without tabs or line breaks)")
    return value


def id_field(obj: Mapping, key: str, path, lineno) -> str:
    """The id in field `key` of a record (an integer is taken as its decimal string), checked."""
    return check_id(field_value(obj, key, path, lineno, numeric=True), path, lineno, f"field {key!r}")


# ---------------------------------------------------------------- the prepared layout

def write_corpus(path: str | os.PathLike, corpus: Iterable[Passage]) -> int:
    return write_jsonl(path, ({"id": p.id, "title": p.title, "text": p.text} for p in corpus))


def iter_corpus(path: str | os.PathLike) -> Iterator[Passage]:
    """Stream the passages of a prepared corpus file (`write_corpus`'s format), in file order."""
    for n, o in read_jsonl(path):
        yield Passage(field_value(o, "id", path, n, numeric=True),
                      field_value(o, "title", path, n, required=False, default=""), field_value(o, "text", path, n))


def read_corpus(path: str | os.PathLike) -> list[Passage]:
    corpus = list(iter_corpus(path))
    if not corpus:
        raise DataError(path, None, "the corpus is empty")
    return corpus


def write_queries(path: str | os.PathLike, queries: Iterable[Query]) -> int:
    return write_jsonl(path, ({"id": q.id, "text": q.text, "answers": list(q.answers),
                               "relevant": dict(q.relevant)} for q in queries))


def read_queries(path: str | os.PathLike) -> list[Query]:
    out = []
    for n, o in read_jsonl(path):
        rel = field_value(o, "relevant", path, n, kind=dict, required=False, default={})
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in rel.values()):
            raise DataError(path, n, "field 'relevant' must map passage ids to integer grades")
        answers = field_value(o, "answers", path, n, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, n, "field 'answers' must be a list of strings")
        out.append(Query(field_value(o, "id", path, n, numeric=True), field_value(o, "text", path, n),
                         tuple(answers), rel))
    return out

def write_pieces(path: str | os.PathLike, pieces: Mapping[str, Iterable[str]]) -> None:
    write_json(path, {doc: list(ids) for doc, ids in pieces.items()})


def read_pieces(path: str | os.PathLike) -> dict[str, list[str]]:
    """The piece map {docid: [piece ids]}; a malformed file or a piece listed twice is a DataError."""
    with open_text(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DataError(path, None, f"malformed JSON ({e}); rerun the prepare stage") from None
    if not isinstance(obj, dict):
        raise DataError(path, None, "expected a JSON object {document id: [piece ids]}")
    owner: dict[str, str] = {}
    for doc, ids in obj.items():
        if not isinstance(ids, list) or not ids or not all(isinstance(p, str) for p in ids):
            raise DataError(path, None, f"document {clip(doc)}: expected a non-empty list of piece ids")
        for pid in ids:
            if pid in owner:
                raise DataError(path, None, f"piece {clip(pid)} is listed under documents {clip(owner[pid])} "
                                f"and {clip(doc)}")
            owner[pid] = doc
    return obj


def owners(pieces: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """piece id -> document id, from a piece map.

    >>> owners({"d": ["d#0", "d#1"]})
    {'d#0': 'd', 'd#1': 'd'}
    """
    return {pid: doc for doc, ids in pieces.items() for pid in ids}
