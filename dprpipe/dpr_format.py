"""The DPR dataset format: read a DPR folder into a `RawDataset` (every record, with its file and line).

Inputs (read streaming; a name ending in `.gz` is decompressed as it is read):
- question files, one per split: a biencoder JSON list (`*.json`) of {"question", "answers",
  "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"} with ctxs {"title", "text",
  "passage_id"?, "score"?}, or a QA CSV test set (`*.csv`, DPR's retriever format: one
  `question<TAB>answer list` row per question, no header, no contexts);
- an optional passages file (`*.tsv`: `id\ttext\ttitle`, like DPR's psgs_w100.tsv).
Which file is which comes from `prepare.files` ({train, dev, test, passages} -> a name in the
folder), and for a role it does not name, from the names DPR and this project use (`NAMES`)
where exactly one file matches.

A question's id is `<split>-<n>` (its 0-based position in its file). Positive contexts are its
judgements (grade 1); contexts without a passage_id get a content-hash id. With a passages file
the corpus is that file, and a context's passage_id missing from it is an error (the two files
are not from one release); without one, the corpus is every context. `hard_negative_ctxs` are
kept as the question's provided negatives (`RawDataset.negatives`, best first, see
`provided_negatives`). QA CSV questions carry answers and no judgements: the evaluate stage
scores them by top-k answer accuracy. The JSON lists are parsed item by item
(`iter_json_array`), so multi-GB files are fine. A format error is a DataError naming the file
and line; the data checks run later, in the prepare step.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .io import DataError, check_text, clip, open_text, read_tsv
from .raw import Judgement, RawDataset
from .records import SPLITS, Passage, Query, check_id, field_value


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
                       contexts: dict[str, int], from_tsv: int = 0, corpus_file: Path | None = None) -> None:
    """Add the questions of a DPR biencoder JSON list to `raw`, with their positive contexts as judgements.

    Contexts are gathered in `contexts` (passage id -> position in `raw.passages`). Without a
    passages file (`corpus_file` None) a context seen again under the same id and with the same
    title and text is the same passage; one with another title or text is a second record of
    that id, which the `duplicate_ids` check reports (the first one is kept under `warn`). With
    one, the file is the corpus: a context is only a copy of its passage, and a passage_id the
    file lacks is a DataError. Contexts without a passage_id get a content-hash id and join the
    corpus. Each question's `hard_negative_ctxs` become its provided negatives
    (`provided_negatives`), if any question of the file has one.
    """
    # passages at positions below `from_tsv` came from the passages file, which no context overrides
    qids = raw.split_queries.setdefault(split, [])
    negatives: dict[str, list[tuple[str, float]]] = {}
    for n, (lineno, item) in enumerate(iter_json_array(path)):
        if not isinstance(item, dict):
            raise DataError(path, lineno, f"expected a JSON object per question, got {type(item).__name__}")
        question = field_value(item, "question", path, lineno)
        answers = field_value(item, "answers", path, lineno, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, lineno, "field 'answers' must be a list of strings")
        qid = f"{split}-{n}"
        positives: list[str] = []
        hard: list[tuple[str, object]] = []
        for key, grade in (("positive_ctxs", 1), ("negative_ctxs", None), ("hard_negative_ctxs", None)):
            for ctx in field_value(item, key, path, lineno, kind=list, required=False, default=[]):
                if not isinstance(ctx, dict):
                    raise DataError(path, lineno, f"each of {key!r} must be an object")
                title = field_value(ctx, "title", path, lineno, required=False, default="")
                text = field_value(ctx, "text", path, lineno)
                pid = _context_id(ctx, title, text, path, lineno)
                seen = contexts.get(pid)
                if seen is None and corpus_file is not None and _has_passage_id(ctx):
                    raise DataError(path, lineno, f"passage_id {clip(pid)} of {key!r} is not in {corpus_file.name}; "
                                    "the question file and the passages file must come from one release")
                if seen is None or (seen >= from_tsv and not _same_passage(raw.passages[seen], title, text)):
                    contexts.setdefault(pid, len(raw.passages))
                    raw.passages.append(Passage(pid, title, text))
                    raw.passage_at.append(path, lineno)
                if grade:
                    raw.judgements.append(Judgement(split, qid, pid, grade))
                    raw.judgement_at.append(path, lineno)
                    positives.append(pid)
                elif key == "hard_negative_ctxs":
                    hard.append((pid, ctx.get("score")))
        raw.queries.append(Query(qid, question, tuple(answers)))
        raw.query_at.append(path, lineno)
        qids.append(qid)
        negatives[qid] = provided_negatives(hard, positives)
    if any(negatives.values()):   # a file without any hard negatives provides none, not empty lists
        raw.negatives.update(negatives)


def _has_passage_id(ctx: Mapping) -> bool:
    return any(ctx.get(k) not in (None, "") for k in ("passage_id", "psg_id"))


def provided_negatives(hard: list[tuple[str, object]], positives: list[str]) -> list[tuple[str, float]]:
    """A question's hard negatives as [(passage id, score)], best first, as the mine stage writes them.

    The score is the context's own `score` (DPR's release: its BM25 score) when every hard
    negative of the question has a numeric one, sorted best first (ties in file order);
    otherwise the reciprocal rank 1/r of the file's order (1, 0.5, 0.3333, ...), which DPR's
    files list best first. A passage that is also a positive of the question, or that is
    repeated, is left out (its first place is kept). Scores are rounded to 4 decimals.

    >>> provided_negatives([("a", None), ("b", 3), ("p", 1), ("a", 2)], ["p"])
    [('a', 1.0), ('b', 0.5)]
    >>> provided_negatives([("a", 3.5), ("b", 9.25)], [])
    [('b', 9.25), ('a', 3.5)]
    """
    gold = set(positives)
    seen: set[str] = set()
    kept = []
    for pid, score in hard:
        if pid not in gold and pid not in seen:
            seen.add(pid)
            kept.append((pid, score))
    if kept and all(_is_number(score) for _, score in kept):
        return sorted(((pid, round(float(score), 4)) for pid, score in kept), key=lambda h: -h[1])
    return [(pid, round(1 / (r + 1), 4)) for r, (pid, _) in enumerate(kept)]


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_answers(field: str, path, lineno) -> list[str]:
    r"""The answer list of a QA CSV row: a JSON list of strings, or the Python list literal DPR's
    own files hold (`['Paris', "Val d'Oise"]`, which DPR reads with `eval`; here no code runs).

    >>> parse_answers('["a", "b"]', "t.csv", 1)
    ['a', 'b']
    >>> parse_answers("['a', \"b's\"]", "t.csv", 1)
    ['a', "b's"]
    """
    try:
        answers = json.loads(field)
    except ValueError:
        try:
            answers = ast.literal_eval(field.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DataError(path, lineno, f"the answer list {clip(field)} is not a JSON list of strings "
                            "(nor a Python one)") from None
    except RecursionError:
        raise DataError(path, lineno, f"the answer list {clip(field)} is nested too deeply") from None
    if not isinstance(answers, list):
        raise DataError(path, lineno, f"the answer list {clip(field)} must be a list of strings, "
                        f"got {type(answers).__name__}")
    odd = [a for a in answers if not isinstance(a, str)]
    if odd:
        raise DataError(path, lineno, f"the answer list {clip(field)} must be a list of strings, "
                        f"but holds {type(odd[0]).__name__} {clip(odd[0])}")
    if not answers:
        raise DataError(path, lineno, "the answer list is empty: a QA question is scored by its answers")
    for a in answers:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(path, lineno, f"answer {clip(a)} holds an unpaired UTF-16 surrogate, "
                            "which is not text; fix or drop it") from None
    return answers


def read_qa_csv(path: str | os.PathLike, split: str, raw: RawDataset) -> None:
    """Add the questions of a QA CSV file (DPR's retriever test sets, e.g. nq-test.csv) to `raw`.

    Each row is `question<TAB>answer list`, no header; a field may be CSV-quoted, as Python's
    csv module writes it. The questions carry answers and no judgements (the evaluate stage
    scores them by top-k answer accuracy), so they count as judged for the `unjudged_queries` check.
    """
    qids = raw.split_queries.setdefault(split, [])
    for n, (lineno, line) in enumerate(_data_lines(path)):
        fields = line.split("\t")
        if len(fields) == 1:
            raise DataError(path, lineno, "no answer list: expected question<TAB>answer list, "
                            "e.g. who wrote hamlet<TAB>[\"Shakespeare\"]")
        if len(fields) != 2:
            raise DataError(path, lineno, f"expected 2 tab-separated columns (question, answer list), "
                            f"got {len(fields)}")
        question, answers = _unquote(fields[0]), parse_answers(_unquote(fields[1]), path, lineno)
        qid = f"{split}-{n}"
        raw.queries.append(Query(qid, question, tuple(answers)))
        raw.query_at.append(path, lineno)
        raw.scored_by_answers.add(qid)
        qids.append(qid)


def _data_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of each non-blank line of a text file."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if "\0" in line:
                raise DataError(path, lineno, "NUL byte in the line: this is not a text file")
            yield lineno, line


# ---------------------------------------------------------------- which file is which

ROLES = ("train", "dev", "test", "passages")

NAMES = {
    "train": ("train.json", "biencoder-*-train.json"),
    "dev": ("dev.json", "biencoder-*-dev.json"),
    "test": ("test.json", "biencoder-*-test.json", "*-test.csv", "*-test.qa.csv"),   # nq-test.qa.csv: DPR's URL
    "passages": ("passages.tsv", "psgs_w100.tsv"),
}
"""The names a role's file is found by when `prepare.files` does not name it; each also with `.gz`."""

KINDS = {".json": "biencoder", ".csv": "qa", ".tsv": "passages"}


def file_kind(name: str) -> str:
    """"biencoder", "qa" or "passages", from a file name (a `.gz` ending is looked through)."""
    stem = name[:-3] if name.lower().endswith(".gz") else name
    return KINDS.get(Path(stem).suffix.lower(), "")


def find_candidates(folder: Path, role: str) -> list[Path]:
    """The files of `folder` whose names fit `role`, sorted."""
    found = {p for pattern in NAMES[role] for suffix in ("", ".gz") for p in folder.glob(pattern + suffix)}
    return sorted(p for p in found if p.is_file())


def dpr_files(folder: str | os.PathLike, files: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Role (train, dev, test, passages) -> its file: as `files` names it, else found by `NAMES`.

    A role whose name fits several files is a DataError listing them (name one in
    prepare.files); a role that fits none is left out. A DataError too when no question file
    is found, when `files` names a file that is not there, or one whose kind does not fit its
    role (questions: .json or .csv; passages: .tsv; each optionally .gz).
    """
    folder = Path(folder)
    files = dict(files or {})
    out: dict[str, Path] = {}
    for role in ROLES:
        if role in files:
            path = folder / files[role]
            if not path.is_file():
                raise DataError(path, None, f"file not found (named by prepare.files.{role})")
        else:
            found = find_candidates(folder, role)
            if len(found) > 1:
                raise DataError(folder, None, f"cannot tell which file is the {role} "
                                f"{'file' if role == 'passages' else 'split'}: "
                                f"{', '.join(p.name for p in found)}; name one in prepare.files.{role}")
            if not found:
                continue
            path = found[0]
        kind = file_kind(path.name)
        if (kind == "passages") != (role == "passages") or not kind:
            expected = ".tsv" if role == "passages" else ".json (biencoder) or .csv (QA)"
            raise DataError(path, None, f"the {role} file must be a {expected} file, optionally .gz")
        out[role] = path
    if not any(role in out for role in SPLITS):
        looked = "; ".join(f"{role}: {', '.join(n + '(.gz)' for n in NAMES[role])}" for role in SPLITS)
        raise DataError(folder, None, f"no DPR question files found (looked for {looked}); "
                        "name them in prepare.files")
    return out


def has_dpr_files(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a file that `dpr_files` would take as a question file."""
    return any(find_candidates(Path(folder), role) for role in SPLITS)


def read_dpr_raw(folder: str | os.PathLike, files: Mapping[str, str] | None = None) -> RawDataset:
    """Read a DPR folder; the corpus is its passages file if it has one, else every context."""
    found = dpr_files(folder, files)
    raw = RawDataset()
    tsv = found.get("passages")
    contexts: dict[str, int] = {}
    if tsv is not None:
        for lineno, p in read_dpr_passages(tsv):
            raw.passages.append(p)
            raw.passage_at.append(tsv, lineno)
            contexts.setdefault(p.id, len(raw.passages) - 1)  # the file's text wins over a context's
    from_tsv = len(raw.passages)
    for split in SPLITS:
        path = found.get(split)
        if path is None:
            continue
        if file_kind(path.name) == "qa":
            read_qa_csv(path, split, raw)
        else:
            read_dpr_questions(path, split, raw, contexts, from_tsv, tsv)
    if not raw.passages:
        raise DataError(folder, None, "the corpus is empty: no passages file and no contexts in the questions")
    return raw
