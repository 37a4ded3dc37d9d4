"""Data formats: read BEIR and DPR datasets, write and read the prepared corpus and splits.

Inputs (read streaming):
- BEIR layout: `corpus.jsonl` ({"_id", "title"?, "text"}), `queries.jsonl` ({"_id", "text"}),
  `qrels/{train,dev,test}.tsv` (`query-id\\tcorpus-id\\tscore`, header row optional).
- DPR layout: `{train,dev,test}.json`, each a JSON list of
  {"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"} with ctxs
  {"title", "text", "passage_id"?}, plus an optional `passages.tsv` (`id\\ttext\\ttitle`, like
  DPR's psgs_w100.tsv). Contexts without a passage_id get a content-hash id.

Reading is two steps: `read_raw` parses the files (a format error is a DataError naming the
file and line) into a `RawDataset` that keeps every record and where it came from; `checked`
runs the data checks of `dprpipe.checks` (repeated ids, empty texts, judgements of missing
passages, queries without a relevant passage, the same question in two splits) under the
`prepare.on_*` policies and builds the `Dataset`.

Outputs (the prepared layout every later stage reads):
- `corpus.jsonl`: {"id", "title", "text"} per passage;
- `<split>.jsonl`: {"id", "text", "answers": [...], "relevant": {docid: grade}} per query.

Every other module sees only the typed records `Passage` and `Query`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from . import checks
from .checks import Loc
from .io import DataError, check_text, clip, open_text, read_jsonl, read_tsv, write_jsonl

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
    """A corpus (kept as a list: the later stages index it by position) and query splits."""

    corpus: list[Passage]
    splits: dict[str, list[Query]]


# ---------------------------------------------------------------- where records come from

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


def resolve(raw: RawDataset, drop_passages: Container[int] = (), drop_queries: Container[int] = (),
            drop_judgements: Container[int] = ()) -> Dataset:
    """The Dataset of `raw` without the records at the given positions.

    A split keeps the queries it names that are still there, in order, each with its judgements.
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
    return Dataset(corpus=corpus, splits=splits)


# ---------------------------------------------------------------- helpers

def _field(obj: Mapping, key: str, path, lineno, kind=str, required: bool = True, default=None,
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


def _id_field(obj: Mapping, key: str, path, lineno) -> str:
    return check_id(_field(obj, key, path, lineno, numeric=True), path, lineno, f"field {key!r}")


def content_id(title: str, text: str) -> str:
    """A stable id for a context that has none: 'h' + 16 hex digits of SHA-1 of title and text."""
    return "h" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]


