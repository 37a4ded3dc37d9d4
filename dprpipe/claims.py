"""The paper-claims experiment set: its variants, its records, their statistics and the claims' verdicts.

Inputs: experiment records, one per training run (`Record`: variant, seed, the evaluate stage's
metrics per system, the train stage's metrics, the per-epoch validation history and the
recall@k curve), as `flows/experiments.py` collects them into `reports/experiments.json`, and a
`ReportConfig` (params.yaml `report:`). Outputs: mean ± sample sd over seeds (`Stat`), the
comparisons of two systems with their tie thresholds, and each claim's verdict with its numbers
in words (`Claim`). `dprpipe.report` renders them.

Everything here is a pure function of the records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .io import DataError, atomic_write

# ---------------------------------------------------------------- the experiment set


@dataclass(frozen=True)
class Variant:
    """A training variant of the set: the `-S` overrides that define it, on top of params.yaml."""

    name: str
    label: str
    overrides: Mapping[str, Any]



def _variant(name: str, label: str, negatives: int, source: str = "bm25", shared: bool = True,
             batch: dict | None = None) -> Variant:
    return Variant(name, label, {"train.hard_negatives": negatives, "train.negatives": source, "model.shared": shared,
                                 **(batch or {})})


# Every variant sets the negatives and the encoders, so a name means the same thing whatever
# params.yaml's defaults are for those; the rest of the recipe (epochs, lr, frozen layers, ...) and the
# batch size (a resource setting, except in dpr_b128) are params.yaml's.
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    _variant("dpr_inbatch", "DPR, in-batch negatives only", 0),
    _variant("dpr_hn1", "DPR, +1 BM25 negative", 1),
    _variant("dpr_hn2", "DPR, +2 BM25 negatives", 2),
    _variant("dpr_sep", "DPR, +1 BM25 negative, separate encoders", 1, shared=False),
    _variant("dpr_dense", "DPR, +1 dense negative (the base model's ranking)", 1, source="dense"),
    _variant("dpr_b128", "DPR, +1 BM25 negative, batch 128 (gradient caching)", 1,
             batch={"train.batch_size": 128, "train.grad_cache_chunk": 32}),
    _variant("dpr_sep_dense", "DPR, +1 dense negative, separate encoders (the default)", 1, source="dense",
             shared=False),
)}
REFERENCE = "dpr_hn1"      # the paper's DPR; BM25, zero-shot and the hybrid are read from its runs
DEFAULT = "dpr_sep_dense"  # params.yaml's variant (its label says so): compared with REFERENCE, its hybrid shown too
SEED_KEY = "train.seed"
VARIANT_KEYS = tuple(sorted({k for v in VARIANTS.values() for k in v.overrides} | {SEED_KEY}))


def run_name(variant: str, seed: int) -> str:
    """The DVC experiment name of one run of the set.

    >>> run_name("dpr_hn2", 13)
    'dpr_hn2-s13'
    """
    return f"{variant}-s{seed}"


@dataclass(frozen=True)
class ReportConfig:
    metric: str = "ndcg@10"         # the metric the claims are judged on
    wide_margin: float = 0.05       # claim 1's "wide margin", in `metric`
    min_difference: float = 0.01    # smaller differences are ties, whatever the seed spread


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One training run of the set, with everything the report reads from it."""

    name: str                                   # the DVC experiment name (or the workspace run's)
    variant: str                                # a key of VARIANTS
    seed: int
    source: str                                 # "experiment" (rev: its commit) or "workspace" (the default run)
    rev: str | None
    params: dict[str, Any]                      # VARIANT_KEYS as the run saw them
    metrics: dict[str, dict[str, float]]        # metrics/retrieval.json: system -> metric -> value
    train: dict[str, float]                     # metrics/train.json
    history: list[dict[str, float | None]]      # plots/train.csv rows (epoch 0: before training)
    recall: list[dict[str, float]] = field(default_factory=list)   # plots/recall.csv rows (k, one column per system)


