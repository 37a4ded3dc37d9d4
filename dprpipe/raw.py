"""A dataset as read, before the data checks: every record with the file and line it came from.

The dataset readers (`dprpipe.beir`, `dprpipe.dpr_format`) fill a `RawDataset`; the prepare step
runs the data checks on it (`dprpipe.checks`) and `resolve` builds the `Dataset` without the
records they drop.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Container
from dataclasses import dataclass, field
from typing import NamedTuple

from .checks import Loc
from .records import Dataset, Passage, Query


class Locations:
    """The file and line of each record of a list, compactly (a file number and a line each).

    >>> at = Locations()
    >>> at.append("a.jsonl", 3); at.append("b.tsv", None)
    >>> at[0], at[1], len(at)
    (('a.jsonl', 3), ('b.tsv', None), 2)
    """

    def __init__(self) -> None:
        self._files: list[str] = []
        self._file_no: dict[str, int] = {}
        self._file = array("I")
        self._line = array("q")   # -1: no line

    def append(self, path: str | os.PathLike, line: int | None) -> None:
        path = str(path)
        if path not in self._file_no:
            self._file_no[path] = len(self._files)
            self._files.append(path)
        self._file.append(self._file_no[path])
        self._line.append(-1 if line is None else line)

    def __getitem__(self, i: int) -> Loc:
        line = self._line[i]
        return self._files[self._file[i]], (None if line < 0 else line)

    def __len__(self) -> int:
        return len(self._line)


class Judgement(NamedTuple):
    split: str
    qid: str
    docid: str
    grade: int


@dataclass
class RawDataset:
    """A dataset as read, before the data checks: every record, with the file and line it came from.

    Repeated ids, judgements of passages or queries that are not there, and queries that no
    split judges are all still here: `dprpipe.checks` finds them, `resolve` builds the Dataset.
    """

    passages: list[Passage] = field(default_factory=list)
    passage_at: Locations = field(default_factory=Locations)
    queries: list[Query] = field(default_factory=list)          # without judgements (`relevant` is empty)
    query_at: Locations = field(default_factory=Locations)
    judgements: list[Judgement] = field(default_factory=list)
    judgement_at: Locations = field(default_factory=Locations)
    split_queries: dict[str, list[str]] = field(default_factory=dict)  # split -> its query ids, in order
    # query id -> the dataset's own hard negatives [(passage id, score)], best first (DPR's
    # hard_negative_ctxs); only for questions of files that provide them
    negatives: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    # questions scored by their answers alone (QA CSV test sets): they have no judgements by design
    scored_by_answers: set[str] = field(default_factory=set)


def resolve(raw: RawDataset, drop_passages: Container[int] = (), drop_queries: Container[int] = (),
            drop_judgements: Container[int] = ()) -> Dataset:
    """The Dataset of `raw` without the records at the given positions.

    A split keeps the queries it names that are still there, in order, each with its judgements,
    and the provided negatives of those queries.
    """
    corpus = [p for i, p in enumerate(raw.passages) if i not in drop_passages] if drop_passages else raw.passages
    queries = {q.id: q for i, q in enumerate(raw.queries) if i not in drop_queries}
    relevant: dict[tuple[str, str], dict[str, int]] = {}
    for i, j in enumerate(raw.judgements):
        if i not in drop_judgements:
            relevant.setdefault((j.split, j.qid), {})[j.docid] = j.grade
    splits = {}
    for split, qids in raw.split_queries.items():
        splits[split] = [Query(qid, queries[qid].text, queries[qid].answers, relevant.get((split, qid), {}))
                         for qid in qids if qid in queries]
    negatives = {qid: negs for qid, negs in raw.negatives.items() if qid in queries}
    return Dataset(corpus=corpus, splits=splits, negatives=negatives)
