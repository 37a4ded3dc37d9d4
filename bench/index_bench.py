"""Index and search: FAISS exact (flat IP), HNSW and IVF-PQ, built through `dprpipe.index`.

Inputs: SciFact-size embeddings (the pipeline's own `data/embeddings/dpr` passages and
queries when they exist, else synthetic ones of the same size) and params.yaml's `index`
section (HNSW M / efConstruction / efSearch, IVF-PQ nprobe); a synthetic corpus of 1M x 384
float32 unit vectors (clustered, so approximate search behaves as on real embeddings).
Outputs (a dict, see `run`): per index kind, build seconds, memory (the serialised index:
FAISS keeps the same arrays in memory) and bytes per passage, queries/s at k=10 and
recall@10 against exact search; at 1M, HNSW is built on a 100k subset and extrapolated, and
every kind's memory and time is extrapolated to DPR's 21M-passage Wikipedia.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from measure import ROOT, native_stderr_silenced, section_config, timed

K = 10
WIKI = 21_000_000


def synthetic(n: int, dim: int, seed: int, clusters: int = 1024, rank: int = 64, chunk: int = 131072) -> np.ndarray:
    """n unit vectors shaped like text embeddings, float32.

    Real embeddings are clustered and concentrated in a few dozen directions; uniform random
    vectors are neither (every point is nearly equidistant), which no approximate index
    handles. So: a cluster centre, plus a draw from a shared `rank`-dimensional subspace, plus
    small isotropic noise. The centres and the subspace are fixed (seed 0), so corpora and
    queries drawn with different `seed`s come from the same distribution.
    """
    shape = np.random.default_rng(0)
    centres = shape.standard_normal((clusters, dim), dtype=np.float32)
    basis = shape.standard_normal((rank, dim), dtype=np.float32) / np.float32(np.sqrt(rank))
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)]
        x += rng.standard_normal((m, rank), dtype=np.float32) @ basis
        x += np.float32(0.3) * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top-k found by the approximate index."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


def measure(emb: np.ndarray, queries: np.ndarray, cfg, truth: np.ndarray | None, repeats: int,
            build_repeats: int | None = None) -> tuple[dict, np.ndarray]:
    """Build `cfg` over emb, search queries; returns figures and the found ids."""
    from dprpipe.index import build_index

    with native_stderr_silenced():
        t_build, index = timed(lambda: build_index(emb, cfg), build_repeats or repeats)
    t_search, (_, found) = timed(lambda: index.search(queries, K), repeats, warmup=1)
    size = index_bytes(index)
    res = {"kind": cfg.kind, "n": len(emb), "build_s": t_build.to_json(), "search_s": t_search.to_json(),
           "qps": len(queries) / t_search.median, "memory_mb": size / 2**20, "bytes_per_passage": size / len(emb),
           "recall_at_10": 1.0 if truth is None else recall_at_k(found, truth)}
    if cfg.kind == "hnsw":
        res.update(M=cfg.hnsw_m, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search)
    if cfg.kind == "ivfpq":
        res.update(nlist=index.nlist, pq_m=index.pq.M, nprobe=cfg.nprobe, train_size=min(len(emb), cfg.train_size))
    return res, found


def scifact_embeddings(quick: bool) -> tuple[np.ndarray, np.ndarray, str]:
    folder = ROOT / "data" / "embeddings" / "dpr"
    if (folder / "passages.npy").is_file() and (folder / "queries.npy").is_file() and not quick:
        return (np.ascontiguousarray(np.load(folder / "passages.npy"), dtype=np.float32),
                np.ascontiguousarray(np.load(folder / "queries.npy"), dtype=np.float32),
                "data/embeddings/dpr (real SciFact embeddings of the fine-tuned model)")
    emb = synthetic(1000 if quick else 5183, 384, seed=1)
    q = synthetic(100 if quick else 300, 384, seed=2)
    return emb, q, "synthetic (SciFact-size)"


def run(data: str, quick: bool, repeats: int) -> dict:
    from dprpipe.index import IndexConfig

    base = section_config(IndexConfig, "index")
    out: dict = {"k": K}

    # ---- SciFact size: the three kinds with the project's settings
    emb, queries, source = scifact_embeddings(quick)
    out["small"] = {"source": source, "n": len(emb), "queries": len(queries), "dim": emb.shape[1], "kinds": {}}
    flat, truth = measure(emb, queries, replace(base, kind="flat"), None, repeats)
    out["small"]["kinds"]["flat"] = flat
    for kind in ("hnsw", "ivfpq"):
        out["small"]["kinds"][kind] = measure(emb, queries, replace(base, kind=kind), truth, repeats)[0]

    # ---- 1M synthetic (a 20k stand-in for --quick): builds timed once, searches median of repeats
    n = 20_000 if quick else 1_000_000
    n_hnsw = 5_000 if quick else 100_000
    dim = 384
    emb = synthetic(n, dim, seed=3)
    queries = synthetic(50 if quick else 200, dim, seed=4)
    big: dict = {"n": n, "queries": len(queries), "dim": dim, "kinds": {}}
    flat, truth = measure(emb, queries, replace(base, kind="flat"), None, repeats, build_repeats=1)
    big["kinds"]["flat"] = flat
    # nlist 1024 rather than 4*sqrt(n) = 4000: k-means for 4000 lists takes minutes on 2 cores;
    # 50k training vectors are ~49 per list (FAISS wants >= 39)
    ivf_cfg = replace(base, kind="ivfpq", nlist=min(1024, max(1, n // 49)), train_size=50_000)
    big["kinds"]["ivfpq"] = measure(emb, queries, ivf_cfg, truth, repeats, build_repeats=1)[0]
    # HNSW on a subset (a 1M build takes longer than the whole benchmark budget on 2 cores)
    sub = emb[:n_hnsw]
    sub_truth = measure(sub, queries, replace(base, kind="flat"), None, 1, build_repeats=1)[1]
    hnsw_cfg = replace(base, kind="hnsw", hnsw_m=16, ef_construction=100)
    hnsw = measure(sub, queries, hnsw_cfg, sub_truth, repeats, build_repeats=1)[0]
    # HNSW insertion costs ~log(n) graph hops each: scale n * log(n)
    scale = n * math.log(n) / (n_hnsw * math.log(n_hnsw))
    hnsw["extrapolated_build_s_at_n"] = hnsw["build_s"]["median_s"] * scale
    big["kinds"]["hnsw"] = hnsw
    big["hnsw_subset"] = n_hnsw
    out["big"] = big

    # ---- 21M passages (DPR's Wikipedia): memory scales with n; search of flat/IVF-PQ linearly
    wiki = {}
    for kind, r in big["kinds"].items():
        wiki[kind] = {"memory_gb": r["bytes_per_passage"] * WIKI / 2**30}
    wiki["flat"]["qps"] = big["kinds"]["flat"]["qps"] * n / WIKI
    wiki["flat"]["build_s"] = big["kinds"]["flat"]["build_s"]["median_s"] * WIKI / n
    wiki["ivfpq"]["add_s"] = big["kinds"]["ivfpq"]["build_s"]["median_s"] * WIKI / n
    wiki["hnsw"]["build_s"] = hnsw["build_s"]["median_s"] * WIKI * math.log(WIKI) / (n_hnsw * math.log(n_hnsw))
    out["wiki_21m"] = wiki
    return out
