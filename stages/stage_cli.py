"""The command line every stage script shares: `--params`, its section read into a typed config, errors as one line.

A bad params file stops the stage with one line, `error: <file>:<line>: <problem>`, pointing
at the offending key where there is one: YAML syntax, encoding, duplicate keys, unknown keys
and wrong types alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml

# Import the dprpipe next to this script, not whichever copy is installed: DVC hashes this
# repository's modules, so a run in a copy (`dvc exp run --temp`, the tests) must use them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dprpipe.config import ConfigError, from_mapping  # noqa: E402
from dprpipe.io import DataError  # noqa: E402

T = TypeVar("T")
MERGE_TAG = "tag:yaml.org,2002:merge"   # `<<: *base` keys, which YAML expands
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml: a huge params file parses in ms, not s


def _mark_line(text: str, mark) -> int:
    """The 1-based line of a YAML mark, counting "\n" only (YAML also breaks lines at NEL, LS and PS)."""
    return text.count("\n", 0, mark.index) + 1


def read_params(path: str | Path, section: str) -> tuple[dict | None, dict[tuple[type, Any], int], int | None]:
    """The `section` mapping of a params file (None if absent), the line of each of its keys
    (keyed by (type, key)), and the line of the section. Any problem with the file is a
    DataError naming the line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(path, None, f"cannot read the params file ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, raw[:e.start].count(b"\n") + 1, f"not valid UTF-8 ({e.reason}); "
                        "re-encode the file as UTF-8") from None
    loader = None
    try:
        loader = LOADER(text)
        root = loader.get_single_node()
        if root is None:
            return None, {}, None
        if not isinstance(root, yaml.MappingNode):
            raise DataError(path, _mark_line(text, root.start_mark),
                            "expected a mapping of sections (prepare:, mine:, ...)")
        params = loader.construct_document(root)
        # keys and lines from the node tree (YAML itself keeps the last of a repeated key silently)
        section_node, section_line = None, None
        for key_node, value_node in root.value:
            if key_node.tag != MERGE_TAG and loader.construct_object(key_node) == section:
                line = _mark_line(text, key_node.start_mark)
                if section_node is not None:
                    raise DataError(path, line, f"section {section!r} appears twice (first at line "
                                    f"{section_line}); YAML would keep only the last")
                section_node, section_line = value_node, line
        if section_node is None:
            return None, {}, None
        if not isinstance(section_node, yaml.MappingNode) or not isinstance(params.get(section), dict):
            raise DataError(path, section_line, f"section {section!r} must be a mapping of key: value")
        lines: dict[tuple[type, Any], int] = {}
        for key_node, _ in section_node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key, line = loader.construct_object(key_node), _mark_line(text, key_node.start_mark)
            if (type(key), key) in lines:  # by type too: YAML's `1` and `yes` are equal in Python
                raise DataError(path, line, f"{section}.{key} appears twice (first at line "
                                f"{lines[type(key), key]}); YAML would keep only the last")
            lines[type(key), key] = line
        values = params[section]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(x for x in (e.context, e.problem) if x)
        raise DataError(path, _mark_line(text, mark) if mark else None, f"not valid YAML ({problem})") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow
        line = text[:e.position].count("\n") + 1 if isinstance(e.position, int) else None
        raise DataError(path, line, f"not valid YAML (character #x{e.character:04x} is not allowed)") from None
    except yaml.YAMLError as e:
        raise DataError(path, None, f"not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise DataError(path, None, "not valid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()
    return values, lines, section_line


def load_params(path: str | Path, section: str, cls: type[T]) -> T:
    """The `section` of a params file as `cls`; unknown keys or wrong types exit with a clear error."""
    try:
        values, lines, section_line = read_params(path, section)
        try:
            return from_mapping(cls, values, section)
        except ConfigError as e:
            raise DataError(path, lines.get((type(e.key), e.key), section_line), str(e)) from None
    except DataError as e:
        sys.exit(f"error: {e}")


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(main) -> None:
    """Run a stage's main, turning data errors into one clear line and exit status 1."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
