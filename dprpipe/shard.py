"""Sharded encoding and sharded FAISS indexes: pieces that reassemble into the single-process result.

Encoding: `shard_ranges` cuts the corpus into contiguous ranges whose boundaries fall on
multiples of the encode block size, so a shard encodes exactly the blocks (same length-sorted
batches, same padding) that one process would; `encode_shard` embeds one range from the corpus
file into its own `.npy` + `.ids` (written atomically, so a failed attempt leaves nothing and a
retry starts clean); `merge_shards` copies the shards in order through a memmap into one `.npy`
+ `.ids`, the layout `encode.encode_passages_to` writes. Where the shards run (Prefect tasks on
Dask) is the flows' business (flows/sharded_encode.py).

Indexes: `shard_indexes` builds one index per shard (or fills copies of one trained index);
`merge_indexes` joins them: flat indexes, and IVF indexes that share their training, are merged
into one index holding the vectors in shard order (faiss `merge_from`); any other set (HNSW
graphs, IVF indexes trained apart) becomes a faiss `IndexShards` that searches every shard and
keeps the best k. Ids are numbered shard after shard, so the concatenated shard ids are the map.

Inputs: the prepared corpus (`corpus.jsonl`), a `DualEncoder`, embeddings. Outputs: shard and
merged embedding files, FAISS indexes.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np

from .encode import encode_passages_to, load_embeddings
from .index import IndexConfig, build_index
from .io import DataError, atomic_memmap, atomic_write
from .model import DualEncoder
from .records import Passage, iter_corpus

ShardFiles = tuple[Path, Path]
"""A shard's (`.npy`, `.ids`) pair."""


# ---------------------------------------------------------------- encoding


