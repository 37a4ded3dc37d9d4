"""Shared plumbing of the stage scripts: read one params.yaml section into a typed config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeVar

import yaml

# Import the dprpipe next to this script, not whichever copy is installed: DVC hashes this
# repository's modules, so a run in a copy (`dvc exp run --temp`, the tests) must use them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dprpipe.config import from_mapping  # noqa: E402

T = TypeVar("T")


def load_params(path: str | Path, section: str, cls: type[T]) -> T:
    """The `section` of a params file as `cls`; unknown keys or wrong types exit with a clear error."""
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"error: cannot read params file {path}: {e}")
    if not isinstance(params, dict) or not isinstance(params.get(section, {}), dict):
        sys.exit(f"error: {path}: section {section!r} must be a mapping")
    try:
        return from_mapping(cls, params.get(section), section)
    except ValueError as e:
        sys.exit(f"error: {path}: {e}")


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(main) -> None:
    """Run a stage's main, turning data errors into one clear line and exit status 1."""
    from dprpipe.io import DataError

    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