def parse_csv(text: str) -> list[dict[str, float | int | None]]:
    """Rows of a numeric CSV with a header; empty cells are None.

    >>> parse_csv("epoch,loss\\n0,\\n1,0.5\\n")
    [{'epoch': 0, 'loss': None}, {'epoch': 1, 'loss': 0.5}]
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    header = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) != len(header):
            raise ValueError(f"row {line!r} has {len(cells)} cells, the header {len(header)}")
        rows.append({h: _number(c) for h, c in zip(header, cells)})
    return rows


def _number(cell: str) -> float | int | None:
    cell = cell.strip()
    if not cell:
        return None
    try:
        return int(cell)
    except ValueError:
        return float(cell)


def record_from_outputs(name: str, variant: str, seed: int, source: str, rev: str | None, params: Mapping[str, Any],
                        retrieval_json: str, train_json: str, train_csv: str, recall_csv: str) -> Record:
    """A record from the texts of one run's outputs (metrics/retrieval.json, metrics/train.json,
    plots/train.csv, plots/recall.csv), however they were read (workspace files or `git show`)."""
    return Record(name=name, variant=variant, seed=int(seed), source=source, rev=rev,
                  params={k: params[k] for k in VARIANT_KEYS if k in params},
                  metrics=json.loads(retrieval_json), train=json.loads(train_json),
                  history=parse_csv(train_csv), recall=parse_csv(recall_csv))


@dataclass(frozen=True)
class ExperimentSet:
    """The contents of reports/experiments.json."""

    dataset: str
    eval_split: str
    records: list[Record]


def to_json(exps: ExperimentSet) -> str:
    """The JSON text of an experiment set (stable: the same set gives the same bytes)."""
    obj = {"dataset": exps.dataset, "eval_split": exps.eval_split,
           "records": [dataclasses.asdict(r) for r in exps.records]}
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def write_experiments(path: str | os.PathLike, exps: ExperimentSet) -> None:
    with atomic_write(path) as f:
        f.write(to_json(exps))


def read_experiments(path: str | os.PathLike) -> ExperimentSet:
    """reports/experiments.json; a malformed file raises DataError naming it and the record."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise DataError(path, None, f"cannot read it ({e.strerror}); collect it with `python -m flows.experiments`")
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"malformed JSON ({e.msg}); regenerate it with `python -m flows.experiments`")
    fields = [f for f in Record.__dataclass_fields__]
    records = []
    for i, r in enumerate(obj.get("records", [])):
        missing = [f for f in fields if f not in r and f != "recall"]
        unknown = sorted(set(r) - set(fields))
        if missing or unknown:
            raise DataError(path, None, f"record {i} ({r.get('name', '?')}): missing {missing or 'nothing'}, "
                            f"unknown {unknown or 'nothing'}; regenerate it with `python -m flows.experiments`")
        records.append(Record(**r))
    return ExperimentSet(dataset=str(obj.get("dataset", "")), eval_split=str(obj.get("eval_split", "")),
                         records=records)


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (n - 1; 0 for one value or equal values) over seeds."""

    mean: float
    sd: float
    n: int

    def text(self, digits: int = 4) -> str:
        """
        A figure every seed gives alike (BM25, the untrained model) has no spread to show.

        >>> Stat(0.5, 0.0, 1).text(), Stat(0.5, 0.01, 3).text(), Stat(0.5, 0.0, 3).text()
        ('0.5000', '0.5000 ± 0.0100', '0.5000')
        """
        if self.n < 2 or self.sd == 0:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def stat(values: Iterable[float | None]) -> Stat | None:
    """Mean ± sample sd of the values that are present; None if there are none.

    >>> s = stat([0.70, 0.72, 0.74]); round(s.mean, 4), round(s.sd, 4), s.n
    (0.72, 0.02, 3)
    """
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    if len(set(xs)) == 1:  # exactly 0, not the rounding error of averaging equal values
        return Stat(xs[0], 0.0, len(xs))
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return Stat(mean, sd, len(xs))


def by_variant(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Runs grouped by variant: VARIANTS' order first, then unknown variants by name; seeds ascending."""
    groups: dict[str, list[Record]] = {}
    order = {name: i for i, name in enumerate(VARIANTS)}
    for r in sorted(records, key=lambda r: (order.get(r.variant, len(order)), r.variant, r.seed)):
        groups.setdefault(r.variant, []).append(r)
    return groups


