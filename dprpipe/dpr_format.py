"""The DPR dataset format: read a DPR folder into a `RawDataset` (every record, with its file and line).

Inputs (read streaming): `{train,dev,test}.json`, each a JSON list of {"question", "answers",
"positive_ctxs", "negative_ctxs", "hard_negative_ctxs"} with ctxs {"title", "text",
"passage_id"?}, plus an optional `passages.tsv` (`id\\ttext\\ttitle`, like DPR's psgs_w100.tsv).
Contexts without a passage_id get a content-hash id. The JSON lists are parsed item by item
(`iter_json_array`), so multi-GB files are fine. A format error is a DataError naming the file
and line; the data checks run later, in the prepare step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from .io import DataError, check_text, open_text, read_tsv
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
        question = field_value(item, "question", path, lineno)
        answers = field_value(item, "answers", path, lineno, kind=list, required=False, default=[])
        if not all(isinstance(a, str) for a in answers):
            raise DataError(path, lineno, "field 'answers' must be a list of strings")
        qid = f"{split}-{n}"
        for key, grade in (("positive_ctxs", 1), ("negative_ctxs", None), ("hard_negative_ctxs", None)):
            for ctx in field_value(item, key, path, lineno, kind=list, required=False, default=[]):
                if not isinstance(ctx, dict):
                    raise DataError(path, lineno, f"each of {key!r} must be an object")
                title = field_value(ctx, "title", path, lineno, required=False, default="")
                text = field_value(ctx, "text", path, lineno)
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
