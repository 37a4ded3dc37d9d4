"""Promotion of a pipeline run: the quality gate against the promoted release, and the release folder.

The gate compares a run's retrieval metrics (metrics/retrieval.json: {system: {metric: value}})
with the metrics the promoted release was promoted with (its release.json), metric by metric,
under `GateConfig` (params.yaml `gate:`): a metric that dropped by more than its `max_drop`
fails the run. A run that passes becomes a new release folder (`dprpipe.release` layout) built
from the workspace's outputs, which `release.set_current` then switches to.

Inputs: metrics mappings, the promoted `Release` (or None), a `GateConfig`; for a release, the
paths of the model, index and corpus and the values of its record. Outputs: `Verdict`s, release
records (dicts), release folders written atomically (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .evaluate import EvaluateConfig
from .io import atomic_dir, write_json
from .mine import MineConfig
from .release import RELEASES, Release, read_release, release_dir

ARTIFACT = "dpr"   # the model's name in the GTO registry (git tags dpr@v1.0.0, dpr#prod#1)
BM25_KEYS = ("k1", "b", "epsilon", "stemmer", "stopwords", "use_title")   # what BM25 scoring needs of `mine`
_VERSION = re.compile(r"v([1-9][0-9]*)")


def _default_max_drop() -> dict[str, dict[str, float]]:
    return {"dpr": {"ndcg@10": 0.01, "recall@100": 0.01}, "hybrid": {"ndcg@10": 0.01, "recall@100": 0.01}}


@dataclass(frozen=True)
class GateConfig:
    """params.yaml `gate:`: the largest drop allowed per system and metric.

    `max_drop[system][metric]` is an absolute drop in the metric's own units (0.01 = one point of
    nDCG@10), from the promoted release's figure to the new run's; a drop of exactly `max_drop`
    passes. Only the metrics listed are gated. The default, 0.01 on nDCG@10 and recall@100 of
    the dense and hybrid systems, is the report's tie margin (`report.min_difference`): a smaller
    change is within the seed spread.
    """

    max_drop: Any = field(default_factory=_default_max_drop)

    def __post_init__(self):
        if not isinstance(self.max_drop, Mapping) or not self.max_drop:
            raise ValueError(f"max_drop must map systems to {{metric: drop}}, e.g. {{dpr: {{ndcg@10: 0.01}}}}; "
                             f"got {self.max_drop!r}")
        table = {}
        for system, metrics in self.max_drop.items():
            if not isinstance(metrics, Mapping) or not metrics:
                raise ValueError(f"max_drop.{system} must map metrics to drops, e.g. {{ndcg@10: 0.01}}; "
                                 f"got {metrics!r}")
            row = {}
            for metric, drop in metrics.items():
                if isinstance(drop, bool) or not isinstance(drop, (int, float)) or math.isnan(drop) or drop < 0:
                    raise ValueError(f"max_drop.{system}.{metric} must be a number >= 0, got {drop!r}")
                row[str(metric)] = float(drop)
            table[str(system)] = MappingProxyType(row)
        object.__setattr__(self, "max_drop", MappingProxyType(table))


@dataclass(frozen=True)
class Verdict:
    """One gated metric: the promoted figure, the new one, and whether the drop is allowed."""

    system: str
    metric: str
    promoted: float | None   # None: the promoted release has no such figure (nothing to compare with)
    new: float | None        # None: the run lacks the figure (it fails)
    max_drop: float

    @property
    def drop(self) -> float | None:
        if self.promoted is None or self.new is None:
            return None
        return round(self.promoted - self.new, 6)   # metrics carry 4 decimals: no float noise at the margin

    @property
    def passed(self) -> bool:
        if self.new is None:
            return False
        return self.promoted is None or self.drop <= self.max_drop

    def describe(self) -> str:
        """One line, e.g. `hybrid ndcg@10: 0.7628 -> 0.7012 (drop 0.0616 > 0.01)`."""
        name = f"{self.system} {self.metric}"
        if self.new is None:
            return f"{name}: {_fmt(self.promoted)} -> missing from the run's metrics"
        if self.promoted is None:
            return f"{name}: no promoted figure -> {_fmt(self.new)} (not compared)"
        rel = "<=" if self.passed else ">"
        return f"{name}: {_fmt(self.promoted)} -> {_fmt(self.new)} (drop {self.drop:.4f} {rel} {self.max_drop:g})"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _figure(metrics: Mapping[str, Any] | None, system: str, metric: str) -> float | None:
    value = ((metrics or {}).get(system) or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def compare(new: Mapping[str, Any], promoted: Mapping[str, Any], cfg: GateConfig) -> list[Verdict]:
    """A verdict for every gated (system, metric), in the config's order.

    >>> cfg = GateConfig({"dpr": {"ndcg@10": 0.01}})
    >>> [v.passed for v in compare({"dpr": {"ndcg@10": 0.69}}, {"dpr": {"ndcg@10": 0.70}}, cfg)]
    [True]
    >>> compare({"dpr": {"ndcg@10": 0.68}}, {"dpr": {"ndcg@10": 0.70}}, cfg)[0].describe()
    'dpr ndcg@10: 0.7000 -> 0.6800 (drop 0.0200 > 0.01)'
    """
    return [Verdict(system, metric, _figure(promoted, system, metric), _figure(new, system, metric), drop)
            for system, row in cfg.max_drop.items() for metric, drop in row.items()]


def failures(verdicts: Iterable[Verdict]) -> list[Verdict]:
    return [v for v in verdicts if not v.passed]


# ---------------------------------------------------------------- versions


def version_number(version: str) -> int | None:
    """3 for "v3" (a release's version) or "v3.0.0" (its GTO version); None for anything else."""
    m = _VERSION.fullmatch(version.removesuffix(".0.0"))
    return int(m.group(1)) if m else None


def next_version(taken: Iterable[str]) -> str:
    """The version after every one in `taken` (release folders, GTO versions); "v1" for none.

    >>> next_version([]), next_version(["v1", "v2.0.0", "notes", ".v4.tmp"])
    ('v1', 'v3')
    """
    return f"v{max((n for v in taken if (n := version_number(v)) is not None), default=0) + 1}"


def gto_version(version: str) -> str:
    """The release's version in GTO's SemVer: "v3" -> "v3.0.0" (each promotion is a major version)."""
    if version_number(version) is None:
        raise ValueError(f"not a release version: {version!r} (expected v1, v2, ...)")
    return f"{version}.0.0"


def release_versions(root: str | os.PathLike) -> list[str]:
    """The versions that have a release folder under `root` (in-progress temporaries excluded)."""
    folder = Path(root) / RELEASES
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)),
                  key=version_number)


