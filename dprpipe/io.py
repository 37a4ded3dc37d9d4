"""File plumbing shared by every stage: atomic writes, JSONL and TSV records, run files.

Inputs: paths. Outputs: files and folders written atomically (`.name.tmp` in the same folder,
then `os.replace`), so a killed stage never leaves a half-written output that a later stage
could read; the next write of the same path removes a killed writer's temporary. Files whose
name ends in `.gz` are read through gzip, streaming (DPR releases its files compressed). Read
errors are `DataError`s that name the file, the line and the fix. `write_checksums` /
`verify_checksums` let a reader tell a truncated or corrupted artifact folder from a good one.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

Run = dict[str, list[tuple[str, float]]]
"""A ranking per query: qid -> [(docid, score), ...] best first."""

MAX_LINE = 1 << 26
"""Longest line (characters) the line readers accept: a longer one is a file without line
breaks or not a text file, and reading it whole could exhaust memory."""

MAX_PROBLEM = 500  # characters of a DataError's problem text: it must stay one readable line


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what is wrong."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        problem = " ".join(problem.split("\n"))
        if len(problem) > MAX_PROBLEM:
            problem = problem[:MAX_PROBLEM - 3] + "..."
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def clip(value: Any, limit: int = 60) -> str:
    """repr(value), shortened to about `limit` characters, for error messages about huge fields.

    >>> clip("x" * 100, 10)
    "'xxxxx...' (100 characters)"
    >>> clip(7)
    '7'
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[:limit - 4] + "..." + text[0] * (text[0] in "'\"") + size


def _temp_path(path: Path) -> Path:
    """`.name.tmp` next to `path`: where its next version is written before the rename."""
    return path.with_name(f".{path.name}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    """An empty temporary file next to `path` that replaces `path` if the body succeeds and is
    removed if it fails.

    The name is fixed, so a writer killed before its rename leaves a temporary that the next
    write of `path` removes; DVC runs one stage at a time per output, so no two writers share it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    _remove(tmp)
    open(tmp, "wb").close()   # the mode a plain open() gives
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; rename it over `path` only on success."""
    with _temp_file(Path(path)) as tmp:
        encoding = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_memmap(path: str | os.PathLike, shape: tuple[int, ...], dtype=np.float32) -> Iterator[np.memmap]:
    """A `.npy` memmap of `shape` under a temporary name next to `path`, filled by the caller and
    renamed over `path` only on success; rows are written to disk as they are filled, so memory
    stays at what the caller holds."""
    # POSIX: a file still mapped may be renamed; flushed, its pages are on disk
    with _temp_file(Path(path)) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield arr
        arr.flush()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` only on success.

    A failed body leaves the old folder as it was. On success the old folder is removed and
    the new one renamed into place, so a writer killed in between leaves no `path` at all, never
    a partial one (DVC then reruns the stage, as it does for any missing output).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    _remove(tmp)
    tmp.mkdir()                # the mode a plain mkdir() gives
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad JSON raises DataError."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            obj = parse_json(line, path, lineno)
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str, path: str | os.PathLike, lineno: int) -> Any:
    """json.loads(text) for one JSONL line, with every way it can fail as a DataError for that line."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno}); "
                        "each line must be one JSON object") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(path, lineno, f"malformed JSON ({e})") from None
    except RecursionError:
        raise DataError(path, lineno, "malformed JSON (nested too deeply)") from None
    check_text(obj, text, path, lineno)
    return obj


