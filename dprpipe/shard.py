"""Sharded encoding: the corpus embedded in pieces that reassemble into the single-process result.

`shard_ranges` cuts the corpus into contiguous ranges whose boundaries fall on multiples of the
encode block size, so a shard encodes exactly the blocks (same length-sorted batches, same
padding) that one process would; `encode_shard` embeds one range from the corpus file into its
own `.npy` + `.ids` (written atomically, so a failed attempt leaves nothing and a retry starts
clean); `merge_shards` copies the shards in order through a memmap into one `.npy` + `.ids`, the
layout `encode.encode_passages_to` writes.

`encode_sharded` runs the whole: it hands each shard to a `submit` function (a Dask client's
`submit`, from `dask_submit`, for the encode stage; a Prefect task's `submit` for the optional
flow in flows/sharded_encode.py, which adds per-shard retries), waits for every shard and merges.
`encode_shard_file` is the shard's work as a worker runs it: load the encoder, encode, return
the two paths.

Inputs: the prepared corpus (`corpus.jsonl`), an encoder (a checkpoint folder, or a base model
with its `EncoderConfig` fields). Outputs: shard and merged embedding files.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .encode import encode_passages_to, load_embeddings
from .io import DataError, atomic_memmap, atomic_write
from .model import DualEncoder, EncoderConfig, device
from .records import Passage, iter_corpus

ShardFiles = tuple[Path, Path]
"""A shard's (`.npy`, `.ids`) pair."""


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


# ---------------------------------------------------------------- running the shards


def encode_shard_file(model: str, encoder: dict | None, corpus: str, start: int, end: int, index: int, count: int,
                      folder: str, batch_size: int, block_size: int) -> list[str]:
    """Encode passages start..end-1 of `corpus` into shard `index` of `count` in `folder`; its two paths.

    Runs where the shard is sent (a Dask worker): it loads the encoder there (CUDA if the worker
    has it). `encoder`: EncoderConfig fields for a base model (a checkpoint has its own).
    """
    enc = EncoderConfig(**encoder) if encoder else None
    model_, _ = DualEncoder.load(model, enc)
    model_.to(device())
    npy, ids = encode_shard(model_, corpus, start, end, shard_files(folder, index, count), batch_size, block_size)
    return [str(npy), str(ids)]


def encode_sharded(submit: Callable[..., Any], model: str, encoder: dict | None, corpus: str | os.PathLike,
                   npy: str | os.PathLike, ids: str | os.PathLike, shards: int, batch_size: int = 64,
                   block_size: int = 16384, passages: int | None = None) -> dict:
    """Encode the passages of `corpus` in `shards` pieces and merge them into `npy` and `ids`.

    `submit(*args)` starts `encode_shard_file(*args)` for one shard wherever it runs and returns a
    future (`.result()`). `passages` is the corpus size, if known (else the file is counted).
    Paths are made absolute: the workers may run in another folder. The shard files live in a
    hidden folder next to `npy`, removed after the merge or the failure (once every shard has
    finished). Returns {"passages", "shards", "ranges"}.
    """
    corpus, npy = Path(corpus).resolve(), Path(npy).resolve()
    n = passages if passages is not None else sum(1 for _ in iter_corpus(corpus))
    ranges = shard_ranges(n, shards, align=block_size)
    folder = npy.with_name(f".{npy.name}.shards")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        futures = [submit(model, encoder, str(corpus), a, b, i, len(ranges), str(folder), batch_size, block_size)
                   for i, (a, b) in enumerate(ranges)]
        parts, error = [], None
        for future in futures:   # every shard done before the folder can go
            try:
                parts.append(future.result())
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
        rows = merge_shards([(Path(a), Path(b)) for a, b in parts], npy, ids)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"passages": rows, "shards": len(ranges), "ranges": [list(r) for r in ranges]}


@contextlib.contextmanager
def dask_submit(address: str = "", n_workers: int = 1) -> Iterator[Callable[..., Any]]:
    """A `submit` for `encode_sharded`: shards run on the Dask scheduler at `address`, or (empty) on
    a temporary local cluster of `n_workers` processes.

    The local cluster listens on 127.0.0.1 only, without a dashboard, and runs one task per
    worker process; Dask sets OMP_NUM_THREADS=1 in its workers, so n_workers = cores keeps every
    core busy without oversubscription.
    """
    from dask.distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if address:
            client = stack.enter_context(Client(address))
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                                       host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        yield functools.partial(client.submit, encode_shard_file, pure=False)