def reference_variant(groups: Mapping[str, list[Record]]) -> str | None:
    """The variant whose runs give BM25, the zero-shot model and the hybrid: REFERENCE if it ran."""
    if REFERENCE in groups:
        return REFERENCE
    return next(iter(groups), None)


def hybrid_variants(groups: Mapping[str, list[Record]]) -> list[str]:
    """The variants whose hybrid the report shows: the reference, and DEFAULT where it ran."""
    return [v for v in dict.fromkeys((reference_variant(groups), DEFAULT)) if v in groups]


def hybrid_name(variant: str) -> str:
    """The report's name for a variant's hybrid (its table row and recall curve)."""
    return f"hybrid (BM25 + {variant_label(variant)})"


def metric_stat(records: Sequence[Record], system: str, metric: str) -> Stat | None:
    return stat(r.metrics.get(system, {}).get(metric) for r in records)


def train_minutes(records: Sequence[Record]) -> Stat | None:
    return stat(r.train["train_seconds"] / 60 if "train_seconds" in r.train else None for r in records)


def variant_label(variant: str) -> str:
    return VARIANTS[variant].label if variant in VARIANTS else variant


# the metrics of the report's table, with their short names (also those of the claims' text)
TABLE_METRICS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@1", "R@1"), ("recall@5", "R@5"),
                 ("recall@20", "R@20"), ("recall@100", "R@100"))


# ---------------------------------------------------------------- the claims


EPSILON = 1e-9   # far below the metrics' 0.0001 resolution, far above float error


@dataclass(frozen=True)
class Comparison:
    """`a - b` on one metric: the difference of the means and the threshold below which it is a tie."""

    a: Stat
    b: Stat
    delta: float
    tie: float          # max(min_difference, the seed spread of the difference)

    @property
    def sign(self) -> int:
        """+1 if a is ahead by more than a tie, -1 if b is, 0 for a tie."""
        # the metrics are 4-decimal figures: a difference that equals the threshold up to float
        # noise (0.7224 - 0.7124 is 0.0100000000000001) is a tie, as its printed value says
        return 0 if abs(self.delta) <= self.tie + EPSILON else (1 if self.delta > 0 else -1)


def compare(a: Stat | None, b: Stat | None, min_difference: float) -> Comparison | None:
    """
    >>> c = compare(Stat(0.70, 0.0, 1), Stat(0.68, 0.0, 1), 0.01); round(c.delta, 4), c.tie, c.sign
    (0.02, 0.01, 1)
    >>> compare(Stat(0.70, 0.03, 3), Stat(0.68, 0.04, 3), 0.01).sign   # spread sqrt(.03² + .04²) = 0.05
    0
    """
    if a is None or b is None:
        return None
    spread = math.sqrt(a.sd ** 2 + b.sd ** 2)
    return Comparison(a, b, a.mean - b.mean, max(min_difference, spread))


@dataclass(frozen=True)
class Claim:
    key: str            # "1", "2", "2a", "2b"
    statement: str      # the paper's claim
    paper: str          # what the paper reported
    verdict: str        # held | partly held | did not hold | not measured
    detail: str         # the measured numbers, in words


def _d(x: float) -> str:
    return f"{x:+.4f}"


def metric_name(metric: str) -> str:
    """
    >>> metric_name("ndcg@10"), metric_name("recall@20"), metric_name("accuracy@5")
    ('nDCG@10', 'R@20', 'accuracy@5')
    """
    return dict(TABLE_METRICS).get(metric, metric)


def _vs(c: Comparison, a: str, b: str, metric: str) -> str:
    return f"{a} {c.a.text()} vs {b} {c.b.text()} {metric_name(metric)}: {_d(c.delta)}"


def _side_deltas(groups: Mapping[str, list[Record]], a: tuple[str, str], b: tuple[str, str],
                 metrics: Sequence[str], cfg: ReportConfig) -> str:
    """The same comparison on other metrics, as context (e.g. R@20 and R@100, the paper's top-k)."""
    parts = []
    for m in metrics:
        if m == cfg.metric:
            continue
        c = compare(metric_stat(groups.get(a[0], []), a[1], m), metric_stat(groups.get(b[0], []), b[1], m),
                    cfg.min_difference)
        if c is not None:
            parts.append(f"{metric_name(m)} {_d(c.delta)}")
    return f" (also {', '.join(parts)})" if parts else ""


