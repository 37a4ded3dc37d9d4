"""Typed configs from plain mappings: unknown keys and wrong types fail loudly.

Inputs: a dataclass type and a mapping (a params.yaml section, read by the caller; this
package never reads params.yaml or argv). Output: a frozen dataclass instance.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build `cls` from `values`, naming `section` and the key in every error.

    >>> from dprpipe.bm25 import BM25Params
    >>> from_mapping(BM25Params, {"k1": 1}, "mine").k1
    1.0
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"params section {section!r}: unknown key(s) {', '.join(unknown)}; "
                         f"known keys: {', '.join(names)}")
    out = {}
    for name, value in values.items():
        out[name] = _coerce(value, hints[name], f"{section}.{name}")
    return cls(**out)


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
        raise ValueError(f"{where}: expected null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (arm, *_) = typing.get_args(hint) or (Any,)
        return tuple(_coerce(v, arm, where) for v in value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # `dvc exp run -S train.lr=3e-5` writes 3e-05, which YAML 1.1 reads as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected float, got str {value!r}") from None
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able values (saved next to checkpoints and outputs)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
