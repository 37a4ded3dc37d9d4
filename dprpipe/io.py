"""File plumbing shared by every stage: atomic writes, JSONL and TSV records, run files.

Inputs: paths. Outputs: files written atomically (a temporary name in the same folder,
then `os.replace`), so a killed stage never leaves a half-written output that a later
stage could read. Read errors are `DataError`s that name the file, the line and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

Run = dict[str, list[tuple[str, float]]]
"""A ranking per query: qid -> [(docid, score), ...] best first."""


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what is wrong."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path = str(path)
        self.line = line
        self.problem = problem


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as f:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode open() would
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; give it the mode mkdir() would
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
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
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


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
    """Open a UTF-8 text file; a missing file or bad encoding raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    f = open(path, encoding="utf-8", newline="")
    try:
        yield _DecodeGuard(f, path)
    finally:
        f.close()


class _DecodeGuard:
    """Iterate lines of a text file, turning a UnicodeDecodeError into a DataError."""

    def __init__(self, f: IO[str], path: Path):
        self._f, self._path, self._line = f, path, 0

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                line = self._f.readline()
            except UnicodeDecodeError as e:
                raise _utf8_error(self._path, e) from None
            if not line:
                return
            self._line += 1
            yield line

    def read(self, *args) -> str:
        try:
            return self._f.read(*args)
        except UnicodeDecodeError as e:
            raise _utf8_error(self._path, e) from None


def _utf8_error(path: Path, err: UnicodeDecodeError) -> DataError:
    """A DataError naming the line of the first invalid byte.

    The text layer decodes a whole buffer ahead of the line being read, so the error's own
    position says nothing about the line: find it by decoding the raw lines one by one (a
    multi-byte UTF-8 sequence never contains a newline byte).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start + 1} "
                                 "of the line); re-encode the file as UTF-8")
    return DataError(path, None, f"not valid UTF-8 ({err.reason}); re-encode the file as UTF-8")


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
