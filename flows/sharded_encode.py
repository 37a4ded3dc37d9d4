"""The sharded-encode flow: an optional Prefect runner for encoding one corpus in shards on Dask.

The encode stage shards on its own (dprpipe/shard.py, plain Dask) and never imports this flow.
Run it to encode a corpus outside the DVC pipeline with what Prefect adds: each shard is a task
(`prefect_dask.DaskTaskRunner`, a temporary local cluster or the scheduler at an address) that is
retried alone when it fails, and the runs show in the Prefect UI. The sharding itself is
`dprpipe.shard.encode_sharded`, the same as the stage's, so the merged `.npy` + `.ids` are the
ones a single process writes. Workers read the corpus and write their shard where the paths say,
so on a real cluster the paths must be on storage every worker sees.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

# dprpipe (torch, faiss) is imported inside the tasks: the deployment server that imports the
# flows needs none of it

SHARD_RETRIES = 2


def dask_runner(address: str = "", n_workers: int | None = None) -> DaskTaskRunner:
    """The scheduler at `address`, or (empty) a temporary local cluster of `n_workers` processes
    on 127.0.0.1, one task per worker process, no dashboard (as `dprpipe.shard.dask_submit`)."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers or os.cpu_count() or 1, "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


@task(name="encode-shard", task_run_name="encode shard {index} of {count}", retries=SHARD_RETRIES,
      retry_delay_seconds=2, cache_policy=NO_CACHE)
def encode_shard(model: str, encoder: dict | None, corpus: str, start: int, end: int, index: int, count: int,
                 folder: str, batch_size: int, block_size: int) -> list[str]:
    """`dprpipe.shard.encode_shard_file` as a task: one shard, on a Dask worker; its two paths."""
    from dprpipe import shard

    paths = shard.encode_shard_file(model, encoder, corpus, start, end, index, count, folder, batch_size, block_size)
    get_run_logger().info("shard %d of %d: passages %d..%d -> %s", index, count, start, end - 1, paths[0])
    return paths


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

    Returns {"passages", "shards", "ranges"} (`dprpipe.shard.encode_sharded`).
    """
    from dprpipe import shard

    result = shard.encode_sharded(encode_shard.submit, model, encoder, corpus, npy, ids, shards, batch_size,
                                  block_size, passages)
    get_run_logger().info("encoded %d passages of %s in %d shard(s): %s", result["passages"], corpus,
                          result["shards"], result["ranges"])
    return result


def run_sharded_encode(model: str, corpus: str, npy: str, ids: str, shards: int, encoder: dict | None = None,
                       batch_size: int = 64, block_size: int = 16384, passages: int | None = None,
                       dask_address: str = "", n_workers: int | None = None, return_state: bool = False):
    """`sharded_encode` on the Dask scheduler at `dask_address`, or on a local cluster of `n_workers`
    processes (default: one per shard, at most one per core). Raises if it fails (unless `return_state`)."""
    workers = n_workers or min(shards, os.cpu_count() or 1)
    return sharded_encode.with_options(task_runner=dask_runner(dask_address, workers))(
        model=model, corpus=corpus, npy=npy, ids=ids, shards=shards, encoder=encoder, batch_size=batch_size,
        block_size=block_size, passages=passages, return_state=return_state)
