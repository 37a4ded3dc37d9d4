"""Retrieval metrics over runs: nDCG@k, MRR@k, Recall@k and DPR's top-k answer accuracy.

Inputs: a run (qid -> [(docid, score)] best first), the judged queries (`data.Query`), and for
answer accuracy the passages' texts. Outputs: a flat {metric: value} dict, averaged over the
queries that have at least one relevant passage (a query missing from the run scores 0).

Definitions follow trec_eval/pytrec_eval as BEIR uses them: linear gain (DCG = sum rel_i /
log2(i + 1)), the ideal DCG from the judged grades, relevance means grade > 0, and
Recall@k = |relevant in top k| / |relevant|. Ranks come from the run's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .records import Passage, Query
from .io import Run
from .text import has_answer

DEFAULT_KS = (1, 5, 10, 20, 100)


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gain.

    >>> round(ndcg_at_k(["a", "b"], {"b": 1}, 10), 4)  # 1/log2(3) / 1
    0.6309
    """
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if relevant.get(d, 0) > 0)
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if relevant.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    rel = {d for d, g in relevant.items() if g > 0}
    return len(rel.intersection(ranked[:k])) / len(rel) if rel else 0.0


def first_answer_rank(ranked: Sequence[str], answers: Sequence[str], text_of: Callable[[str], str],
                      match: str = "string") -> int | None:
    """Rank (0-based) of the first passage containing an answer, or None."""
    for i, d in enumerate(ranked):
        if has_answer(answers, text_of(d), match):
            return i
    return None


def evaluate_run(run: Run, queries: Sequence[Query], ks: Sequence[int] = DEFAULT_KS,
                 text_of: Callable[[str], str] | None = None, match: str = "string") -> dict[str, float]:
    """Average metrics of `run` over `queries`.

    nDCG@10 and MRR@10 always; Recall@k for each k; with `text_of` and answers, also DPR's
    top-k accuracy ("accuracy@k": an answer string in one of the top k passages).
    """
    judged = [q for q in queries if q.positives]
    answered = [q for q in queries if q.answers]
    depth = max(ks)
    out: dict[str, float] = {}
    if judged:
        ranked = {q.id: [d for d, _ in run.get(q.id, [])[:max(depth, 10)]] for q in judged}
        n = len(judged)
        out["ndcg@10"] = sum(ndcg_at_k(ranked[q.id], q.relevant, 10) for q in judged) / n
        out["mrr@10"] = sum(mrr_at_k(ranked[q.id], q.relevant, 10) for q in judged) / n
        for k in ks:
            out[f"recall@{k}"] = sum(recall_at_k(ranked[q.id], q.relevant, k) for q in judged) / n
    if answered and text_of is not None:
        firsts = [first_answer_rank([d for d, _ in run.get(q.id, [])[:depth]], q.answers, text_of, match)
                  for q in answered]
        for k in ks:
            out[f"accuracy@{k}"] = sum(1 for r in firsts if r is not None and r < k) / len(answered)
    out["queries"] = len(judged) or len(answered)
    return out


def recall_curve(run: Run, queries: Sequence[Query], ks: Sequence[int]) -> list[float]:
    """Recall@k for each k (for the recall@k plot)."""
    judged = [q for q in queries if q.positives]
    if not judged:
        return [0.0 for _ in ks]
    ranked = {q.id: [d for d, _ in run.get(q.id, [])[:max(ks)]] for q in judged}
    return [sum(recall_at_k(ranked[q.id], q.relevant, k) for q in judged) / len(judged) for k in ks]


@dataclass(frozen=True)
class EvaluateConfig:
    ks: tuple[int, ...] = DEFAULT_KS
    curve_ks: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 30, 50, 100)
    answer_match: str = "string"
    hybrid_weight: float = 1.0      # hybrid score = bm25 + weight * dense
    hybrid_normalize: bool = True   # min-max normalise each run per query before fusing


def evaluate_runs(runs: Mapping[str, Run], queries: Sequence[Query], corpus: Sequence[Passage],
                  cfg: EvaluateConfig) -> tuple[dict[str, dict[str, float]], dict[int, dict[str, float]]]:
    """Metrics per system and the recall@k curve {k: {system: recall}}."""
    texts = {p.id: p.text for p in corpus}
    metrics = {name: {k: round(v, 4) if isinstance(v, float) else v
                      for k, v in evaluate_run(r, queries, cfg.ks, texts.__getitem__, cfg.answer_match).items()}
               for name, r in runs.items()}
    curves = {name: recall_curve(r, queries, cfg.curve_ks) for name, r in runs.items()}
    return metrics, {k: {name: curves[name][i] for name in runs} for i, k in enumerate(cfg.curve_ks)}