def iter_json_array(path: str | os.PathLike, chunk_size: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Stream the items of a top-level JSON list, yielding (line where the item starts, item).

    Memory stays at about one item plus one chunk, so multi-GB DPR files are fine, and a
    malformed item is reported with its exact line. An item longer than a chunk doubles the
    read-ahead until it fits, so a huge item costs linear, not quadratic, time.
    """
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def fill(size: int = chunk_size) -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(size)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(path, line, "expected a JSON list ('[') of DPR records")
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                raise DataError(path, line, "file ends before the closing ']' (truncated?)")
            if buf[pos] == "]":
                pos += 1
                skip_ws()
                if pos < len(buf):
                    raise DataError(path, line, "unexpected text after the closing ']' of the list")
                return
            if not first:
                if buf[pos] != ",":
                    raise DataError(path, line, f"expected ',' or ']' between items, got {buf[pos]!r}")
                pos += 1
                skip_ws()
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not eof and fill(max(chunk_size, len(buf) - pos)):  # maybe the chunk cuts the item
                        continue
                    bad_line = line + buf.count("\n", pos, e.pos)
                    raise DataError(path, bad_line, f"malformed JSON ({e.msg})") from None
                except ValueError as e:  # e.g. an integer of more than 4300 digits
                    raise DataError(path, line, f"malformed JSON ({e})") from None
                except RecursionError:
                    raise DataError(path, line, "malformed JSON (nested too deeply)") from None
            check_text(item, buf[pos:end], path, line)
            yield line, item
            line += buf.count("\n", pos, end)
            pos = end
            first = False


# ---------------------------------------------------------------- BEIR

def read_beir_corpus(path: str | os.PathLike) -> Iterator[tuple[int, Passage]]:
    """(line, passage) for each record of a BEIR corpus.jsonl, in file order (repeated ids too)."""
    for lineno, obj in read_jsonl(path):
        yield lineno, Passage(
            id=_id_field(obj, "_id", path, lineno),
            title=_field(obj, "title", path, lineno, required=False, default=""),
            text=_field(obj, "text", path, lineno),
        )


def read_beir_queries(path: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
    """(line, query id, text) for each record of a BEIR queries.jsonl, in file order."""
    for lineno, obj in read_jsonl(path):
        yield lineno, _id_field(obj, "_id", path, lineno), _field(obj, "text", path, lineno)


def read_qrels_rows(path: str | os.PathLike) -> Iterator[tuple[int, str, str, int]]:
    """(line, qid, docid, grade) for each row of a qrels TSV (`qid\\tdocid\\tgrade`, optional header)."""
    for lineno, (qid, docid, grade) in read_tsv(path, 3, header=("query-id", "corpus-id")):
        try:
            g = int(grade)
        except ValueError:
            raise DataError(path, lineno, f"relevance {clip(grade)} is not an integer") from None
        yield lineno, check_id(qid, path, lineno, "query id"), check_id(docid, path, lineno, "corpus id"), g


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """A qrels TSV as qid -> {docid: grade} (a repeated row: the first one counts)."""
    qrels: dict[str, dict[str, int]] = {}
    for _, qid, docid, grade in read_qrels_rows(path):
        qrels.setdefault(qid, {}).setdefault(docid, grade)
    return qrels


def read_beir_raw(folder: str | os.PathLike) -> RawDataset:
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


# ---------------------------------------------------------------- DPR

def read_dpr_passages(path: str | os.PathLike) -> Iterator[tuple[int, Passage]]:
    """(line, passage) for each row of a DPR passages TSV: `id\\ttext\\ttitle`, header row optional."""
    for lineno, (pid, text, title) in read_tsv(path, 3, header=("id", "text", "title")):
        # psgs_w100.tsv is written by the csv module: fields that contain quotes are quoted
        yield lineno, Passage(id=check_id(pid, path, lineno, "passage id"), title=_unquote(title),
                              text=_unquote(text))


def _unquote(field: str) -> str:
    """Undo CSV quoting.

    >>> _unquote('"say ""hi"" twice"')
    'say "hi" twice'
    """
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _context_id(ctx: Mapping, title: str, text: str, path, lineno) -> str:
    pid = next((ctx[k] for k in ("passage_id", "psg_id") if ctx.get(k) not in (None, "")), None)
    if pid is None:
        return content_id(title, text)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise DataError(path, lineno, f"a context's passage_id must be a string or an integer, "
                        f"got {type(pid).__name__}")
    return check_id(str(pid), path, lineno, "passage_id")


def _same_passage(passage: Passage, title: str, text: str) -> bool:
    """A context repeats `passage` only if both its title and its text are the same."""
    return (passage.title, passage.text) == (title, text)


def read_dpr_questions(path: str | os.PathLike, split: str, raw: RawDataset,
                       contexts: dict[str, int], from_tsv: int = 0) -> None:
    """Add the questions of a DPR biencoder JSON list to `raw`, with their positive contexts as judgements.

    Contexts are gathered in `contexts` (passage id -> position in `raw.passages`): a context
    seen again under the same id and with the same title and text is the same passage. One with
    another title or text is a second record of that id, which the `duplicate_ids` check reports
    (the first one is kept under `warn`). A passage of passages.tsv wins over a context of its id:
    the TSV is the corpus, a context only a copy of it. Contexts without a passage_id get a
    content-hash id.
    """
    # passages at positions below `from_tsv` came from passages.tsv, which no context overrides
    qids = raw.split_queries.setdefault(split, [])
    for n, (lineno, item) in enumerate(iter_json_array(path)):
        if not isinstance(item, dict):
            raise DataError(path, lineno, f"expected a JSON object per question, got {type(item).__name__}")
        question = _field(item, "question", path, lineno)
        answers = _field(item, "answers", path, lineno, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, lineno, "field 'answers' must be a list of strings")
        qid = f"{split}-{n}"
        for key, grade in (("positive_ctxs", 1), ("negative_ctxs", None), ("hard_negative_ctxs", None)):
            for ctx in _field(item, key, path, lineno, kind=list, required=False, default=[]):
                if not isinstance(ctx, dict):
                    raise DataError(path, lineno, f"each of {key!r} must be an object")
                title = _field(ctx, "title", path, lineno, required=False, default="")
                text = _field(ctx, "text", path, lineno)
                pid = _context_id(ctx, title, text, path, lineno)
                seen = contexts.get(pid)
                if seen is None or (seen >= from_tsv and not _same_passage(raw.passages[seen], title, text)):
                    contexts.setdefault(pid, len(raw.passages))
                    raw.passages.append(Passage(pid, title, text))
                    raw.passage_at.append(path, lineno)
                if grade:
                    raw.judgements.append(Judgement(split, qid, pid, grade))
                    raw.judgement_at.append(path, lineno)
        raw.queries.append(Query(qid, question, tuple(answers)))
        raw.query_at.append(path, lineno)
        qids.append(qid)


def read_dpr_raw(folder: str | os.PathLike) -> RawDataset:
    """Read a DPR folder; the corpus is passages.tsv if present, plus every context it lacks."""
    folder = Path(folder)
    raw = RawDataset()
    tsv = folder / "passages.tsv"
    contexts: dict[str, int] = {}
    if tsv.exists():
        for lineno, p in read_dpr_passages(tsv):
            raw.passages.append(p)
            raw.passage_at.append(tsv, lineno)
            contexts.setdefault(p.id, len(raw.passages) - 1)  # the TSV's text wins over a context's
    from_tsv = len(raw.passages)
    for split in SPLITS:
        if (folder / f"{split}.json").exists():
            read_dpr_questions(folder / f"{split}.json", split, raw, contexts, from_tsv)
    if not raw.split_queries:
        raise DataError(folder, None, "no DPR {train,dev,test}.json found")
    if not raw.passages:
        raise DataError(folder, None, "the corpus is empty: no passages.tsv and no contexts in the questions")
    return raw


def detect_format(folder: str | os.PathLike) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "dataset folder not found; set prepare.dataset in params.yaml")
    if (folder / "corpus.jsonl").exists():
        return "beir"
    if any((folder / f"{s}.json").exists() for s in SPLITS):
        return "dpr"
    raise DataError(folder, None, "cannot tell the format: expected corpus.jsonl (BEIR) "
                    "or {train,dev,test}.json (DPR); or set prepare.format")


def read_raw(folder: str | os.PathLike, fmt: str = "auto") -> RawDataset:
    """Every record of a BEIR or DPR folder, with where it came from; format errors raise DataError."""
    fmt = detect_format(folder) if fmt == "auto" else fmt
    readers = {"beir": read_beir_raw, "dpr": read_dpr_raw}
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of auto, beir, dpr")
    return readers[fmt](folder)


def read_dataset(folder: str | os.PathLike, fmt: str = "auto") -> Dataset:
    """Read a BEIR or DPR folder and apply the data checks with the default policies of `PrepareConfig`."""
    ds, _, _ = checked(read_raw(folder, fmt), PrepareConfig().policies())
    return ds


# ---------------------------------------------------------------- transforms

def split_passages(corpus: Iterable[Passage], max_words: int) -> tuple[list[Passage], dict[str, list[str]]]:
    """Split documents into passages of at most `max_words` words (DPR used 100).

    Each piece keeps the document title. Returns the passages and docid -> [passage ids].
    A document that fits in one piece keeps its id; longer ones get `docid#0`, `docid#1`, ...

    >>> ps, m = split_passages([Passage("d", "T", "a b c")], 2)
    >>> [(p.id, p.text) for p in ps], m
    ([('d#0', 'a b'), ('d#1', 'c')], {'d': ['d#0', 'd#1']})
    """
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    out: list[Passage] = []
    pieces: dict[str, list[str]] = {}
    for doc in corpus:
        words = doc.text.split()
        if len(words) <= max_words:
            out.append(doc)
            pieces[doc.id] = [doc.id]
            continue
        ids = []
        for i, start in enumerate(range(0, len(words), max_words)):
            pid = f"{doc.id}#{i}"
            out.append(Passage(pid, doc.title, " ".join(words[start:start + max_words])))
            ids.append(pid)
        pieces[doc.id] = ids
    return out, pieces


def carry_labels(queries: list[Query], pieces: Mapping[str, list[str]]) -> list[Query]:
    """Give every passage of a judged document the document's grade."""
    return [Query(q.id, q.text, q.answers,
                  {pid: g for d, g in q.relevant.items() for pid in pieces.get(d, [d])})
            for q in queries]


def hold_out(queries: list[Query], fraction: float, seed: int) -> tuple[list[Query], list[Query]]:
    """Split queries into (kept, held out) with a seeded shuffle; order within each part is kept."""
    if not 0 <= fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {fraction}")
    n_out = round(len(queries) * fraction)
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    out = set(order[:n_out])
    return ([q for i, q in enumerate(queries) if i not in out],
            [q for i, q in enumerate(queries) if i in out])


# ---------------------------------------------------------------- prepared layout

def write_corpus(path: str | os.PathLike, corpus: Iterable[Passage]) -> int:
    return write_jsonl(path, ({"id": p.id, "title": p.title, "text": p.text} for p in corpus))


def iter_corpus(path: str | os.PathLike) -> Iterator[Passage]:
    """Stream the passages of a prepared corpus file (`write_corpus`'s format), in file order."""
    for n, o in read_jsonl(path):
        yield Passage(_field(o, "id", path, n, numeric=True), _field(o, "title", path, n, required=False, default=""),
                      _field(o, "text", path, n))


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
        rel = _field(o, "relevant", path, n, kind=dict, required=False, default={})
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in rel.values()):
            raise DataError(path, n, "field 'relevant' must map passage ids to integer grades")
        answers = _field(o, "answers", path, n, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, n, "field 'answers' must be a list of strings")
        out.append(Query(_field(o, "id", path, n, numeric=True), _field(o, "text", path, n), tuple(answers), rel))
    return out


