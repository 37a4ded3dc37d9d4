"""FAISS inner-product index over passage embeddings, with the id map.

Kinds: `flat` (exact, the default), `hnsw` (graph; `hnsw_m`, `ef_construction`, `ef_search`)
and `ivfpq` (inverted lists + product quantisation; `nlist`, `pq_m`, `pq_bits`, `nprobe`).
Inputs: float32 embeddings [n, dim] and their ids. Outputs: a folder with `index.faiss`,
`ids.txt` and `index.json` (the config), written atomically; `search` returns ids and scores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .io import DataError, atomic_dir, read_ids, write_checksums, write_ids


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "flat"           # flat | hnsw | ivfpq
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0               # IVF lists; 0 = about 4 * sqrt(n)
    pq_m: int = 0                # PQ sub-quantisers; 0 = dim / 8 (must divide dim)
    pq_bits: int = 8
    nprobe: int = 16
    train_size: int = 100_000    # vectors sampled to train IVF-PQ
    seed: int = 13

    def __post_init__(self):
        if self.kind not in ("flat", "hnsw", "ivfpq"):
            raise ValueError(f"unknown index kind {self.kind!r}; expected 'flat', 'hnsw' or 'ivfpq'")


def build_index(emb: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """Build an inner-product index over `emb` (float32 [n, dim]), adding in chunks."""
    n, dim = emb.shape
    if n == 0:
        raise ValueError("cannot index zero passages")
    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 points per list
        pq_m = cfg.pq_m or max(1, dim // 8)
        if dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the embedding size {dim}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        index.train(np.ascontiguousarray(emb[sample], dtype=np.float32))
        index.nprobe = cfg.nprobe
    for start in range(0, n, 65536):
        index.add(np.ascontiguousarray(emb[start:start + 65536], dtype=np.float32))
    return index


def save_index(path: str | os.PathLike, index: faiss.Index, ids: Sequence[str], cfg: IndexConfig) -> None:
    if index.ntotal != len(ids):
        raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids were given")
    with atomic_dir(path) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        write_ids(tmp / "ids.txt", ids)
        (tmp / "index.json").write_text(json.dumps({**asdict(cfg), "ntotal": index.ntotal, "dim": index.d}, indent=2))
        write_checksums(tmp)


class Searcher:
    """A loaded index and its id map; `search` gives ids and scores, best first."""

    def __init__(self, index: faiss.Index, ids: Sequence[str]):
        self.index, self.ids = index, list(ids)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Searcher:
        """Load an index folder written by `save_index`.

        A missing, truncated or corrupted file (against the folder's checksums.sha256, when it
        has one), an index that disagrees with its ids or its index.json, is a DataError naming
        the folder: never a crash inside FAISS or a search over the wrong vectors.
        """
        from .io import verify_checksums

        path = Path(path)
        fix = "rerun the index stage"
        verify_checksums(path, fix)
        try:
            meta = json.loads((path / "index.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("index.json is not a JSON object")
            if not (path / "index.faiss").is_file():  # faiss would crash on some missing-file paths
                raise OSError("index.faiss not found")
            index = faiss.read_index(str(path / "index.faiss"))
        except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
            raise DataError(path, None, f"cannot read the FAISS index ({' '.join(str(e).split())[:300]}); "
                            f"{fix}") from None
        ids = read_ids(path / "ids.txt")
        if index.ntotal != len(ids) or meta.get("ntotal") != len(ids):
            raise DataError(path, None, f"index has {index.ntotal} vectors but ids.txt has {len(ids)}; {fix}")
        if "dim" in meta and meta["dim"] != index.d:
            raise DataError(path, None, f"index has {index.d}-dimensional vectors, index.json says "
                            f"{meta['dim']}; {fix}")
        try:
            if meta.get("kind") == "hnsw":
                faiss.downcast_index(index).hnsw.efSearch = int(meta["ef_search"])
            elif meta.get("kind") == "ivfpq":
                faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise DataError(path, None, f"index.json does not match index.faiss ({type(e).__name__}: {e}); "
                            f"{fix}") from None
        return cls(index, ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        k = min(k, len(self.ids))
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[self.ids[i] for i in row if i >= 0] for row in idx], scores

    def run(self, qids: Sequence[str], queries: np.ndarray, k: int) -> dict[str, list[tuple[str, float]]]:
        hits, scores = self.search(queries, k)
        return {q: list(zip(h, map(float, s))) for q, h, s in zip(qids, hits, scores)}
