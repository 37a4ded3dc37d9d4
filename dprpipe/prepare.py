"""The prepare step: read a BEIR or DPR dataset, check it, split passages, hold out a dev split.

Reading is two steps: `read_raw` parses the files with the reader of their format
(`dprpipe.beir`, `dprpipe.dpr_format`; a DPR folder's files as `prepare.files` names them or
found by their names, gzipped or not) into a `RawDataset` that keeps every record and where it
came from; `checked` runs the data checks of `dprpipe.checks` (repeated ids, empty texts,
judgements of missing passages, queries without a relevant passage) under the `prepare.on_*`
policies and builds the `Dataset`. `prepare` then splits documents into passages
(`max_words`), holds out a dev split when the data has none, and checks the final splits for
leakage (the same question in two splits).

Split documents (`max_words > 0`): a document longer than `max_words` words becomes pieces
`docid#0`, `docid#1`, ..., recorded in the piece map (`Dataset.pieces`, written as
`pieces.json`). A piece id that already names a passage is an error. In
every split, every piece of a judged document gets the document's grade (`carry_labels`); the
evaluate stage folds runs and judgements back to documents (MaxP), which recovers the dataset's
own judgements, so test figures are document-level. For training this means a split
document's positives are all its pieces (train draws one of a question's positives per epoch),
rather than one piece picked by a score such as BM25, because:
- the judgements say the document is relevant, not which piece; picking the piece BM25 likes
  best would teach the dense model BM25's preferences, and the hybrid gains from the two
  disagreeing;
- the other pieces of a relevant document must not be negatives either: the mine stage takes
  its hard negatives from the top BM25 passages that are not positives, and the sibling pieces
  of a gold piece rank high there. With every piece a positive, mine and the train stage's
  validation (which ranks the dev questions' positives among mined negatives) need no rule of
  their own; MaxP training (Dai and Callan, 2019) labels pieces the same way.
The cost is some positives without the relevant sentences, when a document's evidence sits
in one of its pieces.

The hard negatives a DPR dataset provides (`hard_negative_ctxs`) travel in `Dataset.negatives`;
`negative_records` gives them per split in the mine stage's format, for the stage to write as
`negatives/<split>.jsonl` (only where the dataset provides them).

Inputs: a `PrepareConfig` (params.yaml `prepare:`). Outputs: the `Dataset` (written by the
stage in the prepared layout of `dprpipe.records`, with the piece map of a split corpus) and a
data report of counts.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import checks
from .beir import read_beir_raw
from .checks import Loc
from .dpr_format import ROLES, has_dpr_files, read_dpr_raw
from .io import DataError, clip
from .raw import RawDataset, resolve
from .records import Dataset, Passage, Query

# ---------------------------------------------------------------- reading

def detect_format(folder: str | os.PathLike, files: Mapping[str, str] | None = None) -> str:
    """"beir" for a folder with corpus.jsonl, "dpr" for one with DPR files (or when `files` names them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "dataset folder not found; set prepare.dataset in params.yaml")
    if files:
        return "dpr"
    if (folder / "corpus.jsonl").exists():
        return "beir"
    if has_dpr_files(folder):
        return "dpr"
    raise DataError(folder, None, "cannot tell the format: expected corpus.jsonl (BEIR) or DPR files "
                    "({train,dev,test}.json, biencoder-*-{train,dev}.json, *-test.csv, *-test.qa.csv, "
                    "each optionally .gz); or set prepare.format and prepare.files")


def read_raw(folder: str | os.PathLike, fmt: str = "auto", files: Mapping[str, str] | None = None) -> RawDataset:
    """Every record of a BEIR or DPR folder, with where it came from; format errors raise DataError.

    `files` (DPR only): role (train, dev, test, passages) -> file name in `folder`, for names
    that are not found by themselves (`dprpipe.dpr_format.dpr_files`).
    """
    fmt = detect_format(folder, files) if fmt == "auto" else fmt
    if fmt == "beir":
        if files:
            raise ValueError("prepare.files names the files of a DPR folder; a BEIR folder has fixed names")
        return read_beir_raw(folder)
    if fmt == "dpr":
        return read_dpr_raw(folder, files)
    raise ValueError(f"unknown dataset format {fmt!r}; expected one of auto, beir, dpr")


def read_dataset(folder: str | os.PathLike, fmt: str = "auto", files: Mapping[str, str] | None = None) -> Dataset:
    """Read a BEIR or DPR folder and apply the data checks with the default policies of `PrepareConfig`."""
    ds, _, _ = checked(read_raw(folder, fmt, files), PrepareConfig().policies())
    return ds


