"""Retrieval metrics over runs: nDCG@k, MRR@k, Recall@k and DPR's top-k answer accuracy.

Inputs: a run (qid -> [(docid, score)]), the evaluation split's queries (`data.Query`: graded
judgements and, for QA data, answer strings), for answer accuracy the passages' texts, and
for a corpus of split documents the piece map (`records.read_pieces`). Outputs: a flat
{metric: value} dict per run.

Scoring follows BEIR's `EvaluateRetrieval.evaluate`, with trec_eval (through pytrec_eval) as
the reference that tests/test_evaluate.py checks every metric against:

- Ranking: a query's hits are ranked by score descending, ties by document id descending
  (trec_eval's order; the order of lines in the run file does not matter). A document listed
  twice counts once, at its higher score.
- Identical ids: with `ignore_identical_ids` (BEIR's default) a hit whose document id equals
  the query id is dropped before ranking; it matters where queries are documents of the same
  corpus (ArguAna, Quora).
- Averaging: nDCG, MRR and Recall are averaged over the queries that have judgements (of any
  grade, as a qrels file names them) and appear in the run. A judged query missing from the
  run is left out of the average, not counted as 0; `missing_queries` lists such queries so
  the caller can warn. A query that is in the run with no hits left scores 0.
- Definitions: relevance means grade > 0; linear gain, DCG@k = sum over the top k of
  grade_i / log2(i + 1) and the ideal DCG from the judged grades (trec_eval's `ndcg_cut`);
  Recall@k = |relevant in top k| / |relevant| (`recall`); MRR@k = 1 / rank of the first relevant
  passage within the top k, else 0 (trec_eval's `recip_rank` on the run cut to depth k).
- Answer accuracy (DPR's top-k accuracy, QA data only): the share of questions with an answer
  string in one of the top k passages of the same ranking. It is averaged over all questions
  with answers, a question missing from the run counting as a miss, as DPR reports it.
- Split documents (`document_of`, from the piece map, with `fold_to_documents`): the judged
  metrics score documents. The run is folded first, each document at its best piece's score
  ("MaxP", Dai and Callan, SIGIR 2019; `fold_run`), and so are the judgements (`fold_judgements`:
  a document's grade is its best piece's, which gives back the dataset's own judgements, since
  prepare gives every piece its document's grade); ranking, identical ids and averaging then
  apply to documents, as BEIR scores them. Answer accuracy stays passage-level, as DPR
  reports it: it reads the passage ranking, where a piece of the query's own document counts
  as identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .io import Run
from .records import Passage, Query, owners
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


def rank(hits: Sequence[tuple[str, float]], qid: str | None = None) -> list[str]:
    """Document ids in trec_eval's order: score descending, then document id descending.

    With `qid`, a hit on the document of that id is dropped (BEIR's `ignore_identical_ids`).
    A document listed twice counts once, at its higher score.

    >>> rank([("d1", 1.0), ("d10", 1.0), ("x", 2.0), ("d2", 1.0), ("q", 5.0)], qid="q")
    ['x', 'd2', 'd10', 'd1']
    """
    best: dict[str, float] = {}
    for d, s in hits:
        if d != qid and (d not in best or s > best[d]):
            best[d] = s
    # Python orders str by code point, which is UTF-8 byte order: the order of trec_eval's strcmp
    return [d for d, _ in sorted(best.items(), key=lambda h: (h[1], h[0]), reverse=True)]


def ranked_run(run: Run, ignore_identical_ids: bool = True,
               document_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """qid -> document ids ranked as the metrics see them (see `rank`).

    With `document_of` (piece id -> document id) the run is of pieces and stays so; a piece of
    the document whose id is the query id is what the identical-id rule drops.
    """
    if document_of is None:
        return {qid: rank(hits, qid if ignore_identical_ids else None) for qid, hits in run.items()}
    return {qid: rank([(p, s) for p, s in hits if not (ignore_identical_ids and document_of.get(p, p) == qid)])
            for qid, hits in run.items()}


def fold_run(run: Run, document_of: Mapping[str, str]) -> Run:
    """Each query's hits as documents, each at its best piece's score (MaxP), best first.

    `document_of` maps piece ids to document ids; an id it does not name is a whole document
    and stays as it is. Equal scores are ordered by document id, descending (trec_eval's order).

    >>> fold_run({"q": [("a#0", 0.2), ("b", 0.5), ("a#1", 0.9)]}, {"a#0": "a", "a#1": "a"})
    {'q': [('a', 0.9), ('b', 0.5)]}
    """
    out: Run = {}
    for qid, hits in run.items():
        best: dict[str, float] = {}
        for pid, score in hits:
            doc = document_of.get(pid, pid)
            if doc not in best or score > best[doc]:
                best[doc] = score
        out[qid] = sorted(best.items(), key=lambda h: (h[1], h[0]), reverse=True)
    return out


def fold_judgements(queries: Sequence[Query], document_of: Mapping[str, str]) -> list[Query]:
    """The queries with judgements of pieces turned into judgements of documents (the best grade).

    >>> fold_judgements([Query("q", "t", (), {"a#0": 1, "a#1": 1, "b": 0})], {"a#0": "a", "a#1": "a"})[0].relevant
    {'a': 1, 'b': 0}
    """
    out = []
    for q in queries:
        rel: dict[str, int] = {}
        for pid, grade in q.relevant.items():
            doc = document_of.get(pid, pid)
            rel[doc] = max(grade, rel.get(doc, grade))
        out.append(Query(q.id, q.text, q.answers, rel))
    return out


def missing_queries(run: Run, queries: Sequence[Query]) -> list[str]:
    """Ids of judged queries that the run does not hold (left out of the averages)."""
    return [q.id for q in queries if q.relevant and q.id not in run]


def first_answer_rank(ranked: Sequence[str], answers: Sequence[str], text_of: Callable[[str], str],
                      match: str = "string") -> int | None:
    """Rank (0-based) of the first passage containing an answer, or None."""
    for i, d in enumerate(ranked):
        if has_answer(answers, text_of(d), match):
            return i
    return None


def evaluate_run(run: Run, queries: Sequence[Query], ks: Sequence[int] = DEFAULT_KS,
                 text_of: Callable[[str], str] | None = None, match: str = "string",
                 ignore_identical_ids: bool = True, document_of: Mapping[str, str] | None = None
                 ) -> dict[str, float]:
    """Average metrics of `run` over `queries` (the rules are in the module docstring).

    nDCG@10 and MRR@10 always; Recall@k for each k; with `text_of` and answers, also DPR's
    top-k accuracy ("accuracy@k"). "queries" is the number of queries the judged metrics
    average over (those with judgements that are in the run), or without judgements the
    number of questions with answers. With `document_of` (piece id -> document id) the judged
    metrics score the run and judgements folded to documents (MaxP).
    """
    passages = ranked = ranked_run(run, ignore_identical_ids)
    if document_of is not None:
        ranked = ranked_run(fold_run(run, document_of), ignore_identical_ids)
        passages = ranked_run(run, ignore_identical_ids, document_of)
        queries = fold_judgements(queries, document_of)
    has_judgements = [q for q in queries if q.relevant]
    judged = [q for q in has_judgements if q.id in ranked]
    answered = [q for q in queries if q.answers]
    out: dict[str, float] = {}
    if has_judgements:
        n = len(judged)

        def mean(metric: Callable[[Sequence[str], Mapping[str, int], int], float], k: int) -> float:
            return sum(metric(ranked[q.id], q.relevant, k) for q in judged) / n if n else 0.0

        out["ndcg@10"] = mean(ndcg_at_k, 10)
        out["mrr@10"] = mean(mrr_at_k, 10)
        for k in ks:
            out[f"recall@{k}"] = mean(recall_at_k, k)
    if answered and text_of is not None:
        depth = max(ks)
        firsts = [first_answer_rank(passages.get(q.id, [])[:depth], q.answers, text_of, match) for q in answered]
        for k in ks:
            out[f"accuracy@{k}"] = sum(1 for r in firsts if r is not None and r < k) / len(answered)
    out["queries"] = len(judged) if has_judgements else len(answered)
    return out


def recall_curve(run: Run, queries: Sequence[Query], ks: Sequence[int],
                 ignore_identical_ids: bool = True, document_of: Mapping[str, str] | None = None) -> list[float]:
    """Recall@k for each k (for the recall@k plot), averaged as `evaluate_run` does."""
    if document_of is not None:
        run, queries = fold_run(run, document_of), fold_judgements(queries, document_of)
    ranked = ranked_run(run, ignore_identical_ids)
    judged = [q for q in queries if q.relevant and q.id in ranked]
    if not judged:
        return [0.0 for _ in ks]
    return [sum(recall_at_k(ranked[q.id], q.relevant, k) for q in judged) / len(judged) for k in ks]


@dataclass(frozen=True)
class EvaluateConfig:
    ks: tuple[int, ...] = DEFAULT_KS
    curve_ks: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 30, 50, 100)
    answer_match: str = "string"
    hybrid_weight: float = 5.0      # hybrid score = bm25 + weight * dense
    hybrid_normalize: bool = True   # min-max normalise each run per query before fusing
    ignore_identical_ids: bool = True   # drop a hit whose document id is the query id (BEIR's default)
    fold_to_documents: bool = True      # with a piece map: score documents at their best piece (MaxP)


def evaluate_runs(runs: Mapping[str, Run], queries: Sequence[Query], corpus: Sequence[Passage],
                  cfg: EvaluateConfig, pieces: Mapping[str, Sequence[str]] | None = None
                  ) -> tuple[dict[str, dict[str, float]], dict[int, dict[str, float]]]:
    """Metrics per system and the recall@k curve {k: {system: recall}}.

    `pieces`: the piece map of a corpus of split documents; with `cfg.fold_to_documents` the
    judged metrics score documents (MaxP), answer accuracy still passages.
    """
    texts = {p.id: p.text for p in corpus}
    document_of = owners(pieces) if pieces and cfg.fold_to_documents else None
    metrics = {name: {k: round(v, 4) if isinstance(v, float) else v
                      for k, v in evaluate_run(r, queries, cfg.ks, texts.__getitem__, cfg.answer_match,
                                               cfg.ignore_identical_ids, document_of).items()}
               for name, r in runs.items()}
    curves = {name: recall_curve(r, queries, cfg.curve_ks, cfg.ignore_identical_ids, document_of)
              for name, r in runs.items()}
    return metrics, {k: {name: curves[name][i] for name in runs} for i, k in enumerate(cfg.curve_ks)}
