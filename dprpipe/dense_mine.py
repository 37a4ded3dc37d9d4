"""Mine hard negatives with a dense encoder (ANCE, Xiong et al. 2021; sentence-transformers'
`mine_hard_negatives`): the top passages of the encoder's own ranking that are not gold.

BM25 negatives share words with the question; dense negatives are the passages the encoder
itself confuses with the positive, which is what its loss most needs to see. Mined with the
base model (the zero-shot index) they are sentence-transformers' recipe; mined with a trained
checkpoint they are a second round of ANCE-style training.

Dense rankings also surface unjudged relevant passages ("false negatives"), so two filters
drop likely ones, as `mine_hard_negatives` does: `skip_top` leaves out the first ranks, and
`relative_margin` keeps a candidate only if it scores at most (1 - margin) times the
question's best-scoring positive.

Inputs: the questions with their judgements (and answers), their embeddings, a searcher over
the passage embeddings, the passages' texts (for answer matching). Output: {qid: [(docid,
score), ...]} best first, the shape the BM25 miner writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .io import Run
from .mine import is_gold
from .records import Query


@dataclass(frozen=True)
class DenseMineConfig:
    depth: int = 100              # how deep in the dense ranking to look for negatives
    negatives: int = 30           # negatives kept per question (training samples from them)
    skip_top: int = 0             # leave out this many top-ranked non-gold passages (likely unjudged positives)
    relative_margin: float = 0.0  # keep a candidate scoring <= (1 - margin) * the best positive's score
    answer_match: str = "string"  # string | regex: DPR's has_answer, for questions with answers

    def __post_init__(self):
        if self.depth < 1 or self.negatives < 0 or self.skip_top < 0:
            raise ValueError("depth must be >= 1, negatives and skip_top >= 0")
        if not 0.0 <= self.relative_margin < 1.0:
            raise ValueError(f"relative_margin must be in [0, 1), got {self.relative_margin}")


def filter_negatives(query: Query, ranked: Sequence[tuple[str, float]], positive_score: float | None,
                     cfg: DenseMineConfig, text_of: Callable[[str], str] | None = None) -> list[tuple[str, float]]:
    """The negatives of one question from its dense ranking (best first).

    Gold passages (judged relevant, or containing an answer) are never negatives; of the rest,
    the first `skip_top` are left out, and with a margin so is any scoring above
    (1 - margin) * `positive_score`.

    >>> q = Query("q", "x", relevant={"p": 1})
    >>> ranked = [("p", 0.9), ("a", 0.85), ("b", 0.6), ("c", 0.5)]
    >>> filter_negatives(q, ranked, 0.9, DenseMineConfig(negatives=2))
    [('a', 0.85), ('b', 0.6)]
    >>> filter_negatives(q, ranked, 0.9, DenseMineConfig(skip_top=1))
    [('b', 0.6), ('c', 0.5)]
    >>> filter_negatives(q, ranked, 0.9, DenseMineConfig(relative_margin=0.1))   # keeps <= 0.81
    [('b', 0.6), ('c', 0.5)]
    """
    ceiling = None if positive_score is None or not cfg.relative_margin else (1 - cfg.relative_margin) * positive_score
    out, skipped = [], 0
    for docid, score in ranked:
        if len(out) >= cfg.negatives:
            break
        if is_gold(query, docid, text_of, cfg.answer_match):
            continue
        if skipped < cfg.skip_top:
            skipped += 1
            continue
        if ceiling is not None and score > ceiling:
            continue
        out.append((docid, score))
    return out


def positive_scores(queries: Sequence[Query], q_emb: np.ndarray, p_emb: np.ndarray, pid_index: dict[str, int]
                    ) -> list[float | None]:
    """Each question's best inner product with its judged positives (None without one in the corpus)."""
    out = []
    for q, vec in zip(queries, q_emb):
        rows = [pid_index[d] for d, g in q.relevant.items() if g > 0 and d in pid_index]
        out.append(float(np.max(p_emb[rows] @ vec)) if rows else None)
    return out


Ranking = list[tuple[str, float]]


def exact_search(p_emb: np.ndarray, ids: Sequence[str], q_emb: np.ndarray, k: int, block: int = 65536
                 ) -> list[Ranking]:
    """Exact inner-product top-k of each query row over `p_emb` (a memmap is read `block` rows at a time).

    >>> p = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    >>> exact_search(p, ["a", "b", "c"], np.array([[0, 1]], np.float32), 2)
    [[('b', 1.0), ('c', 0.800000011920929)]]
    """
    k = min(k, len(ids))
    best_s = np.full((len(q_emb), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q_emb), 0), np.int64)
    for start in range(0, len(ids), block):
        scores = q_emb @ np.asarray(p_emb[start:start + block], np.float32).T
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.arange(s.shape[1])[None].repeat(len(s), 0)
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    return [[(ids[j], float(x)) for j, x in zip(row_i.tolist(), row_s.tolist())] for row_i, row_s in zip(best_i, best_s)]


def mine_dense(queries: Sequence[Query], q_emb: np.ndarray, search: Callable[[np.ndarray, int], list[Ranking]],
               positive_score: Sequence[float | None], cfg: DenseMineConfig,
               text_of: Callable[[str], str] | None = None) -> Run:
    """Dense hard negatives of every question: its row of `search(q_emb, cfg.depth)` (one ranking
    of (docid, score) per embedding row, best first) filtered by `filter_negatives`."""
    if len(queries) != len(q_emb) or len(queries) != len(positive_score):
        raise ValueError(f"{len(queries)} queries but {len(q_emb)} embeddings and {len(positive_score)} scores")
    ranked = search(q_emb, cfg.depth)
    return {q.id: filter_negatives(q, ranked[i], positive_score[i], cfg, text_of) for i, q in enumerate(queries)}