def negative_records(ds: Dataset) -> dict[str, list[dict]]:
    """The dataset's provided negatives per split, as the mine stage writes its negatives:
    {split: [{"id": qid, "negatives": [[docid, score], ...]}, ...]}, one record per question of
    the split that has provided negatives, in the split's order; splits without any are left out.

    A negative document that was split into pieces (`prepare.max_words`) stands for all its
    pieces, in order, each with the document's score.
    """
    out: dict[str, list[dict]] = {}
    for split, queries in ds.splits.items():
        records = [{"id": q.id, "negatives": [[pid, score] for docid, score in ds.negatives[q.id]
                                              for pid in ds.pieces.get(docid, [docid])]}
                   for q in queries if q.id in ds.negatives]
        if records:
            out[split] = records
    return out


# ---------------------------------------------------------------- transforms

def split_passages(corpus: Iterable[Passage], max_words: int) -> tuple[list[Passage], dict[str, list[str]]]:
    """Split documents into passages of at most `max_words` words (DPR used 100).

    Each piece keeps the document title. A document that fits in one piece keeps its id; a
    longer one becomes `docid#0`, `docid#1`, ... Returns the passages and the piece map, docid ->
    [piece ids], of the documents that were split. A piece id that is also the id of a passage
    of `corpus`, or of another piece, would make judgements and runs ambiguous: a ValueError
    naming it.

    >>> ps, m = split_passages([Passage("d", "T", "a b c"), Passage("e", "", "f")], 2)
    >>> [(p.id, p.text) for p in ps], m
    ([('d#0', 'a b'), ('d#1', 'c'), ('e', 'f')], {'d': ['d#0', 'd#1']})
    """
    if max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    corpus = list(corpus)
    given = {doc.id for doc in corpus}
    out: list[Passage] = []
    pieces: dict[str, list[str]] = {}
    made: dict[str, str] = {}     # piece id -> its document, to name both sides of a clash
    for doc in corpus:
        words = doc.text.split()
        if len(words) <= max_words:
            out.append(doc)
            continue
        ids = []
        for i, start in enumerate(range(0, len(words), max_words)):
            pid = f"{doc.id}#{i}"
            if pid in given or pid in made:
                other = "a passage of the corpus" if pid in given else f"a piece of document {clip(made[pid])}"
                raise ValueError(f"piece id {clip(pid)} of document {clip(doc.id)} is already the id of {other}; "
                                 "rename that passage, or set prepare.max_words to 0")
            made[pid] = doc.id
            out.append(Passage(pid, doc.title, " ".join(words[start:start + max_words])))
            ids.append(pid)
        pieces[doc.id] = ids
    return out, pieces


def carry_labels(queries: list[Query], pieces: Mapping[str, list[str]]) -> list[Query]:
    """Give every piece of a judged document the document's grade (the rule is in the module docstring)."""
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


# ---------------------------------------------------------------- the prepare step

POLICIES = ("error", "warn")


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str = "../shared/datasets/scifact"
    format: str = "auto"          # auto | beir | dpr
    max_words: int = 0            # split documents into passages of at most this many words; 0 = keep whole
    dev_fraction: float = 0.1     # held out of train for validation when the dataset has no dev split
    seed: int = 13
    # DPR: role (train, dev, test, passages) -> file name in `dataset`; a role left out is found by
    # DPR's and this project's names where one file fits (dprpipe.dpr_format.NAMES)
    files: dict[str, str] = field(default_factory=dict)
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
        for role, name in self.files.items():
            if role not in ROLES:
                raise ValueError(f"files: unknown role {role!r}; expected {', '.join(ROLES)}")
            if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"files.{role}: {name!r} is not a file name inside prepare.dataset")
        if self.files and self.format == "beir":
            raise ValueError("files names the files of a DPR folder; it cannot be used with format beir")
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
    judged |= raw.scored_by_answers   # QA questions are judged by their answers
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
    ds, counts, query_at = checked(read_raw(cfg.dataset, cfg.format, cfg.files), cfg.policies(), warn)
    n_docs = len(ds.corpus)
    if cfg.max_words:
        try:
            ds.corpus, ds.pieces = split_passages(ds.corpus, cfg.max_words)
        except ValueError as e:
            raise DataError(cfg.dataset, None, str(e)) from None
        ds.splits = {s: carry_labels(qs, ds.pieces) for s, qs in ds.splits.items()}
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
