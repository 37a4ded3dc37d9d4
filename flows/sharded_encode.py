"""The sharded-encode flow: embed one corpus in shards, each a Prefect task on a Dask cluster.

`prefect_dask.DaskTaskRunner` runs the shards on a temporary local cluster or on the scheduler
at an address; the shards are then merged into the `.npy` + `.ids` a single process writes. A
shard that fails is retried alone (task retries); the others keep their results. The encode
stage calls it (through `run_sharded_encode`) when `encode.shards` > 1, which is why it lives
apart from the scheduled `encoding` flow: the encode stages depend on this file only. Workers
read the corpus and write their shard where the paths say, so on a real cluster the paths must
be on storage every worker sees.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

# dprpipe (torch, faiss) is imported inside the tasks: the deployment server that imports the
# flows needs none of it

SHARD_RETRIES = 2


def dask_runner(address: str = "", n_workers: int | None = None) -> DaskTaskRunner:
    """The scheduler at `address`, or (empty) a temporary local cluster of `n_workers` processes.

    The local cluster listens on 127.0.0.1 only and runs one task per worker process; Dask sets
    OMP_NUM_THREADS=1 in its workers, so n_workers = cores keeps every core busy without oversubscription.
    """
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers or os.cpu_count() or 1, "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


@task(name="encode-shard", task_run_name="encode shard {index} of {count}", retries=SHARD_RETRIES,
      retry_delay_seconds=2, cache_policy=NO_CACHE)
def encode_shard(model: str, encoder: dict | None, corpus: str, start: int, end: int, index: int, count: int,
                 folder: str, batch_size: int, block_size: int) -> list[str]:
    """Encode passages start..end-1 of `corpus` into shard `index` of `count` in `folder`; its two paths.

    Runs on a Dask worker: it loads the encoder there (CUDA if the worker has it). Its files are
    written atomically, so a retry starts from nothing.
    """
    from dprpipe import shard
    from dprpipe.model import DualEncoder, EncoderConfig, device

    enc = EncoderConfig(**encoder) if encoder else None
    model_, _ = DualEncoder.load(model, enc)
    model_.to(device())
    npy, ids = shard.encode_shard(model_, corpus, start, end, shard.shard_files(folder, index, count),
                                  batch_size, block_size)
    get_run_logger().info("shard %d of %d: passages %d..%d -> %s", index, count, start, end - 1, npy)
    return [str(npy), str(ids)]


@task(name="merge-shards", cache_policy=NO_CACHE)
def merge_shards(parts: list[list[str]], npy: str, ids: str) -> int:
    """Concatenate the shards, in order, into `npy` / `ids`; the row count."""
    from dprpipe import shard

    return shard.merge_shards([(Path(a), Path(b)) for a, b in parts], npy, ids)


@flow(name="sharded-encode", task_runner=dask_runner())
def sharded_encode(model: str, corpus: str, npy: str, ids: str, shards: int = 2, encoder: dict | None = None,
                   batch_size: int = 64, block_size: int = 16384, passages: int | None = None) -> dict:
    """Encode the passages of `corpus` in `shards` Dask tasks and merge them into `npy` and `ids`.

    Args:
        model: a checkpoint folder written by train, or a base model name with `encoder`.
        corpus: the prepared corpus (`corpus.jsonl`), readable by every worker.
        npy, ids: the merged outputs (float32 [n, dim] and one id per line, as the encode stage's).
        shards: number of pieces; boundaries fall on multiples of `block_size` (the batches of a
            single process), so a corpus of fewer blocks gets fewer shards.
        encoder: EncoderConfig fields for a base model (ignored for a checkpoint, which has its own).
        batch_size, block_size: as the encode stage's.
        passages: the corpus size, if known (else the file is counted).

    Returns {"passages", "shards", "ranges"}. The shard files live in a hidden folder next to
    `npy`, removed after the merge or the failure.
    """
    from dprpipe import shard
    from dprpipe.io import read_jsonl

    logger = get_run_logger()
    n = passages if passages is not None else sum(1 for _ in read_jsonl(corpus))
    ranges = shard.shard_ranges(n, shards, align=block_size)
    folder = Path(npy).with_name(f".{Path(npy).name}.shards")
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("encoding %d passages of %s in %d shard(s): %s", n, corpus, len(ranges), ranges)
    try:
        futures = [encode_shard.submit(model, encoder, corpus, a, b, i, len(ranges), str(folder), batch_size,
                                       block_size) for i, (a, b) in enumerate(ranges)]
        wait(futures)  # every shard done or out of retries before the folder can go
        parts = [f.result() for f in futures]  # raises if a shard failed all its retries
        rows = merge_shards(parts, npy, ids)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"passages": rows, "shards": len(ranges), "ranges": [list(r) for r in ranges]}


def run_sharded_encode(model: str, corpus: str, npy: str, ids: str, shards: int, encoder: dict | None = None,
                       batch_size: int = 64, block_size: int = 16384, passages: int | None = None,
                       dask_address: str = "", n_workers: int | None = None, return_state: bool = False):
    """`sharded_encode` on the Dask scheduler at `dask_address`, or on a local cluster of `n_workers`
    processes (default: one per shard, at most one per core). Raises if it fails (unless `return_state`)."""
    workers = n_workers or min(shards, os.cpu_count() or 1)
    runner = dask_runner(dask_address, workers)
    return sharded_encode.with_options(task_runner=runner)(
        model=model, corpus=corpus, npy=npy, ids=ids, shards=shards, encoder=encoder, batch_size=batch_size,
        block_size=block_size, passages=passages, return_state=return_state)
