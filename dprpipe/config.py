"""Typed configs from plain mappings: unknown keys and wrong types fail loudly.

Inputs: a dataclass type and a mapping (a params.yaml section, read by the caller; this
package never reads params.yaml or argv). Output: a frozen dataclass instance. Errors are
`ConfigError`s (a ValueError) that carry the section and key at fault, so the caller can
point at its line in the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad params value or key: `key` is the section's key at fault (None: the section as a whole)."""

    def __init__(self, message: str, section: str, key: Any = None):
        super().__init__(message)
        self.section = section
        self.key = key


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key_name(key: Any, limit: int = 60) -> str:
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build `cls` from `values`, naming `section` and the key in every error.

    >>> from dprpipe.bm25 import BM25Params
    >>> from_mapping(BM25Params, {"k1": 1}, "mine").k1
    1.0
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]   # YAML keys may be ints, bools or null too
    if unknown:
        listed = ", ".join(sorted(_key_name(k) for k in unknown))
        raise ConfigError(f"params section {section!r}: unknown key(s) {listed}; "
                          f"known keys: {', '.join(names)}", section, unknown[0])
    out = {}
    for name, value in values.items():
        try:
            out[name] = _coerce(value, hints[name], f"{section}.{name}")
        except ValueError as e:
            raise ConfigError(str(e), section, name) from None
    try:
        return cls(**out)
    except ValueError as e:  # the config's own validation (__post_init__): blame the key it names first
        named = [(m.start(), k) for k in out if (m := re.search(rf"\b{re.escape(k)}\b", str(e)))]
        raise ConfigError(f"params section {section!r}: {e}", section, min(named)[1] if named else None) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        errors = []
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[-1])
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{where}: expected null, got {_clip(value)}")
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping (key: value), got {_clip(value)}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, f"{where} key"): _coerce(v, value_hint, f"{where}.{_key_name(k)}")
                for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {_clip(value)}")
        (arm, *_) = typing.get_args(hint) or (Any,)
        return tuple(_coerce(v, arm, where) for v in value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # `dvc exp run -S train.lr=3e-5` writes 3e-05, which YAML 1.1 reads as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected float, got str {_clip(value)}") from None
    if hint is float and isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{where}: expected a number, got NaN")
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {_clip(value)}")
    return value