# ---------------------------------------------------------------- the prepare step

POLICIES = ("error", "warn")


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str = "../shared/datasets/scifact"
    format: str = "auto"          # auto | beir | dpr
    max_words: int = 0            # split documents into passages of at most this many words; 0 = keep whole
    dev_fraction: float = 0.1     # held out of train for validation when the dataset has no dev split
    seed: int = 13
    # data checks (dprpipe.checks): "error" stops prepare at the first case, "warn" reports and goes on
    on_duplicate_ids: str = "error"     # a passage, query or judgement seen twice; warn keeps the first
    on_empty_texts: str = "warn"        # a passage or query with a blank text; warn keeps it
    on_missing_passages: str = "error"  # a judgement of a passage (or query) that is not there; warn drops it
    on_unjudged_queries: str = "warn"   # a query with no relevant passage; warn keeps it (BEIR leaves out
                                        # queries that no qrels file names)
    on_leakage: str = "warn"            # the same question text in two splits; warn keeps both

    def __post_init__(self):
        if self.format not in ("auto", "beir", "dpr"):
            raise ValueError(f"format {self.format!r} is not a dataset format; expected auto, beir or dpr")
        if self.max_words < 0:
            raise ValueError(f"max_words must be >= 0 (0 keeps documents whole), got {self.max_words}")
        if not 0 <= self.dev_fraction < 1:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        for check, policy in self.policies().items():
            if policy not in POLICIES:
                raise ValueError(f"on_{check} must be 'error' or 'warn', got {policy!r}")

    def policies(self) -> dict[str, str]:
        """check name -> "error" | "warn", from the `on_<check>` fields."""
        return {f.name[3:]: getattr(self, f.name) for f in fields(self) if f.name.startswith("on_")}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checked(raw: RawDataset, policies: Mapping[str, str], warn: Callable[[str], None] = _stderr
            ) -> tuple[Dataset, dict[str, int], dict[str, Loc]]:
    """Run the data checks on `raw` under `policies` and build the Dataset.

    Returns the dataset, the number of cases per check, and where each query came from (for
    the leakage check, which runs on the final splits). A check whose policy is "error" raises
    a DataError naming its first case; "warn" calls `warn` with one line per check.
    """
    counts: dict[str, int] = {}

    def apply(check: str, found: list[checks.Finding]) -> None:
        counts[check] = len(found)
        checks.enforce(found, check, policies[check], warn)

    # in this order, so that a record dropped by one check is not a case of the next
    p_ids = [p.id for p in raw.passages]
    q_ids = [q.id for q in raw.queries]
    dup_p = checks.duplicate_ids(p_ids, raw.passage_at, lambda k: f"passage id {clip(k)}")
    dup_q = checks.duplicate_ids(q_ids, raw.query_at, lambda k: f"query id {clip(k)}")
    dup_j = checks.duplicate_ids([(j.split, j.qid, j.docid) for j in raw.judgements], raw.judgement_at,
                                 lambda k: f"judgement of query {clip(k[1])} against passage {clip(k[2])}")
    apply("duplicate_ids", dup_p + dup_q + dup_j)
    drop_p, drop_q, drop_j = ({f.index for f in found} for found in (dup_p, dup_q, dup_j))

    missing = checks.missing_ids([(j.qid, j.docid) for j in raw.judgements], raw.judgement_at,
                                 set(q_ids), set(p_ids), skip=drop_j)
    apply("missing_passages", missing)
    drop_j |= {f.index for f in missing}

    apply("empty_texts",
          checks.empty_texts([p.text for p in raw.passages], p_ids, raw.passage_at, "passage", skip=drop_p)
          + checks.empty_texts([q.text for q in raw.queries], q_ids, raw.query_at, "query", skip=drop_q))

    judged = {j.qid for i, j in enumerate(raw.judgements) if j.grade > 0 and i not in drop_j}
    in_split = {qid for qids in raw.split_queries.values() for qid in qids}
    apply("unjudged_queries", checks.unjudged_queries(q_ids, raw.query_at, judged, in_split, skip=drop_q))

    ds = resolve(raw, drop_p, drop_q, drop_j)
    query_at = {q.id: raw.query_at[i] for i, q in enumerate(raw.queries) if i not in drop_q}
    return ds, counts, query_at