def shard_ranges(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering `n` rows in at most `shards` non-empty pieces.

    Every boundary but the last is a multiple of `align` (the encode block size), and the
    blocks are shared out as evenly as possible, earlier shards taking the extra ones; with fewer
    blocks than shards there are fewer shards.

    >>> shard_ranges(10, 2), shard_ranges(10, 3, align=4), shard_ranges(5, 4, align=4)
    ([(0, 5), (5, 10)], [(0, 4), (4, 8), (8, 10)], [(0, 4), (4, 5)])
    """
    if shards < 1 or align < 1:
        raise ValueError(f"shards ({shards}) and align ({align}) must be >= 1")
    blocks = math.ceil(n / align)
    base, extra = divmod(blocks, shards)
    ranges, start = [], 0
    for i in range(min(shards, blocks)):
        end = min(n, start + (base + (i < extra)) * align)
        ranges.append((start, end))
        start = end
    return ranges


def shard_files(folder: str | os.PathLike, index: int, count: int) -> ShardFiles:
    """Where shard `index` of `count` is written: `shard-00001-of-00004.npy` / `.ids`."""
    stem = Path(folder) / f"shard-{index:05d}-of-{count:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".ids")


def read_corpus_range(path: str | os.PathLike, start: int, end: int) -> Iterator[Passage]:
    """Passages start..end-1 of a prepared corpus file, streamed (the others are skipped, not kept)."""
    yield from itertools.islice(iter_corpus(path), start, end)


def encode_shard(model: DualEncoder, corpus: str | os.PathLike, start: int, end: int, files: ShardFiles,
                 batch_size: int = 64, block_size: int = 16384) -> ShardFiles:
    """Embed passages start..end-1 of the corpus file into `files` (atomic, as `encode_passages_to`)."""
    npy, ids = files
    encode_passages_to(model, read_corpus_range(corpus, start, end), end - start, npy, ids, batch_size,
                       block_size)
    return npy, ids


def merge_shards(parts: Sequence[ShardFiles], npy_path: str | os.PathLike, ids_path: str | os.PathLike,
                 chunk_rows: int = 65536) -> int:
    """Concatenate shard embeddings and ids, in order, into `npy_path` / `ids_path`; returns the row count.

    Rows are copied through memmaps `chunk_rows` at a time, so memory stays at one chunk (plus one
    shard's ids). Both outputs are written under temporary names and renamed on success.
    """
    if not parts:
        raise ValueError("no shards to merge")
    npy_path, ids_path = Path(npy_path), Path(ids_path)
    shapes = []
    for npy, ids in parts:
        emb, _ = load_embeddings(npy, ids)  # checks rows == ids
        shapes.append(emb.shape)
    dims = {s[1] for s in shapes}
    if len(dims) != 1:
        raise DataError(parts[0][0], None, f"shards have different embedding sizes {sorted(dims)}; "
                        "they must come from one encoder")
    n = sum(s[0] for s in shapes)
    with atomic_memmap(npy_path, (n, dims.pop())) as out, atomic_write(ids_path) as f:
        row = 0
        for npy, ids in parts:
            emb, shard_ids = load_embeddings(npy, ids)
            for s in range(0, len(shard_ids), chunk_rows):
                out[row + s:row + min(s + chunk_rows, len(shard_ids))] = emb[s:s + chunk_rows]
            f.writelines(i + "\n" for i in shard_ids)
            row += len(shard_ids)
    return n


# ---------------------------------------------------------------- indexes


def trained_template(sample: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """An empty index of `cfg.kind`, trained (IVF-PQ) on `sample`: copies of it can be filled shard by
    shard and merged. Trained on the whole corpus (n <= cfg.train_size), it is what `build_index`
    trains; on a larger corpus give a sample and an explicit `cfg.nlist`."""
    index = build_index(sample, cfg)
    index.reset()
    return index


def shard_indexes(emb: np.ndarray, ranges: Sequence[tuple[int, int]], cfg: IndexConfig,
                  template: faiss.Index | None = None) -> list[faiss.Index]:
    """One index per range of `emb`: `build_index` on the range, or a copy of `template` holding it."""
    if template is None:
        return [build_index(emb[a:b], cfg) for a, b in ranges]
    out = []
    for a, b in ranges:
        index = faiss.clone_index(template)
        for s in range(a, b, 65536):
            index.add(np.ascontiguousarray(emb[s:min(s + 65536, b)], dtype=np.float32))
        out.append(index)
    return out


def _ivf_training(index: faiss.Index) -> list[np.ndarray] | None:
    """The trained parts of an IVF index (coarse centroids, PQ codebooks), or None if not IVF."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    parts = [ivf.quantizer.reconstruct_n(0, ivf.nlist)]
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    if pq is not None:
        parts.append(faiss.vector_to_array(pq.centroids))
    return parts


def mergeable(indexes: Sequence[faiss.Index]) -> bool:
    """True when `merge_from` concatenates them exactly: all flat, or all IVF with the same training."""
    if all(isinstance(faiss.downcast_index(i), faiss.IndexFlat) for i in indexes):
        return len({(i.d, i.metric_type) for i in indexes}) == 1
    trained = [_ivf_training(i) for i in indexes]
    if any(t is None for t in trained) or len({type(faiss.downcast_index(i)) for i in indexes}) != 1:
        return False
    return all(len(t) == len(trained[0]) and all(np.array_equal(a, b) for a, b in zip(t, trained[0]))
               for t in trained[1:])


def merge_indexes(indexes: Sequence[faiss.Index]) -> faiss.Index:
    """One index over the shards' vectors, numbered shard after shard (so the shards' ids concatenated
    are its id map). Mergeable shards are copied into one index; the others are searched together.

    Searches of a merged flat or IVF index equal those of the index built on all vectors at once;
    an `IndexShards` of exact (flat) shards does too, while for approximate shards (HNSW) it is as
    good as each shard's search. An `IndexShards` stays in memory (faiss does not write it): save
    the shards and rebuild it on load.
    """
    if not indexes:
        raise ValueError("no indexes to merge")
    if mergeable(indexes):
        merged = faiss.clone_index(indexes[0])
        ivf = faiss.try_extract_index_ivf(merged) is not None
        for other in indexes[1:]:
            # IVF stores ids: shift the other's by what is already in; flat ids are positions
            merged.merge_from(faiss.clone_index(other), merged.ntotal if ivf else 0)
        return merged
    together = faiss.IndexShards(indexes[0].d, False, True)  # not threaded; successive ids
    for index in indexes:
        together.add_shard(index)
    return together