def check_text(obj: Any, source: str, path: str | os.PathLike, lineno: int) -> None:
    """Reject strings holding an unpaired UTF-16 surrogate (JSON's \\ud800 escapes): they are not
    text and fail much later, when an output is encoded as UTF-8. `source` is the JSON text."""
    if not _SURROGATE_ESCAPE.search(source):  # the only way a surrogate gets into decoded UTF-8 text
        return
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(path, lineno, f"string {clip(x)} holds an unpaired UTF-16 surrogate escape "
                                "(\\udXXX), which is not text; fix or drop it") from None
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records atomically, one JSON object per line; returns the count."""
    n = 0
    with atomic_write(path) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


@contextlib.contextmanager
def open_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a UTF-8 text file (a leading byte-order mark is skipped), decompressing a `.gz` one
    as it is read; a missing file, bad encoding or damaged compressed data raises DataError, and
    so does a line longer than MAX_LINE."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    # lines end at "\n" only (a "\r\n" keeps its "\r", which JSON and read_tsv drop): universal
    # newlines would also split at a lone "\r", which JSON allows as whitespace, and shift every line number
    try:
        if is_gzip(path):
            f = gzip.open(path, "rt", encoding="utf-8-sig", newline="\n")
        else:
            f = open(path, encoding="utf-8-sig", newline="\n")
    except OSError as e:   # e.g. no permission to read it
        raise DataError(path, None, f"cannot read the file ({e.strerror or e})") from None
    try:
        yield _DecodeGuard(f, path)
    finally:
        f.close()


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether `open_text` reads `path` through gzip: its name ends in `.gz`."""
    return Path(path).name.lower().endswith(".gz")


GZIP_ERRORS = (EOFError, OSError, zlib.error)
"""What reading a damaged gzip file raises: EOFError when it is cut short, gzip.BadGzipFile (an
OSError) for a bad header or checksum, zlib.error for corrupt compressed data."""


class _DecodeGuard:
    """Iterate lines of a text file, turning a UnicodeDecodeError (or damaged gzip data) into a DataError."""

    def __init__(self, f: IO[str], path: Path):
        self._f, self._path, self._line = f, path, 0
        self._gz = is_gzip(path)

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                line = self._f.readline(MAX_LINE + 1)
            except UnicodeDecodeError as e:
                raise _utf8_error(self._path, e) from None
            except GZIP_ERRORS as e:
                if not self._gz:
                    raise
                raise _gzip_error(self._path, e) from None
            if not line:
                return
            self._line += 1
            if len(line) > MAX_LINE:
                raise DataError(self._path, self._line, f"line longer than {MAX_LINE} characters "
                                "(is it a text file with one record per line?)")
            yield line

    def read(self, *args) -> str:
        try:
            return self._f.read(*args)
        except UnicodeDecodeError as e:
            raise _utf8_error(self._path, e) from None
        except GZIP_ERRORS as e:
            if not self._gz:
                raise
            raise _gzip_error(self._path, e) from None


def _utf8_error(path: Path, err: UnicodeDecodeError) -> DataError:
    """A DataError naming the line of the first invalid byte.

    The text layer decodes a whole buffer ahead of the line being read, so the error's own
    position says nothing about the line: find it by decoding the raw lines one by one (a
    multi-byte UTF-8 sequence never contains a newline byte).
    """
    hint = ""
    try:
        with (gzip.open if is_gzip(path) else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(b"\x1f\x8b"):
                    hint = "; it looks gzip-compressed: give it a name ending in .gz"
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return DataError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start + 1} "
                                     f"of the line); re-encode the file as UTF-8{hint}")
    except GZIP_ERRORS as e:   # damaged after the bad byte was decoded: the damage is the real problem
        return _gzip_error(path, e)
    return DataError(path, None, f"not valid UTF-8 ({err.reason}); re-encode the file as UTF-8")


def _gzip_error(path: Path, err: BaseException) -> DataError:
    """A DataError for a damaged gzip file, naming the line where its readable text ends.

    The text layer reads ahead, so where the error surfaced says little about the line:
    decompress again and count the lines up to the damage.
    """
    if isinstance(err, EOFError):
        problem = "the compressed file ends early (truncated gzip; download it again)"
    elif isinstance(err, gzip.BadGzipFile) and "Not a gzipped file" in str(err):
        return DataError(path, None, "not a gzip file, although its name ends in .gz; "
                         "decompress it or drop the .gz from its name")
    elif isinstance(err, (gzip.BadGzipFile, zlib.error)):
        problem = f"corrupt gzip data ({err}); download the file again"
    else:   # a plain read error of the disk
        return DataError(path, None, f"cannot read the file ({getattr(err, 'strerror', None) or err})")
    lines = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read1(1 << 16):   # read1: what one step decompressed, kept if the next fails
                lines += chunk.count(b"\n")
    except GZIP_ERRORS:
        pass
    return DataError(path, lines + 1, problem)


