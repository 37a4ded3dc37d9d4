"""Embed passages and questions with a dual encoder.

Passages stream in blocks: each block is sorted by length so a batch pads to its own longest
text (little padding waste), encoded under autocast where the hardware has native bf16, and
written row by row into a float32 `.npy` memmap at the passages' original positions. Memory
stays at one block whatever the corpus size.

Inputs: a `DualEncoder`, passages or query texts, an `EncodeConfig` (params.yaml `encode:`). Outputs: `<name>.npy` [n, dim] float32 and
`<name>.ids` (one id per line, same order), both written atomically.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .io import DataError, atomic_memmap, atomic_write, read_ids, write_ids
from .model import DualEncoder, autocast, passage_texts
from .records import Passage


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 32
    block_size: int = 16384     # passages length-sorted and encoded together; bounds memory
    shards: int = 1             # > 1: encode the passages in this many shards (Dask worker processes)
    dask_address: str = ""      # the Dask scheduler for the shards; empty: a local cluster

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.inference_mode()
def encode_texts(model: DualEncoder, texts: Sequence[str], kind: str, batch_size: int = 64,
                 progress: bool = False, bar: tqdm | None = None) -> np.ndarray:
    """Embed texts as queries or passages; rows follow `texts`. Batches are length-sorted."""
    if kind not in ("query", "passage"):
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    tokenize = model.tokenize_queries if kind == "query" else model.tokenize_passages
    encode = model.encode_query if kind == "query" else model.encode_passage
    model.eval()
    dev = next(model.parameters()).device
    order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first: OOM shows at once
    out = np.empty((len(texts), model.dim), np.float32)
    own_bar = bar is None and progress
    bar = bar or tqdm(total=len(texts), desc=f"encode {kind}", unit=kind[0] + "sg" if kind == "passage" else "q",
                      disable=not progress)
    with autocast(model.cfg, dev):
        for sl in _batches(len(texts), batch_size):
            idx = order[sl]
            out[idx] = encode(tokenize([texts[i] for i in idx])).cpu().numpy()
            bar.update(len(idx))
    if own_bar:
        bar.close()
    return out


def encode_passages_to(model: DualEncoder, passages: Iterable[Passage], n: int, npy_path: str | os.PathLike,
                       ids_path: str | os.PathLike, batch_size: int = 64, block_size: int = 16384,
                       progress: bool = False) -> None:
    """Stream `n` passages into a float32 memmap `npy_path` and their ids into `ids_path`."""
    it = iter(passages)
    done = 0
    with atomic_memmap(npy_path, (n, model.dim)) as emb, atomic_write(ids_path) as ids, \
            tqdm(total=n, desc="encode passages", unit="psg", disable=not progress, smoothing=0.05) as bar:
        while block := list(itertools.islice(it, block_size)):
            if done + len(block) > n:
                raise DataError(ids_path, None, f"more passages than the {n} expected")
            for p in block:
                if "\n" in p.id:
                    raise DataError(ids_path, None, f"passage id {p.id!r} contains a newline")
                ids.write(p.id + "\n")
            texts = passage_texts(block, model.cfg.use_title)
            emb[done:done + len(block)] = encode_texts(model, texts, "passage", batch_size, bar=bar)
            done += len(block)
        if done != n:
            raise DataError(ids_path, None, f"expected {n} passages, got {done}")


def load_embeddings(npy_path: str | os.PathLike, ids_path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Memory-map embeddings and read their ids; a size mismatch or a bad file is a DataError."""
    try:
        emb = np.load(npy_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise DataError(npy_path, None, f"not a readable .npy file ({e}); rerun the encode stage") from None
    ids = read_ids(ids_path)
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise DataError(npy_path, None, f"{emb.shape} embeddings for {len(ids)} ids in {ids_path}; "
                        "rerun the encode stage")
    return emb, ids


def save_embeddings(npy_path: str | os.PathLike, ids_path: str | os.PathLike, emb: np.ndarray,
                    ids: Sequence[str]) -> None:
    with atomic_write(npy_path, "wb") as f:
        np.save(f, np.ascontiguousarray(emb, dtype=np.float32))
    write_ids(ids_path, ids)
