"""BM25 retrieval with exactly rank-bm25's `BM25Okapi` scores, vectorised with sparse matrices.

Scoring (Robertson/Okapi as rank-bm25 defines it, for the same tokens):
    idf(t)   = ln((N - df + 0.5) / (df + 0.5)); negative idfs become epsilon * mean idf
    score    = sum over query tokens (repeats count) of
               idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
The per-(term, document) weight is precomputed once (float64) into a term x document CSR
matrix, so a query's scores are a scatter-add of its terms' posting lists into a dense row:
the work is the postings the query touches, not the corpus size times the query length.

Search takes queries in blocks: each block's dense [block, n_docs] scores stay in the CPU's
cache, top-k is one partition per row, and blocks run on several threads (bincount's scatter
and the partition release the GIL, the per-query loop does not: a second core adds ~1.3x).
Scores stay float64, so rankings equal rank-bm25's (tests/test_bm25.py, bench/bm25_bench.py).

Inputs: tokenised documents and queries (see `text.Analyzer`). Outputs: top-k (index, score).
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

# Target size of one block of dense scores, about a core's L2 cache: on the 2-core EPYC blocks
# of 16-64 SciFact queries (0.7-2.7 MB) ran equally fast, 8 or fewer slower (per-call overhead).
_BLOCK_BYTES = 1 << 20


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
        term_id = vocab.setdefault
        # typed arrays, not lists: a list holds a 36-byte int object per posting
        indptr, indices, data = array("q", [0]), array("q"), array("q")
        for tokens in docs:
            counts = Counter(tokens)  # counted in C; Python work is per distinct term, not per token
            indices.extend([term_id(t, len(vocab)) for t in counts])
            data.extend(counts.values())
            indptr.append(len(indices))
        n_docs = len(indptr) - 1
        if n_docs == 0:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        tf = sp.csr_matrix((np.frombuffer(data, np.int64).astype(np.float64),
                            np.frombuffer(indices, np.int64).astype(np.intp, copy=False),
                            np.frombuffer(indptr, np.int64).astype(np.intp, copy=False)),
                           shape=(n_docs, len(vocab)))
        del indices, data, indptr
        self.vocab = vocab
        self.n_docs = n_docs
        dl = np.asarray(tf.sum(axis=1)).ravel()
        self.avgdl = dl.sum() / n_docs
        # term x document, posting lists contiguous; intp indices so bincount needs no conversion
        w = tf.T.tocsr()
        del tf
        w = sp.csr_matrix((w.data, w.indices.astype(np.intp, copy=False), w.indptr.astype(np.intp, copy=False)),
                          shape=w.shape)
        df = np.diff(w.indptr).astype(np.float64)
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        # rank-bm25 floors negative idfs (terms in more than half the documents) at eps * mean idf
        idf[idf < 0] = params.epsilon * idf.mean() if len(idf) else 0.0
        self.idf = idf
        k1, b = params.k1, params.b
        norm = k1 * (1 - b + b * dl / self.avgdl)  # per document
        term = np.repeat(np.arange(len(vocab)), np.diff(w.indptr))
        w.data = idf[term] * w.data * (k1 + 1) / (w.data + norm[w.indices])
        self._weights = w

    @property
    def nbytes(self) -> int:
        """Bytes held by the weight matrix (the index proper, without the vocabulary dict)."""
        w = self._weights
        return w.data.nbytes + w.indices.nbytes + w.indptr.nbytes + self.idf.nbytes

    def query_matrix(self, queries: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Queries as term counts over the index vocabulary; unknown terms are dropped."""
        indptr, indices = [0], []
        for tokens in queries:
            indices.extend(self.vocab[t] for t in tokens if t in self.vocab)
            indptr.append(len(indices))
        data = np.ones(len(indices), np.float64)
        m = sp.csr_matrix((data, np.asarray(indices, np.intp), np.asarray(indptr, np.intp)),
                          shape=(len(queries), len(self.vocab)))
        m.sum_duplicates()  # a repeated query token counts once per repeat, as in rank-bm25
        return m

    def scores(self, q: sp.csr_matrix) -> np.ndarray:
        """Dense float64 scores [rows of q, n_docs] of a `query_matrix` block."""
        n = self.n_docs
        if q.nnz == 0:
            return np.zeros((q.shape[0], n))
        out = np.empty((q.shape[0], n))
        post = self._weights[q.indices]  # the block's posting lists, one row per query term
        docs, weights = post.indices, post.data
        if np.any(q.data != 1):
            weights = weights * np.repeat(q.data, np.diff(post.indptr))
        bounds = post.indptr[q.indptr].tolist()  # where each query's postings start and end
        for r in range(q.shape[0]):
            a, e = bounds[r], bounds[r + 1]
            if a == e:
                out[r] = 0.0
            else:
                # bincount is a C scatter-add over this query's postings (a document repeats once
                # per query term), far cheaper than a sparse product densified afterwards
                out[r] = np.bincount(docs[a:e], weights=weights[a:e], minlength=n)
        return out

    def get_scores(self, tokens: Sequence[str]) -> np.ndarray:
        """All document scores for one query (float64), as `BM25Okapi.get_scores`."""
        return self.scores(self.query_matrix([tokens]))[0]

    def search(self, queries: Sequence[Sequence[str]], k: int, batch_size: int | None = None,
               progress: bool = False, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k per query: (indices [nq, k], scores [nq, k]), best first, ties by position.

        `batch_size` queries are scored at once (default: a block of about 1 MB of scores);
        `threads` blocks run in parallel (default: one per CPU). Results do not depend on either.
        """
        k = max(0, min(k, self.n_docs))
        if batch_size is None:
            batch_size = max(1, min(1024, _BLOCK_BYTES // (8 * self.n_docs)))
        if threads is None:
            threads = os.cpu_count() or 1
        q = self.query_matrix(queries)
        top_i = np.empty((len(queries), k), np.int64)
        top_s = np.empty((len(queries), k), np.float64)
        starts = range(0, len(queries), batch_size)

        def block(start: int) -> int:
            sl = slice(start, start + batch_size)
            top_i[sl], top_s[sl] = topk(self.scores(q[sl]), k)
            return sl.stop - start

        with tqdm(total=len(queries), desc="bm25 search", unit="q", disable=not progress) as bar:
            if threads > 1 and len(starts) > 1:
                with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                    for done in pool.map(block, starts):
                        bar.update(done)
            else:
                for start in starts:
                    bar.update(block(start))
        return top_i, top_s


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a score matrix, best first; equal scores keep position order.

    >>> topk(np.array([[1.0, 3.0, 3.0, 2.0]]), 2)[0].tolist()
    [[1, 2]]
    """
    scores = np.ascontiguousarray(scores)
    rows_n, n = scores.shape
    k = max(0, min(k, n))
    if k == 0 or rows_n == 0:
        return np.empty((rows_n, k), np.int64), np.empty((rows_n, k), scores.dtype)
    if k < n:
        # the k-th best value of each row (a partition, no index bookkeeping); every entry at
        # least as good is a candidate, so ties at the cut are all kept and decided by position
        kth = np.partition(scores, n - k, axis=1)[:, n - k]
        flat = np.flatnonzero(scores >= kth[:, None])  # 1-d: several times faster than np.nonzero
    else:
        flat = np.arange(rows_n * n)
    rows, cols = np.divmod(flat, n)
    vals = scores.ravel()[flat]
    # rows ascending, then score descending; lexsort is stable and the candidates are in
    # ascending position, so equal scores stay in position order
    order = np.lexsort((-vals, rows))
    counts = np.bincount(rows, minlength=rows_n)
    first = np.cumsum(counts) - counts
    sel = order[first[:, None] + np.arange(k)]
    return cols[sel].astype(np.int64, copy=False), vals[sel]