def claims(records: Sequence[Record], cfg: ReportConfig) -> list[Claim]:
    """The paper's claims, judged on `cfg.metric` from the records' means.

    A difference counts only when it is larger than its tie threshold (`compare`); claim 1 also
    needs `cfg.wide_margin` to hold in full."""
    groups = by_variant(records)
    ref = reference_variant(groups) or REFERENCE
    m = cfg.metric
    side = ("recall@20", "recall@100")

    def get(variant: str, system: str) -> Stat | None:
        return metric_stat(groups.get(variant, []), system, m)

    out = []

    # 1: trained DPR vs BM25
    c = compare(get(REFERENCE, "dpr"), get(ref, "bm25"), cfg.min_difference)
    statement = "A trained dual encoder beats BM25 by a wide margin."
    paper = "DPR ahead of BM25 by 9 to 19 points of top-20 accuracy on four of its five QA datasets (Table 2)"
    if c is None:
        out.append(Claim("1", statement, paper, "not measured", _needs((REFERENCE,))))
    else:
        text = _vs(c, variant_label(REFERENCE), "BM25", m) + _side_deltas(groups, (REFERENCE, "dpr"), (ref, "bm25"),
                                                                         side, cfg)
        if c.sign > 0 and c.delta >= cfg.wide_margin:
            out.append(Claim("1", statement, paper, "held",
                             f"{text}, at least the {cfg.wide_margin:.4f} of a wide margin."))
        elif c.sign > 0:
            out.append(Claim("1", statement, paper, "partly held",
                             f"{text}: DPR is ahead by more than a tie ({c.tie:.4f}) but by less than the "
                             f"{cfg.wide_margin:.4f} of a wide margin."))
        elif c.sign == 0:
            out.append(Claim("1", statement, paper, "did not hold",
                             f"{text}, within the tie threshold {c.tie:.4f}: DPR and BM25 tie."))
        else:
            out.append(Claim("1", statement, paper, "did not hold", f"{text}: BM25 is ahead."))

    # 2: in-batch negatives work (training with them improves on the starting model)
    out.append(_gain_claim(
        "2", "Training with in-batch negatives works: it improves the retriever.",
        "the other questions' gold passages in a batch, as negatives, train an effective retriever (Table 3); "
        "the set has no baseline without in-batch negatives, so here they are compared with the untrained "
        "starting model",
        compare(get("dpr_inbatch", "dpr"), get("dpr_inbatch", "zeroshot"), cfg.min_difference),
        variant_label("dpr_inbatch"), "the zero-shot starting model", m,
        _side_deltas(groups, ("dpr_inbatch", "dpr"), ("dpr_inbatch", "zeroshot"), side, cfg), ("dpr_inbatch",)))

    # 2a: one BM25 hard negative per question improves on in-batch only
    out.append(_gain_claim(
        "2a", "Adding one BM25 hard negative per question improves on in-batch negatives only.",
        "a single BM25 negative improved on gold in-batch negatives substantially (Table 3)",
        compare(get("dpr_hn1", "dpr"), get("dpr_inbatch", "dpr"), cfg.min_difference),
        variant_label("dpr_hn1"), variant_label("dpr_inbatch"), m,
        _side_deltas(groups, ("dpr_hn1", "dpr"), ("dpr_inbatch", "dpr"), side, cfg), ("dpr_hn1", "dpr_inbatch")))

    # 2b: a second BM25 negative does not help further
    c = compare(get("dpr_hn2", "dpr"), get("dpr_hn1", "dpr"), cfg.min_difference)
    statement = "A second BM25 negative per question does not help further."
    paper = "two BM25 negatives did not improve on one (Table 3)"
    if c is None:
        out.append(Claim("2b", statement, paper, "not measured", _needs(("dpr_hn2", "dpr_hn1"))))
    else:
        text = _vs(c, variant_label("dpr_hn2"), variant_label("dpr_hn1"), m) + _side_deltas(
            groups, ("dpr_hn2", "dpr"), ("dpr_hn1", "dpr"), side, cfg)
        if c.sign > 0:
            out.append(Claim("2b", statement, paper, "did not hold",
                             f"{text}: the second negative helped, by more than a tie ({c.tie:.4f})."))
        elif c.sign == 0:
            out.append(Claim("2b", statement, paper, "held", f"{text}, within the tie threshold {c.tie:.4f}."))
        else:
            out.append(Claim("2b", statement, paper, "held", f"{text}: the second negative made it worse."))

    # 3: ANCE's negatives from a dense model's own ranking; 4: DPR's larger batch
    for key, statement, paper, a, b in (
            ("3", "Negatives from a dense model's ranking beat BM25 negatives.",
             "ANCE's negatives from the dense model beat DPR's BM25 negatives (Xiong et al., 2021, Table 1)",
             "dpr_dense", "dpr_hn1"),
            ("4", "A larger batch (more in-batch negatives) helps.",
             "batch 128 beat batch 32 with in-batch negatives (Table 3)", "dpr_b128", "dpr_hn1")):
        out.append(_gain_claim(key, statement, paper, compare(get(a, "dpr"), get(b, "dpr"), cfg.min_difference),
                               variant_label(a), variant_label(b), m,
                               _side_deltas(groups, (a, "dpr"), (b, "dpr"), side, cfg), (a, b)))
    return out


