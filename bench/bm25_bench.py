"""BM25 mining: dprpipe's BM25Index against rank-bm25 and bm25s on the same tokens.

Inputs: a BEIR dataset folder (corpus and the test queries) and params.yaml's `mine` section.
Outputs (a dict, see `run`): tokenisation, index build time and peak memory, top-100
queries/s of each library (dprpipe and bm25s on 1 thread and on all cores; rank-bm25's
`BM25Okapi.get_scores` + argsort on a subset, it is ~10 ms a query), and the check that
dprpipe's top-100 equals rank-bm25's for every query up to exact score ties.
"""

from __future__ import annotations

import os

import numpy as np
from measure import section_config, timed, traced_peak

K = 100


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """rank-bm25's ranking as a user gets it: argsort of get_scores, ties by position."""
    return np.argsort(-scores, kind="stable")[:k]


def compare_rankings(ref_scores: np.ndarray, idx: np.ndarray, scores: np.ndarray, k: int) -> str:
    """'identical', 'ties' (same up to the order of exactly tied documents) or 'different'.

    Equal up to ties: the returned documents carry, in rank-bm25's own scores, the same score
    sequence as rank-bm25's top-k, and our scores agree with rank-bm25's (float64, ~1e-15).
    """
    ref = reference_topk(ref_scores, k)
    if np.array_equal(ref, idx) and np.allclose(scores, ref_scores[idx], rtol=1e-9, atol=1e-12):
        return "identical"
    same_scores = np.allclose(ref_scores[idx], scores, rtol=1e-9, atol=1e-12)
    same_sequence = np.allclose(ref_scores[idx], ref_scores[ref], rtol=1e-9, atol=1e-12)
    return "ties" if same_scores and same_sequence and len(set(idx.tolist())) == len(idx) else "different"


def run(data: str, quick: bool, repeats: int) -> dict:
    import bm25s
    from rank_bm25 import BM25Okapi

    from dprpipe.bm25 import BM25Index
    from dprpipe.prepare import read_dataset
    from dprpipe.mine import MineConfig, passage_text

    cfg = section_config(MineConfig, "mine")
    ds = read_dataset(data)
    split = "test" if "test" in ds.splits else next(iter(ds.splits))
    corpus = ds.corpus[:1000] if quick else ds.corpus
    queries = ds.splits[split][:40] if quick else ds.splits[split]
    analyzer = cfg.analyzer()
    texts = [passage_text(p, cfg.use_title) for p in corpus]
    t_tok, docs = timed(lambda: [analyzer(t) for t in texts], repeats)
    qtoks = [analyzer(q.text) for q in queries]
    n_tokens = sum(map(len, docs))

    builders = {
        "dprpipe": lambda: BM25Index(docs, cfg.bm25()),
        "rank-bm25": lambda: BM25Okapi(docs, k1=cfg.k1, b=cfg.b, epsilon=cfg.epsilon),
        "bm25s": lambda: _bm25s_index(bm25s, docs, cfg),
    }
    build, peak, index = {}, {}, {}
    for name, make in builders.items():
        build[name], index[name] = timed(make, repeats)
        _, peak[name] = traced_peak(make)

    ours, rb, bs = index["dprpipe"], index["rank-bm25"], index["bm25s"]
    cores = os.cpu_count() or 1
    search = {
        "dprpipe (1 thread)": timed(lambda: ours.search(qtoks, K, threads=1), repeats, warmup=1)[0],
        f"dprpipe ({cores} threads)": timed(lambda: ours.search(qtoks, K, threads=cores), repeats, warmup=1)[0],
        "bm25s (1 thread)": timed(lambda: bs.retrieve(qtoks, k=K, show_progress=False, n_threads=0),
                                  repeats, warmup=1)[0],
        f"bm25s ({cores} threads)": timed(lambda: bs.retrieve(qtoks, k=K, show_progress=False, n_threads=cores),
                                          repeats, warmup=1)[0],
    }
    if _has_numba():
        # bm25s's optional compiled backend; it is not a dependency of this project
        bs_numba = _bm25s_index(bm25s, docs, cfg, backend="numba")
        for n_threads, label in ((0, "1 thread"), (cores, f"{cores} threads")):
            search[f"bm25s numba ({label})"] = timed(
                lambda n_threads=n_threads: bs_numba.retrieve(qtoks, k=K, show_progress=False, n_threads=n_threads,
                                                             backend_selection="numba"), repeats, warmup=1)[0]
    n_rb = min(len(qtoks), 10 if quick else 50)
    search["rank-bm25 (1 thread)"] = timed(
        lambda: [reference_topk(rb.get_scores(q), K) for q in qtoks[:n_rb]], repeats)[0]
    qps = {name: (n_rb if name.startswith("rank-bm25") else len(qtoks)) / t.median for name, t in search.items()}

    # correctness on every query: ours vs rank-bm25's argsort, and bm25s's overlap for context
    idx, scores = ours.search(qtoks, K)
    verdicts = {"identical": 0, "ties": 0, "different": 0}
    bs_idx = bs.retrieve(qtoks, k=K, show_progress=False)[0]
    overlap = []
    for n, q in enumerate(qtoks):
        ref_scores = rb.get_scores(q)
        verdicts[compare_rankings(ref_scores, idx[n], scores[n], K)] += 1
        ref = reference_topk(ref_scores, K)
        overlap.append(len(set(ref.tolist()) & set(bs_idx[n].tolist())) / len(ref))

    base = qps["rank-bm25 (1 thread)"]
    return {
        "corpus": len(corpus), "queries": len(qtoks), "rank_bm25_queries": n_rb, "tokens": n_tokens, "k": K,
        "params": {"k1": cfg.k1, "b": cfg.b, "epsilon": cfg.epsilon, "stemmer": cfg.stemmer},
        "tokenise_s": t_tok.to_json(),
        "build_s": {k: v.to_json() for k, v in build.items()},
        "build_peak_mb": {k: v / 2**20 for k, v in peak.items()},
        "index_mb": {"dprpipe": ours.nbytes / 2**20},
        "search_s": {k: v.to_json() for k, v in search.items()},
        "qps": qps,
        "ratio_vs_rank_bm25": {k: v / base for k, v in qps.items()},
        "rankings_vs_rank_bm25": verdicts,
        "bm25s_overlap_at_100": float(np.mean(overlap)),
        "cores": cores,
        "bm25s_numba_installed": _has_numba(),
    }


def _bm25s_index(bm25s, docs, cfg, backend: str = "numpy"):
    # "robertson" is bm25s's Okapi variant (rank-bm25's formula without the epsilon idf floor)
    r = bm25s.BM25(k1=cfg.k1, b=cfg.b, method="robertson", backend=backend)
    r.index(docs, show_progress=False)
    return r


def _has_numba() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def summary(res: dict) -> list[list]:
    """Rows for the report: system, build s, build peak MB, q/s, x rank-bm25."""
    rows = []
    build = {"dprpipe": "dprpipe", "bm25s": "bm25s", "rank-bm25": "rank-bm25"}
    for name, q in res["qps"].items():
        lib = next(b for b in build if name.startswith(b))
        rows.append([name, res["build_s"][lib]["median_s"], res["build_peak_mb"][lib], q,
                     res["ratio_vs_rank_bm25"][name]])
    return rows