def read_tsv(path: str | os.PathLike, ncols: int, header: Sequence[str] | None = None
             ) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a tab-separated file with exactly `ncols` columns.

    If `header` is given and the first line starts with those names, it is skipped.
    """
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if lineno == 1 and header and [x.strip().lower() for x in fields[: len(header)]] == list(header):
                continue
            if "\0" in line:
                raise DataError(path, lineno, "NUL byte in the line: this is not a text file")
            if len(fields) != ncols:
                raise DataError(path, lineno, f"expected {ncols} tab-separated columns, got {len(fields)}")
            yield lineno, fields


def write_run(path: str | os.PathLike, run: Run) -> None:
    """Write a run as TSV `qid\\tdocid\\tscore`, best first within each query."""
    with atomic_write(path) as f:
        for qid, hits in run.items():
            for docid, score in hits:
                f.write(f"{qid}\t{docid}\t{score:.6f}\n")


def read_run(path: str | os.PathLike) -> Run:
    """Read a TSV run file written by `write_run`; hits are re-sorted by score, best first."""
    run: Run = {}
    for lineno, (qid, docid, score) in read_tsv(path, 3):
        try:
            s = float(score)
        except ValueError:
            raise DataError(path, lineno, f"score {score!r} is not a number") from None
        run.setdefault(qid, []).append((docid, s))
    for hits in run.values():
        hits.sort(key=lambda h: -h[1])  # stable: file order breaks ties
    return run


def write_ids(path: str | os.PathLike, ids: Iterable[str]) -> None:
    """Write an id list, one per line (the row order of an embedding matrix or an index)."""
    with atomic_write(path) as f:
        for i in ids:
            if "\n" in i:
                raise DataError(path, None, f"id {i!r} contains a newline")
            f.write(i + "\n")


def read_ids(path: str | os.PathLike) -> list[str]:
    """Read an id list written by `write_ids`."""
    with open_text(path) as f:
        return [line.rstrip("\n") for line in f]


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write pretty JSON atomically (metrics files are read by people and by `dvc metrics`)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ---------------------------------------------------------------- checksums of artifact folders

CHECKSUMS = "checksums.sha256"
"""Per-file SHA-256 of an artifact folder, in `sha256sum` format (`sha256sum -c` checks it too)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: str | os.PathLike) -> None:
    """Write `folder/checksums.sha256` over every file below `folder` (call it last, in the temp folder)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    with atomic_write(folder / CHECKSUMS) as f:
        for p in files:
            rel = p.relative_to(folder).as_posix()
            if "\n" in rel or "\\" in rel:
                raise ValueError(f"cannot checksum a file name with a newline or backslash: {rel!r}")
            f.write(f"{_sha256(p)}  {rel}\n")


def verify_checksums(folder: str | os.PathLike, fix: str) -> bool:
    """Check the files listed in `folder/checksums.sha256`; False if the folder has no such file.

    A missing, truncated or changed file is a DataError naming it; `fix` ends the message
    (e.g. "rerun the train stage").
    """
    folder = Path(folder)
    manifest = folder / CHECKSUMS
    if not manifest.is_file():
        return False
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or rel.startswith("/") or ".." in rel.split("/"):
            raise DataError(manifest, lineno, f"not a sha256sum line; {fix}")
        path = folder / rel
        if not path.is_file():
            raise DataError(path, None, f"missing (listed in {CHECKSUMS}); {fix}")
        if _sha256(path) != digest:
            raise DataError(path, None, f"contents differ from {CHECKSUMS} (truncated or corrupted); {fix}")
    return True