def _needs(variants: Sequence[str]) -> str:
    return "needs runs of " + " and ".join(f"`{v}`" for v in variants) + " (`python -m flows.experiments`)."


def _gain_claim(key: str, statement: str, paper: str, c: Comparison | None, a: str, b: str, metric: str,
                side: str, needs: Sequence[str]) -> Claim:
    """A claim that `a` improves on `b`: held only if it is ahead by more than a tie."""
    if c is None:
        return Claim(key, statement, paper, "not measured", _needs(needs))
    text = _vs(c, a, b, metric) + side
    if c.sign > 0:
        return Claim(key, statement, paper, "held", f"{text}, more than a tie ({c.tie:.4f}).")
    if c.sign == 0:
        return Claim(key, statement, paper, "did not hold", f"{text}, within the tie threshold {c.tie:.4f}.")
    return Claim(key, statement, paper, "did not hold", f"{text}: it is worse.")


def other_comparisons(records: Sequence[Record], cfg: ReportConfig) -> list[str]:
    """Measured differences that are not claims of the paper: separate encoders, dense negatives
    at separate encoders (the default against `dpr_sep`: claim 3 at the default's encoders), the
    default against the paper's DPR, and the hybrids."""
    groups = by_variant(records)
    ref = reference_variant(groups)
    m = cfg.metric
    words = {1: "ahead", 0: "a tie", -1: "behind"}
    default = (DEFAULT, "dpr", variant_label(DEFAULT))
    pairs = [(("dpr_sep", "dpr", variant_label("dpr_sep")),
              ("dpr_hn1", "dpr", "shared (" + variant_label("dpr_hn1") + ")")),
             (default, ("dpr_sep", "dpr", "BM25 negatives (" + variant_label("dpr_sep") + ")")),
             (default, (REFERENCE, "dpr", "the paper's DPR"))]
    hybrids = hybrid_variants(groups)
    for v in hybrids:
        label = "hybrid" if len(hybrids) == 1 else hybrid_name(v)   # the full name only where two could be confused
        pairs += [((v, "hybrid", label), (v, "dpr", variant_label(v))), ((v, "hybrid", label), (ref, "bm25", "BM25"))]
    out = []
    for (va, sa, la), (vb, sb, lb) in pairs:
        c = compare(metric_stat(groups.get(va, []), sa, m), metric_stat(groups.get(vb, []), sb, m),
                    cfg.min_difference)
        if c is not None:
            out.append(f"{la} vs {lb}: {c.a.text()} vs {c.b.text()} {metric_name(m)}, {_d(c.delta)} "
                       f"({words[c.sign]}, tie threshold {c.tie:.4f}).")
    return out
