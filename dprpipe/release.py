"""Promoted releases: the folder layout that promotion writes and the search service reads.

A release is a self-contained copy of what serving needs, made from one pipeline run that
passed the quality gate:

    <root>/releases/<version>/model/          the fine-tuned encoder (a `DualEncoder.save` folder)
    <root>/releases/<version>/index/          its FAISS index folder (`index.save_index`)
    <root>/releases/<version>/corpus.jsonl    the prepared passages (ids, titles, texts)
    <root>/releases/<version>/release.json    version, git revision, metrics, BM25 params, time
    <root>/current.json                       {"version": ...}: the release being served

`current.json` is replaced atomically, so a reader sees the old release or the new one, never a
mix; earlier releases stay on disk, so a promotion is undone by pointing `current.json` back.

Inputs: a root folder. Outputs: `Release` values (paths and the release record).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import DataError, atomic_write

CURRENT = "current.json"
RELEASES = "releases"


@dataclass(frozen=True)
class Release:
    version: str
    path: Path               # <root>/releases/<version>
    record: dict[str, Any]   # release.json

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def index(self) -> Path:
        return self.path / "index"

    @property
    def corpus(self) -> Path:
        return self.path / "corpus.jsonl"


def release_dir(root: str | os.PathLike, version: str) -> Path:
    return Path(root) / RELEASES / version


def read_release(root: str | os.PathLike, version: str) -> Release:
    path = release_dir(root, version)
    record_path = path / "release.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(record_path, None, f"not a readable release record ({e})") from None
    return Release(version, path, record)


def current_version(root: str | os.PathLike) -> str | None:
    """The version `current.json` names, or None before the first promotion."""
    path = Path(root) / CURRENT
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["version"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(path, None, f'expected {{"version": ...}} ({e})') from None


def read_current(root: str | os.PathLike) -> Release | None:
    """The release being served, or None before the first promotion."""
    version = current_version(root)
    return None if version is None else read_release(root, version)


def set_current(root: str | os.PathLike, version: str) -> None:
    """Point `current.json` at an existing release, atomically."""
    read_release(root, version)   # refuse to point at a release that is not there
    with atomic_write(Path(root) / CURRENT) as f:
        json.dump({"version": version}, f)
        f.write("\n")