def prepare(cfg: PrepareConfig, warn: Callable[[str], None] = _stderr) -> tuple[Dataset, dict]:
    """Read and check the dataset, split passages, hold out a dev split; return it with a report.

    The report counts documents, passages, queries and judgements per split, and under
    "checks" the cases each data check found (0 where the data is clean).
    """
    ds, counts, query_at = checked(read_raw(cfg.dataset, cfg.format), cfg.policies(), warn)
    n_docs = len(ds.corpus)
    if cfg.max_words:
        ds.corpus, pieces = split_passages(ds.corpus, cfg.max_words)
        ds.splits = {s: carry_labels(qs, pieces) for s, qs in ds.splits.items()}
    if "dev" not in ds.splits and "train" in ds.splits and cfg.dev_fraction > 0:
        ds.splits["train"], ds.splits["dev"] = hold_out(ds.splits["train"], cfg.dev_fraction, cfg.seed)
    # after the hold-out: a question held out for validation that is also in train is a leak too
    leaks = checks.leakage({s: [(q.id, q.text) for q in qs] for s, qs in ds.splits.items()}, query_at)
    counts["leakage"] = len(leaks)
    checks.enforce(leaks, "leakage", cfg.on_leakage, warn)
    report: dict = {"documents": n_docs, "passages": len(ds.corpus)}
    for split, qs in ds.splits.items():
        report[f"{split}_queries"] = len(qs)
        report[f"{split}_judgements"] = sum(len(q.positives) for q in qs)
    report["checks"] = {check: counts.get(check, 0) for check in checks.CHECKS}
    return ds, report
