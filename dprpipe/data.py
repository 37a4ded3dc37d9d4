"""Data formats: read BEIR and DPR datasets, write and read the prepared corpus and splits.

Inputs (read streaming):
- BEIR layout: `corpus.jsonl` ({"_id", "title"?, "text"}), `queries.jsonl` ({"_id", "text"}),
  `qrels/{train,dev,test}.tsv` (`query-id\\tcorpus-id\\tscore`, header row optional).
- DPR layout: `{train,dev,test}.json`, each a JSON list of
  {"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"} with ctxs
  {"title", "text", "passage_id"?}, plus an optional `passages.tsv` (`id\\ttext\\ttitle`, like
  DPR's psgs_w100.tsv). Contexts without a passage_id get a content-hash id.

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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .io import DataError, open_text, read_jsonl, read_tsv, write_jsonl

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


# ---------------------------------------------------------------- helpers

def _field(obj: Mapping, key: str, path, lineno, kind=str, required: bool = True, default=None):
    """Fetch `key` from a record, raising a DataError naming file and line when missing or mistyped."""
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(path, lineno, f"missing field {key!r}")
        return default
    value = obj[key]
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # numeric ids are common in BEIR files
    if not isinstance(value, kind):
        raise DataError(path, lineno, f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def content_id(title: str, text: str) -> str:
    """A stable id for a context that has none: 'h' + 16 hex digits of SHA-1 of title and text."""
    return "h" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:16]


def iter_json_array(path: str | os.PathLike, chunk_size: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Stream the items of a top-level JSON list, yielding (line where the item starts, item).

    Memory stays at about one item plus one chunk, so multi-GB DPR files are fine, and a
    malformed item is reported with its exact line.
    """
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(chunk_size)
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
                    if not eof and fill():  # maybe the item is only cut by the chunk
                        continue
                    bad_line = line + buf.count("\n", pos, e.pos)
                    raise DataError(path, bad_line, f"malformed JSON ({e.msg})") from None
            yield line, item
            line += buf.count("\n", pos, end)
            pos = end
            first = False


# ---------------------------------------------------------------- BEIR

def read_beir_corpus(path: str | os.PathLike) -> Iterator[Passage]:
    for lineno, obj in read_jsonl(path):
        yield Passage(
            id=_field(obj, "_id", path, lineno),
            title=_field(obj, "title", path, lineno, required=False, default=""),
            text=_field(obj, "text", path, lineno),
        )


def read_beir_queries(path: str | os.PathLike) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in read_jsonl(path):
        qid = _field(obj, "_id", path, lineno)
        if qid in queries:
            raise DataError(path, lineno, f"duplicate query id {qid!r}")
        queries[qid] = _field(obj, "text", path, lineno)
    return queries


def read_qrels(path: str | os.PathLike, lines: dict[tuple[str, str], int] | None = None
               ) -> dict[str, dict[str, int]]:
    """Read a qrels TSV (`qid\\tdocid\\tgrade`, optional header) into qid -> {docid: grade}.

    If `lines` is given, it receives the line of each (qid, docid) judgement, for error messages.
    """
    qrels: dict[str, dict[str, int]] = {}
    for lineno, (qid, docid, grade) in read_tsv(path, 3, header=("query-id", "corpus-id")):
        try:
            g = int(grade)
        except ValueError:
            raise DataError(path, lineno, f"relevance {grade!r} is not an integer") from None
        qrels.setdefault(qid, {})[docid] = g
        if lines is not None:
            lines.setdefault((qid, docid), lineno)
    return qrels


def read_beir(folder: str | os.PathLike) -> Dataset:
    folder = Path(folder)
    corpus = list(read_beir_corpus(folder / "corpus.jsonl"))
    if not corpus:
        raise DataError(folder / "corpus.jsonl", None, "the corpus is empty")
    doc_ids = {p.id for p in corpus}
    queries = read_beir_queries(folder / "queries.jsonl")
    splits: dict[str, list[Query]] = {}
    for split in SPLITS:
        qpath = folder / "qrels" / f"{split}.tsv"
        if not qpath.exists():
            continue
        lines: dict[tuple[str, str], int] = {}
        qrels = read_qrels(qpath, lines)
        for (qid, docid), lineno in lines.items():
            if qid not in queries:
                raise DataError(qpath, lineno, f"qrel names query {qid!r}, which is not in queries.jsonl")
            if docid not in doc_ids:
                raise DataError(qpath, lineno, f"query {qid!r} is judged against document {docid!r}, "
                                "which is not in corpus.jsonl")
        splits[split] = [Query(id=qid, text=queries[qid], relevant=rel) for qid, rel in qrels.items()]
    if not splits:
        raise DataError(folder / "qrels", None, "no qrels/{train,dev,test}.tsv found")
    return Dataset(corpus=corpus, splits=splits)


def _check_qrel_docs(corpus: list[Passage], queries: list[Query], source) -> None:
    ids = {p.id for p in corpus}
    for q in queries:
        for docid in q.relevant:
            if docid not in ids:
                raise DataError(source, None, f"query {q.id!r} is judged against document {docid!r}, "
                                "which is not in the corpus")


# ---------------------------------------------------------------- DPR

