"""BM25 retrieval with exactly rank-bm25's `BM25Okapi` scores, vectorised with sparse matrices.

Scoring (Robertson/Okapi as rank-bm25 defines it, for the same tokens):
    idf(t)   = ln((N - df + 0.5) / (df + 0.5)); negative idfs become epsilon * mean idf
    score    = sum over query tokens (repeats count) of
               idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
The per-(term, document) weight is precomputed once into a sparse term x document matrix, so
scoring a batch of queries is one sparse-dense product instead of a Python loop per document.

Inputs: tokenised documents and queries (see `text.Analyzer`). Outputs: top-k (index, score).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm


@dataclass(frozen=True)
class BM25Params:
    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25

    def __post_init__(self):
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")


class BM25Index:
    """A BM25 index over tokenised documents; `search` returns top-k document positions."""

    def __init__(self, docs: Iterable[Sequence[str]], params: BM25Params = BM25Params()):
        self.params = params
        vocab: dict[str, int] = {}
        indptr, indices, data = [0], [], []
        for tokens in docs:
            counts: dict[int, int] = {}
            for t in tokens:
                j = vocab.setdefault(t, len(vocab))
                counts[j] = counts.get(j, 0) + 1
            indices.extend(counts)
            data.extend(counts.values())
            indptr.append(len(indices))
        n_docs = len(indptr) - 1
        if n_docs == 0:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        tf = sp.csr_matrix((np.asarray(data, np.float64), np.asarray(indices, np.int64), np.asarray(indptr)),
                           shape=(n_docs, len(vocab)))
        self.vocab = vocab
        self.n_docs = n_docs
        dl = np.asarray(tf.sum(axis=1)).ravel()
        self.avgdl = dl.sum() / n_docs
        df = np.bincount(tf.indices, minlength=len(vocab)).astype(np.float64)
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        # rank-bm25 floors negative idfs (terms in more than half the documents) at eps * mean idf
        idf[idf < 0] = params.epsilon * idf.mean() if len(idf) else 0.0
        self.idf = idf
        k1, b = params.k1, params.b
        norm = k1 * (1 - b + b * dl / self.avgdl)  # per document
        w = tf.copy()
        rows = np.repeat(np.arange(n_docs), np.diff(tf.indptr))
        w.data = idf[tf.indices] * tf.data * (k1 + 1) / (tf.data + norm[rows])
        self._weights = w.T.tocsr()  # term x document: a query row times this is its scores

    def query_matrix(self, queries: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Queries as term counts over the index vocabulary; unknown terms are dropped."""
        indptr, indices = [0], []
        for tokens in queries:
            indices.extend(self.vocab[t] for t in tokens if t in self.vocab)
            indptr.append(len(indices))
        data = np.ones(len(indices), np.float64)
        m = sp.csr_matrix((data, np.asarray(indices, np.int64), np.asarray(indptr)),
                          shape=(len(queries), len(self.vocab)))
        m.sum_duplicates()  # a repeated query token counts once per repeat, as in rank-bm25
        return m

    def get_scores(self, tokens: Sequence[str]) -> np.ndarray:
        """All document scores for one query (float64), as `BM25Okapi.get_scores`."""
        return np.asarray((self.query_matrix([tokens]) @ self._weights).todense()).ravel()

    def search(self, queries: Sequence[Sequence[str]], k: int, batch_size: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (indices [nq, k], scores [nq, k]), best first, ties by position.

        Queries are scored in batches sized so a dense score block stays near 256 MB.
        """
        k = min(k, self.n_docs)
        if batch_size is None:
            batch_size = max(1, min(4096, (256 << 20) // (8 * self.n_docs)))
        q = self.query_matrix(queries)
        top_i = np.empty((len(queries), k), np.int64)
        top_s = np.empty((len(queries), k), np.float64)
        for start in tqdm(range(0, len(queries), batch_size), desc="bm25 search", unit="batch",
                          disable=not progress):
            scores = (q[start:start + batch_size] @ self._weights).toarray()
            top_i[start:start + batch_size], top_s[start:start + batch_size] = topk(scores, k)
        return top_i, top_s


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a score matrix, best first; equal scores keep position order.

    >>> topk(np.array([[1.0, 3.0, 3.0, 2.0]]), 2)[0].tolist()
    [[1, 2]]
    """
    n = scores.shape[1]
    k = min(k, n)
    if k < n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        # argpartition keeps an arbitrary subset of the scores tied with the k-th best; where the
        # cut falls inside a tie, take the tied positions in order instead
        kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
        for r in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
            cand = np.flatnonzero(scores[r] >= kth[r])
            part[r] = cand[np.lexsort((cand, -scores[r, cand]))[:k]]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape)
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score descending, then by position ascending for deterministic ties
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(scores, idx, axis=1)
