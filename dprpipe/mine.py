"""Mine BM25 hard negatives (DPR's `hard_negative_ctxs`) and BM25 runs.

A hard negative of a question is a top-`depth` BM25 passage that is not gold: not judged
relevant (grade > 0), and, where the question has answers, not containing any answer under
DPR's `has_answer`. The paper takes them from the top BM25 results (its maintainers: top 30-50).

Inputs: the prepared corpus and queries. Outputs: {qid: [(docid, score), ...]} negatives and
BM25 runs, which the stage writes as JSONL and TSV.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .bm25 import BM25Index, BM25Params
from .io import Run
from .records import Passage, Query
from .text import Analyzer, has_answer


@dataclass(frozen=True)
class MineConfig:
    k1: float = 0.9
    b: float = 0.4
    epsilon: float = 0.25
    stemmer: str = "porter"
    stopwords: bool = True
    use_title: bool = True
    depth: int = 100            # how deep in the BM25 ranking to look for negatives
    negatives: int = 30         # negatives kept per question (training samples from them)
    run_depth: int = 1000       # depth of the BM25 run written for evaluation
    answer_match: str = "string"

    def analyzer(self) -> Analyzer:
        return Analyzer(stopwords=self.stopwords, stemmer=self.stemmer)

    def bm25(self) -> BM25Params:
        return BM25Params(k1=self.k1, b=self.b, epsilon=self.epsilon)


def is_gold(query: Query, docid: str, text_of: Callable[[str], str] | None, match: str) -> bool:
    """Never a negative of `query`: judged relevant (grade > 0) or, where the query has answers,
    containing one under DPR's `has_answer` (in the passage text only, not the title, as DPR does).

    >>> q = Query("q", "who", answers=("Paris",), relevant={"p": 1, "n": 0})
    >>> [is_gold(q, d, {"p": "", "n": "no", "x": "in Paris"}.get, "string") for d in ("p", "n", "x")]
    [True, False, True]
    """
    if query.relevant.get(docid, 0) > 0:
        return True
    return bool(query.answers) and text_of is not None and has_answer(query.answers, text_of(docid), match)


def passage_text(p: Passage, use_title: bool) -> str:
    return f"{p.title} {p.text}" if use_title and p.title else p.text


class Miner:
    """BM25 over a corpus, with its analyzer: build once, then run and mine any query set."""

    def __init__(self, corpus: Sequence[Passage], cfg: MineConfig, progress: bool = False):
        from tqdm.auto import tqdm

        self.cfg = cfg
        self.corpus = corpus
        self.analyzer = cfg.analyzer()
        docs = (self.analyzer(passage_text(p, cfg.use_title))
                for p in tqdm(corpus, desc="bm25 index", unit="psg", disable=not progress))
        self.index = BM25Index(docs, cfg.bm25())
        self.progress = progress
        self._id_list: list[str] | None = None

    def run(self, queries: Sequence[Query], depth: int) -> Run:
        """BM25 ranking of each query: qid -> [(docid, score)] best first."""
        idx, scores = self.index.search([self.analyzer(q.text) for q in queries], depth, progress=self.progress)
        ids = self._ids()
        # tolist() turns a row into Python ints and floats at once: ~10x faster than per-element
        return {q.id: [(ids[i], s) for i, s in zip(idx[n].tolist(), scores[n].tolist()) if s > 0]
                for n, q in enumerate(queries)}

    def _ids(self) -> list[str]:
        if self._id_list is None:
            self._id_list = [p.id for p in self.corpus]
        return self._id_list

    def negatives(self, queries: Sequence[Query]) -> Run:
        """Hard negatives per query: top BM25 passages that are not gold, best first."""
        cfg = self.cfg
        text_of = {p.id: p.text for p in self.corpus} if any(q.answers for q in queries) else {}
        out: Run = {}
        run = self.run(queries, cfg.depth)
        for q in queries:
            negs = []
            for docid, score in run[q.id]:
                if len(negs) >= cfg.negatives:
                    break
                if not is_gold(q, docid, text_of.__getitem__, cfg.answer_match):
                    negs.append((docid, score))
            out[q.id] = negs
        return out