def read_dpr_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Read a DPR passages TSV: `id\\ttext\\ttitle`, header row optional."""
    for _, (pid, text, title) in read_tsv(path, 3, header=("id", "text", "title")):
        # psgs_w100.tsv is written by the csv module: fields that contain quotes are quoted
        yield Passage(id=pid, title=_unquote(title), text=_unquote(text))


def _unquote(field: str) -> str:
    """Undo CSV quoting.

    >>> _unquote('"say ""hi"" twice"')
    'say "hi" twice'
    """
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def read_dpr_questions(path: str | os.PathLike, split: str, extra: dict[str, Passage]) -> list[Query]:
    """Read a DPR biencoder JSON list; contexts without passage_id are added to `extra`."""
    queries = []
    for n, (lineno, item) in enumerate(iter_json_array(path)):
        if not isinstance(item, dict):
            raise DataError(path, lineno, f"expected a JSON object per question, got {type(item).__name__}")
        question = _field(item, "question", path, lineno)
        answers = _field(item, "answers", path, lineno, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, lineno, "field 'answers' must be a list of strings")
        relevant: dict[str, int] = {}
        for key, grade in (("positive_ctxs", 1), ("negative_ctxs", None), ("hard_negative_ctxs", None)):
            for ctx in _field(item, key, path, lineno, kind=list, required=False, default=[]):
                if not isinstance(ctx, dict):
                    raise DataError(path, lineno, f"each of {key!r} must be an object")
                title = _field(ctx, "title", path, lineno, required=False, default="")
                text = _field(ctx, "text", path, lineno)
                pid = next((ctx[k] for k in ("passage_id", "psg_id") if ctx.get(k) not in (None, "")), None)
                pid = str(pid) if pid is not None else content_id(title, text)
                if pid not in extra:
                    extra[pid] = Passage(pid, title, text)
                if grade:
                    relevant[pid] = grade
        queries.append(Query(id=f"{split}-{n}", text=question, answers=tuple(answers), relevant=relevant))
    return queries


def read_dpr(folder: str | os.PathLike) -> Dataset:
    """Read a DPR folder; the corpus is passages.tsv if present, else every context seen."""
    folder = Path(folder)
    contexts: dict[str, Passage] = {}
    splits = {s: read_dpr_questions(folder / f"{s}.json", s, contexts)
              for s in SPLITS if (folder / f"{s}.json").exists()}
    if not splits:
        raise DataError(folder, None, "no DPR {train,dev,test}.json found")
    tsv = folder / "passages.tsv"
    if tsv.exists():
        corpus = list(read_dpr_passages(tsv))
        known = {p.id for p in corpus}
        # contexts that carry no id in the TSV still have to be retrievable
        corpus += [p for pid, p in contexts.items() if pid not in known]
    else:
        corpus = list(contexts.values())
    for split, queries in splits.items():
        _check_qrel_docs(corpus, queries, folder / f"{split}.json")
    return Dataset(corpus=corpus, splits=splits)


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


def read_dataset(folder: str | os.PathLike, fmt: str = "auto") -> Dataset:
    fmt = detect_format(folder) if fmt == "auto" else fmt
    readers = {"beir": read_beir, "dpr": read_dpr}
    if fmt not in readers:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of auto, beir, dpr")
    return readers[fmt](folder)


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


def check_corpus(corpus: list[Passage], source) -> None:
    if not corpus:
        raise DataError(source, None, "the corpus is empty")
    seen: set[str] = set()
    for p in corpus:
        if p.id in seen:
            raise DataError(source, None, f"duplicate passage id {p.id!r}")
        seen.add(p.id)


# ---------------------------------------------------------------- prepared layout

def write_corpus(path: str | os.PathLike, corpus: Iterable[Passage]) -> int:
    return write_jsonl(path, ({"id": p.id, "title": p.title, "text": p.text} for p in corpus))


def read_corpus(path: str | os.PathLike) -> list[Passage]:
    corpus = [Passage(_field(o, "id", path, n), _field(o, "title", path, n, required=False, default=""),
                      _field(o, "text", path, n)) for n, o in read_jsonl(path)]
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
        if not all(isinstance(g, int) for g in rel.values()):
            raise DataError(path, n, "field 'relevant' must map passage ids to integer grades")
        out.append(Query(_field(o, "id", path, n), _field(o, "text", path, n),
                         tuple(_field(o, "answers", path, n, kind=list, required=False, default=[])), rel))
    return out


# ---------------------------------------------------------------- the prepare step

@dataclass(frozen=True)
class PrepareConfig:
    dataset: str = "../shared/datasets/scifact"
    format: str = "auto"          # auto | beir | dpr
    max_words: int = 0            # split documents into passages of at most this many words; 0 = keep whole
    dev_fraction: float = 0.1     # held out of train for validation when the dataset has no dev split
    seed: int = 13


def prepare(cfg: PrepareConfig) -> tuple[Dataset, dict]:
    """Read the dataset, split passages, hold out a dev split; return it with a small report."""
    ds = read_dataset(cfg.dataset, cfg.format)
    check_corpus(ds.corpus, cfg.dataset)
    n_docs = len(ds.corpus)
    if cfg.max_words:
        ds.corpus, pieces = split_passages(ds.corpus, cfg.max_words)
        ds.splits = {s: carry_labels(qs, pieces) for s, qs in ds.splits.items()}
    if "dev" not in ds.splits and "train" in ds.splits and cfg.dev_fraction > 0:
        ds.splits["train"], ds.splits["dev"] = hold_out(ds.splits["train"], cfg.dev_fraction, cfg.seed)
    report = {"documents": n_docs, "passages": len(ds.corpus)}
    for split, qs in ds.splits.items():
        report[f"{split}_queries"] = len(qs)
        report[f"{split}_judgements"] = sum(len(q.positives) for q in qs)
    return ds, report