# ---------------------------------------------------------------- the release


def release_record(version: str, revision: str, metrics: Mapping[str, Any], mine: MineConfig,
                   evaluate: EvaluateConfig, outputs: Mapping[str, str] | None = None,
                   time: datetime | None = None) -> dict[str, Any]:
    """release.json: what the release was made from and promoted with.

    `bm25` holds the `mine` params BM25 scoring needs (the service scores queries with them) and
    `hybrid` the `evaluate` params of the fusion (hybrid_weight, hybrid_normalize as weight, normalize); `outputs` the DVC hashes (dvc.lock) of what the
    release copies; `git_tag` is its GTO registration.
    """
    when = (time or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return {
        "version": version,
        "git_revision": revision,
        "git_tag": f"{ARTIFACT}@{gto_version(version)}",
        "metrics": {s: dict(m) for s, m in metrics.items()},
        "bm25": {k: getattr(mine, k) for k in BM25_KEYS},
        "hybrid": {"weight": evaluate.hybrid_weight, "normalize": evaluate.hybrid_normalize},
        "outputs": dict(outputs or {}),
        "time": when.isoformat(timespec="seconds"),
    }


def build_release(root: str | os.PathLike, record: Mapping[str, Any], model: str | os.PathLike,
                  index: str | os.PathLike, corpus: str | os.PathLike) -> Release:
    """Copy the model folder, the index folder and the corpus into `<root>/releases/<version>/`
    with `record` as release.json, atomically: a failed or killed build leaves no release folder.

    An existing release is never replaced (FileExistsError): releases are what a rollback
    points back to.
    """
    version = str(record["version"])
    if version_number(version) is None:
        raise ValueError(f"not a release version: {version!r} (expected v1, v2, ...)")
    for path in (model, index):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such folder (run the pipeline first)")
    if not Path(corpus).is_file():
        raise FileNotFoundError(f"{corpus}: no such file (run the pipeline first)")
    final = release_dir(root, version)
    if final.exists():
        raise FileExistsError(f"{final}: release {version} exists; releases are never overwritten")
    with atomic_dir(final) as tmp:
        # copies, not links: DVC may link workspace outputs to its cache, which `dvc gc` can empty
        shutil.copytree(model, tmp / "model")
        shutil.copytree(index, tmp / "index")
        shutil.copy2(corpus, tmp / "corpus.jsonl")
        write_json(tmp / "release.json", dict(record))
    return read_release(root, version)
