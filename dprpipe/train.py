"""DPR training: NLL of the positive passage against in-batch and BM25 hard negatives.

Each step takes `batch_size` questions; each brings one positive (sampled per epoch among
its judged positives) and `hard_negatives` passages sampled from the top `negative_pool` of
its mined BM25 negatives (a question without mined negatives falls back to random passages,
as in DPR). Every question is scored against all the batch's passages; a passage that is
another copy of one of its own positives is masked out rather than counted as a negative.

Sampling for epoch e is drawn from a generator seeded by (seed, e), and the training state
(weights, optimiser, schedule, RNG, position) is saved every `checkpoint_every` steps, so a
killed run resumed with `resume` reaches the same weights as an uninterrupted one. The state
lives in a scratch folder keyed by the run's fingerprint (config and training data), outside
the checkpoint, and is removed once the run has finished: the checkpoint alone is the result.

Under torchrun (see `distributed`) N processes train like one process with batch N * batch_size:
every rank draws the same global batches, encodes its contiguous slice of each, and all-gathers
the query and passage embeddings, so each rank scores every question against every passage of
the global batch, with the same columns and masks as one process. The loss is scaled by N
because DDP averages the ranks' gradients; the sum of the ranks' gradients is the single-process
one. Rank 0 alone validates and writes checkpoints; dropout masks differ per rank (seed + rank).

With `grad_cache_chunk` > 0 each batch's gradient is computed by gradient caching (GradCache,
Gao et al. 2021; see `cached_batch_gradients`): texts go through the encoders that many at a
time, twice, so memory stays that of one chunk while the in-batch negatives are the whole batch's
(with grad_accumulation, each micro-batch's). It composes with the above: one process or DDP,
shared or separate encoders, bf16 autocast, the own-positive mask.

Inputs: the encoder, corpus, train/dev queries and mined negatives. Output: the best
checkpoint by validation (a `DualEncoder.save` folder) and a per-epoch history.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist_
from .records import Passage, Query
from .encode import encode_texts
from .evaluate import ndcg_at_k
from .io import DataError, atomic_dir, verify_checksums, write_checksums
from .model import DualEncoder, autocast, compute_loss, compute_similarity, passage_texts


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    hard_negatives: int = 1        # BM25 negatives per question (0 = in-batch only)
    negative_pool: int = 30        # sample them from this many top mined negatives
    lr: float = 5e-5
    warmup_ratio: float = 0.1      # linear warm-up, then linear decay to 0
    weight_decay: float = 0.01
    max_grad_norm: float = 2.0
    grad_accumulation: int = 1     # micro-batches per optimiser step (each has its own in-batch negatives)
    temperature: float = 0.05      # scores are divided by this (cosine scores need a sharp softmax)
    seed: int = 13
    resume: bool = True            # continue from the saved state of an interrupted run of the same config
    checkpoint_every: int = 10     # optimiser steps between resumable states (0: only at epoch ends)
    validation: str = "ndcg@10"    # ndcg@10 (higher is better) | avg_rank (DPR's; lower is better)
    val_negatives: int = 5         # dev pool: each dev question's positives + this many mined negatives
    passage_max_length: int = 128  # passage tokens while training (0 = the encoder's); shorter is cheaper
    nproc: int = 1                 # processes for the train stage (torchrun); batch_size is per process
    grad_cache_chunk: int = 0      # > 0: gradient caching, texts encoded N at a time (memory of N, any batch)

    def __post_init__(self):
        if self.validation not in ("ndcg@10", "avg_rank"):
            raise ValueError(f"unknown validation {self.validation!r}; expected 'ndcg@10' or 'avg_rank'")
        if self.batch_size < 1 or self.epochs < 0 or self.hard_negatives < 0:
            raise ValueError("batch_size must be >= 1, epochs and hard_negatives >= 0")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.grad_cache_chunk < 0:
            raise ValueError(f"grad_cache_chunk must be >= 0 (0: off), got {self.grad_cache_chunk}")


@dataclass
class TrainData:
    corpus: Sequence[Passage]
    train: Sequence[Query]
    dev: Sequence[Query]
    negatives: Mapping[str, Sequence[str]]  # qid -> mined negative ids, best first


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_batches(data: TrainData, cfg: TrainConfig, epoch: int, pid_index: Mapping[str, int]
                  ) -> list[list[tuple[Query, int, list[int]]]]:
    """The epoch's batches: (question, positive position, hard negative positions), seeded by epoch."""
    rng = random.Random(f"{cfg.seed}/{epoch}")
    queries = [q for q in data.train if q.positives]
    rng.shuffle(queries)
    batches = []
    for start in range(0, len(queries), cfg.batch_size):
        batch = []
        for q in queries[start:start + cfg.batch_size]:
            pos = pid_index[rng.choice(q.positives)]
            pool = [pid_index[d] for d in data.negatives.get(q.id, [])[:cfg.negative_pool] if d in pid_index]
            if len(pool) < cfg.hard_negatives:  # DPR's fallback: random passages
                gold = {pid_index[d] for d in q.positives}
                while len(pool) < cfg.hard_negatives and len(pool) + len(gold) < len(data.corpus):
                    r = rng.randrange(len(data.corpus))
                    if r not in gold and r not in pool:
                        pool.append(r)
            batch.append((q, pos, rng.sample(pool, min(cfg.hard_negatives, len(pool)))))
        batches.append(batch)
    return batches


Batch = Sequence[tuple[Query, int, list[int]]]


def _columns(batch: Batch) -> list[int]:
    """The batch's passages (corpus positions): the positives (columns 0..B-1), then all hard negatives."""
    return [pos for _, pos, _ in batch] + [n for _, _, negs in batch for n in negs]


def _own_positive_mask(batch: Batch, cols: Sequence[int], pid_index: Mapping[str, int]) -> torch.Tensor:
    """mask[i, j]: column j is another copy of one of question i's positives (not a negative for it)."""
    mask = torch.zeros((len(batch), len(cols)), dtype=torch.bool)
    for i, (qr, pos, _) in enumerate(batch):
        own = {pid_index[d] for d in qr.positives if d in pid_index}
        for j, c in enumerate(cols):
            if j != i and c in own:
                mask[i, j] = True
    return mask


def _masked_loss(q: torch.Tensor, p: torch.Tensor, batch: Batch, cols: Sequence[int],
                 pid_index: Mapping[str, int], temperature: float) -> torch.Tensor:
    scores = compute_similarity(q, p)
    targets = torch.arange(len(batch), device=scores.device)
    mask = _own_positive_mask(batch, cols, pid_index).to(scores.device)  # built on the CPU: one copy, not B*C writes
    return compute_loss(scores, targets, mask, temperature)


def batch_loss(model: DualEncoder, batch: Batch, corpus: Sequence[Passage],
               pid_index: Mapping[str, int], temperature: float, passage_max_length: int = 0) -> torch.Tensor:
    """Loss of one batch: passages are the positives (columns 0..B-1) then all hard negatives."""
    cols = _columns(batch)
    q = model.encode_query(model.tokenize_queries([qr.text for qr, _, _ in batch]))
    texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    p = model.encode_passage(model.tokenize_passages(texts, passage_max_length or None))
    return _masked_loss(q, p, batch, cols, pid_index, temperature)


class Towers(nn.Module):
    """Both encoders behind one `forward`, the call DDP wraps (it syncs gradients of what forward used)."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, queries: dict[str, torch.Tensor] | None, passages: dict[str, torch.Tensor] | None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Question then passage vectors; None for a side not given (gradient caching encodes one at a time)."""
        return (None if queries is None else self.model.encode_query(queries),
                None if passages is None else self.model.encode_passage(passages))


def gathered_order(batch: Batch, bounds: Sequence[tuple[int, int]]) -> list[int]:
    """For each column of `_columns(batch)`, its row in the rank-major gather of the ranks' local columns.

    Rank r encodes `_columns(batch[lo:hi])` for its (lo, hi) in `bounds`; the gather holds rank 0's
    positives and negatives, then rank 1's, and so on. With questions a, b on rank 0 and c on rank 1,
    one negative each: gathered [a+, b+, a-, b-, c+, c-]; columns [a+, b+, c+, a-, b-, c-] are rows
    [0, 1, 4, 2, 3, 5].
    """
    pos_rows, neg_rows, offset = [], [], 0
    for lo, hi in bounds:
        pos_rows += range(offset, offset + hi - lo)
        offset += hi - lo
        for _, _, negs in batch[lo:hi]:
            neg_rows += range(offset, offset + len(negs))
            offset += len(negs)
    return pos_rows + neg_rows


def distributed_batch_loss(towers: nn.Module, model: DualEncoder, batch: Batch, corpus: Sequence[Passage],
                           pid_index: Mapping[str, int], temperature: float, passage_max_length: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's view of the loss of a global batch: (loss, keep_alive).

    The rank encodes its slice of `batch` through `towers` (the DDP module), gathers every rank's
    queries and passages, and computes the loss of the whole batch exactly as `batch_loss` does
    (same column order, same mask). Gradients reach only this rank's embeddings, so backward of
    `loss * world_size` on each rank, averaged by DDP, is the single-process gradient.

    A rank whose slice is empty (a last batch shorter than the world) still runs its encoders on
    one question, and `keep_alive` is 0 times their output: every rank then takes part in DDP's
    gradient reduction, contributing zeros. Add it to the loss before backward.
    """
    bounds = dist_.split_even(len(batch), dist_.world_size())
    lo, hi = bounds[dist_.rank()]
    local = batch[lo:hi] or batch[:1]
    cols = _columns(local)
    texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    q, p = towers(model.tokenize_queries([qr.text for qr, _, _ in local]),
                  model.tokenize_passages(texts, passage_max_length or None))
    keep_alive = q.new_zeros(())
    if hi == lo:
        keep_alive = 0.0 * (q.sum() + p.sum())
        q, p = q[:0], p[:0]
    q_all = dist_.gather_with_grad(q)
    p_all = dist_.gather_with_grad(p)
    order = torch.tensor(gathered_order(batch, bounds), device=p_all.device)
    loss = _masked_loss(q_all, p_all.index_select(0, order), batch, _columns(batch), pid_index, temperature)
    return loss, keep_alive


def grad_cache_steps(n_queries: int, n_passages: int, chunk: int) -> list[tuple[range | None, range | None]]:
    """The encoder calls of gradient caching: (question rows, passage rows) of each, in order.

    Questions `chunk` at a time, then passages `chunk` at a time, one side per call. With 5
    questions, 7 passages and chunks of 3: [(0:3, -), (3:5, -), (-, 0:3), (-, 3:6), (-, 6:7)].
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return ([(range(i, min(i + chunk, n_queries)), None) for i in range(0, n_queries, chunk)]
            + [(None, range(i, min(i + chunk, n_passages))) for i in range(0, n_passages, chunk)])


def cached_batch_gradients(model: DualEncoder, towers: nn.Module | None, batch: Batch, corpus: Sequence[Passage],
                           pid_index: Mapping[str, int], cfg: TrainConfig, scale: float = 1.0,
                           sync: bool = True) -> float:
    """Add `scale` times the gradient of one batch's loss to the parameters by gradient caching; the loss.

    GradCache (Gao et al., 2021): the loss of a batch depends on the encoders only through its
    embeddings, so (1) every text is encoded `cfg.grad_cache_chunk` at a time without a graph,
    (2) the loss of the whole batch is computed on those detached embeddings and backpropagated
    to them alone, and (3) each chunk is encoded again with a graph and backpropagated with its
    rows of those cached embedding gradients. Memory is that of one chunk's graph, whatever the
    batch size; the cost is a second forward pass. The CPU (and CUDA) RNG state is saved before
    each chunk and restored for its second pass, so dropout draws the same masks in both and the
    cached gradients are those of the network that is backpropagated; the gradient is then the
    one of a batch whose texts went through the encoders in these chunks (with dropout off, the
    gradient of `batch_loss` up to float rounding).

    `towers` is None in one process; under torchrun it is the DDP module and this rank encodes its
    slice of `batch`, gathers every rank's detached embeddings, computes the loss of the global
    batch as `distributed_batch_loss` does and backpropagates its own rows' cached gradients
    (scaled by the world size, which DDP's average undoes). DDP reduces gradients only in the
    backward of the last encoder call when `sync` is true (the last micro-batch of an optimiser
    step), under `no_sync` otherwise. That call runs the passage encoder alone: with separate
    encoders DDP (`find_unused_parameters`, see `_ddp`) still reduces the query encoder's gradient
    accumulated under `no_sync`. A rank with an empty slice still encodes one question and its
    passages, with a zero gradient, so it joins that reduction.
    """
    dev = next(model.parameters()).device
    world = dist_.world_size()
    towers = towers if towers is not None else Towers(model)
    plain = getattr(towers, "module", towers)   # the first pass needs no DDP bookkeeping
    bounds = dist_.split_even(len(batch), world)
    lo, hi = bounds[dist_.rank()]
    local = batch[lo:hi] or batch[:1]
    cols = _columns(local)
    q_texts = [qr.text for qr, _, _ in local]
    p_texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    calls = [(None if qs is None else model.tokenize_queries(q_texts[qs.start:qs.stop]),
              None if ps is None else model.tokenize_passages(p_texts[ps.start:ps.stop], cfg.passage_max_length or None))
             for qs, ps in grad_cache_steps(len(q_texts), len(p_texts), cfg.grad_cache_chunk)]

    rng_before, q_parts, p_parts = [], [], []
    with torch.no_grad(), autocast(model.cfg, dev):
        for queries, passages in calls:
            rng_before.append(_rng_state())
            q, p = plain(queries, passages)
            q_parts += [] if q is None else [q]
            p_parts += [] if p is None else [p]
    rng_after = _rng_state()
    q_emb = torch.cat(q_parts).requires_grad_()
    p_emb = torch.cat(p_parts).requires_grad_()

    with autocast(model.cfg, dev):   # the loss's matmul runs as in the uncached step
        if world > 1:
            q_all = dist_.gather_with_grad(q_emb if hi > lo else q_emb[:0])
            p_all = dist_.gather_with_grad(p_emb if hi > lo else p_emb[:0])
            order = torch.tensor(gathered_order(batch, bounds), device=p_all.device)
            loss = _masked_loss(q_all, p_all.index_select(0, order), batch, _columns(batch), pid_index,
                                cfg.temperature)
        else:
            loss = _masked_loss(q_emb, p_emb, batch, cols, pid_index, cfg.temperature)
    (loss * (world * scale)).backward()
    q_grad = q_emb.grad if q_emb.grad is not None else torch.zeros_like(q_emb)
    p_grad = p_emb.grad if p_emb.grad is not None else torch.zeros_like(p_emb)

    q_at = p_at = 0
    for k, ((queries, passages), rng) in enumerate(zip(calls, rng_before)):
        _set_rng_state(*rng)   # the first pass's dropout masks
        last = sync and k == len(calls) - 1
        no_sync = getattr(towers, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast(model.cfg, dev):
                q, p = towers(queries, passages)
            outputs, grads = [], []
            if q is not None:
                outputs.append(q)
                grads.append(q_grad[q_at:q_at + len(q)])
                q_at += len(q)
            if p is not None:
                outputs.append(p)
                grads.append(p_grad[p_at:p_at + len(p)])
                p_at += len(p)
            torch.autograd.backward(outputs, grads)
    _set_rng_state(*rng_after)   # where the first pass left it (the replays drew the same numbers)
    return loss.item()


@torch.inference_mode()
def validate(model: DualEncoder, data: TrainData, cfg: TrainConfig, pid_index: Mapping[str, int]) -> dict[str, float]:
    """Rank a pool (dev positives + mined negatives) for each dev question: nDCG@10, avg gold rank."""
    dev = [q for q in data.dev if q.positives]
    if not dev:
        return {}
    pool = sorted({pid_index[d] for q in dev for d in q.positives if d in pid_index}
                  | {pid_index[d] for q in dev for d in data.negatives.get(q.id, [])[:cfg.val_negatives]
                     if d in pid_index})
    p = encode_texts(model, passage_texts([data.corpus[i] for i in pool], model.cfg.use_title), "passage")
    q = encode_texts(model, [x.text for x in dev], "query")
    scores = q @ p.T
    ids = [data.corpus[i].id for i in pool]
    ndcg, ranks = [], []
    for qi, qr in enumerate(dev):
        order = np.argsort(-scores[qi], kind="stable")
        ranked = [ids[j] for j in order]
        ndcg.append(ndcg_at_k(ranked, qr.relevant, 10))
        ranks.append(next(r for r, d in enumerate(ranked) if qr.relevant.get(d, 0) > 0))
    return {"ndcg@10": float(np.mean(ndcg)), "avg_rank": float(np.mean(ranks)), "pool": len(pool)}


def _fingerprint(cfg: TrainConfig, model: DualEncoder, data: TrainData, world_size: int = 1) -> str:
    """What a resumable state must match: the config (but resume), the world size and the training inputs.

    `nproc` is left out (the actual world size counts), and a single process adds nothing, so
    states saved before distributed training existed still resume; so does `grad_cache_chunk`
    when it is off. On, it counts: its chunks draw other dropout masks than whole batches.
    """
    settings = {**asdict(cfg), "resume": None, "encoder": asdict(model.cfg)}
    del settings["nproc"]
    if not cfg.grad_cache_chunk:   # off: states saved before gradient caching existed still resume
        del settings["grad_cache_chunk"]
    if world_size > 1:
        settings["world_size"] = world_size
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for q in data.train:
        h.update(f"{q.id}\t{q.text}\t{sorted(q.relevant.items())}\t{list(data.negatives.get(q.id, []))}\n".encode())
    h.update(str(len(data.corpus)).encode())
    return h.hexdigest()[:16]


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's torch RNG states: the CPU generator's, and its CUDA device's (None without CUDA)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _rng_states() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every rank's RNG states (a collective: all ranks call it at the same step)."""
    return dist_.all_gather_object(_rng_state())


def _set_rng_state(cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():   # dropout on a GPU draws from the device's generator
        torch.cuda.set_rng_state(cuda)


def _save_state(state_dir: Path, model: DualEncoder, opt, sched, epoch: int, step_in_epoch: int,
                global_step: int, history: list, best: float | None, fingerprint: str,
                epoch_losses: Sequence[float] = (),
                rng_states: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
    rng_states = rng_states or [_rng_state()]
    trainer = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "torch_rng_ranks": [cpu for cpu, _ in rng_states]}
    if all(cuda is not None for _, cuda in rng_states):
        trainer["cuda_rng_ranks"] = [cuda for _, cuda in rng_states]
    with atomic_dir(state_dir / "last") as tmp:
        model.save(tmp / "model")
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "progress.json").write_text(json.dumps({
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "history": history, "best": best, "fingerprint": fingerprint,
            "epoch_losses": list(epoch_losses)}))  # this epoch's step losses so far, for its mean
        write_checksums(tmp)  # last: a damaged state is told apart from a good one on resume


def _read_state(state_dir: Path, fingerprint: str, rank: int, world: int) -> tuple[dict, DualEncoder, dict] | None:
    """The resumable state in `state_dir`: (progress, model, trainer), or None if it is another run's.

    A state that is damaged (truncated, corrupted against its checksums, a file missing or not
    what `_save_state` writes) raises; the caller then starts over, as the state only saves time.
    """
    last, fix = state_dir / "last", "training starts over"
    if not verify_checksums(last, fix):
        raise DataError(last, None, "no checksums.sha256 (written last by every save)")
    prog = json.loads((last / "progress.json").read_text(encoding="utf-8"))
    if prog.get("fingerprint") != fingerprint:
        return None
    if prog["best"] is not None and not verify_checksums(state_dir / "best", fix):
        raise DataError(state_dir / "best", None, "no checksums.sha256 (the best model so far)")
    resumed, _ = DualEncoder.load(str(last / "model"))
    trainer = torch.load(last / "trainer.pt", weights_only=True)  # never runs a pickle's code
    cuda = trainer.get("cuda_rng_ranks")
    trainer["rng"] = (trainer["torch_rng_ranks"][rank if world > 1 else 0], cuda[rank if world > 1 else 0] if cuda else None)
    missing = [k for k in ("epoch", "step_in_epoch", "global_step", "history", "best") if k not in prog]
    if missing:
        raise DataError(last / "progress.json", None, f"lacks {', '.join(missing)}")
    return prog, resumed, trainer


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "ndcg@10" else value < best


def _validate_and_keep(model: DualEncoder, data: TrainData, cfg: TrainConfig, pid_index: Mapping[str, int],
                       state_dir: Path, history: list, epoch: int, loss: float | None, seconds: float, seen: int,
                       best: float | None) -> float | None:
    """Validate, log the epoch into `history`, save the model as `best/` if it beats `best`."""
    val = validate(model, data, cfg, pid_index)
    record = {"epoch": epoch, "loss": loss, "questions_per_s": seen / seconds if seconds else None,
              "seconds": seconds, **{f"val_{k}": v for k, v in val.items()}}
    keep = not val or _better(cfg.validation, val[cfg.validation], best)
    record["kept"] = keep   # the checkpoint is the last epoch kept (epoch 0: the starting model)
    history.append(record)
    print(json.dumps(record))
    if keep:
        best = val.get(cfg.validation)
        with atomic_dir(state_dir / "best") as tmp:
            model.save(tmp, {"train": asdict(cfg), "epoch": epoch, "validation": val})
    return best


def _ddp(model: DualEncoder) -> nn.Module:
    """The encoders wrapped for data-parallel training on this process's device."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    # find_unused_parameters: the encoders' pooler layer gets no gradient (pooling reads the hidden
    # states), and a gradient-caching call runs one encoder only; no buffer sync before each
    # forward: the buffers (position ids) are constants
    return DistributedDataParallel(Towers(model), device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True, forward_sync_buffers=False)


def step_gradients(model: DualEncoder, towers: nn.Module | None, group: Sequence[Batch], corpus: Sequence[Passage],
                   pid_index: Mapping[str, int], cfg: TrainConfig) -> float:
    """Accumulate one optimiser step's gradient over its micro-batches (`grad_accumulation`); its mean loss.

    `towers` is None in one process; under torchrun it is the DDP module (`_ddp`), and each rank's
    backward of `loss * world_size` leaves, once DDP has averaged, the single-process gradient in
    every rank's parameters. With `cfg.grad_cache_chunk` each micro-batch goes through
    `cached_batch_gradients` instead.
    """
    dev = next(model.parameters()).device
    world = dist_.world_size()
    step_loss = 0.0
    for k, batch in enumerate(group):
        if cfg.grad_cache_chunk:
            step_loss += cached_batch_gradients(model, towers, batch, corpus, pid_index, cfg, 1 / len(group),
                                                sync=k == len(group) - 1) / len(group)
            continue
        if towers is None:
            with autocast(model.cfg, dev):
                loss = batch_loss(model, batch, corpus, pid_index, cfg.temperature, cfg.passage_max_length)
            (loss / len(group)).backward()
        else:
            # DDP reduces gradients once per optimiser step, on the last micro-batch
            with contextlib.nullcontext() if k == len(group) - 1 else towers.no_sync():
                with autocast(model.cfg, dev):
                    loss, keep_alive = distributed_batch_loss(towers, model, batch, corpus, pid_index,
                                                              cfg.temperature, cfg.passage_max_length)
                ((loss * world + keep_alive) / len(group)).backward()
        step_loss += loss.item() / len(group)
    return step_loss


def state_folder(state_root: str | Path, model: DualEncoder, data: TrainData, cfg: TrainConfig) -> Path:
    """Where `train` keeps the resumable state of this run: `state_root/<fingerprint>`."""
    return Path(state_root) / _fingerprint(cfg, model, data, dist_.world_size())


def train(model: DualEncoder, data: TrainData, cfg: TrainConfig, out_dir: str | Path, state_root: str | Path,
          progress: bool = True) -> list[dict]:
    """Train, keep the best epoch by validation in `out_dir`; returns the per-epoch history.

    The resumable state lives in `state_folder(state_root, ...)`, one folder per fingerprint of
    the config and training data: `last/` (weights, optimiser, schedule, RNG, position) and `best/`
    (the best model so far). It is a scratch folder, not an output: a finished run removes it, so
    the checkpoint alone is the result (and DVC can cache the stage). Under torchrun (an
    initialised process group, see `distributed`) every rank calls this with the same arguments and
    `cfg.batch_size` questions per rank; rank 0 writes `out_dir` and the state (a folder all ranks
    can read, for resume), and every rank returns rank 0's history; `history[i]["kept"]` marks the
    epochs whose model was kept, the last of them being the one in `out_dir`.
    """
    out_dir = Path(out_dir)
    world, rank = dist_.world_size(), dist_.rank()
    main = rank == 0

    def seed():
        seed_everything(cfg.seed)
        if world > 1:
            torch.manual_seed(cfg.seed + rank)  # different dropout masks per rank; rank 0 draws as one process

    seed()
    # the batches of one process with world * batch_size questions; each rank trains on its slice
    global_cfg = replace(cfg, batch_size=cfg.batch_size * world) if world > 1 else cfg
    pid_index = {p.id: i for i, p in enumerate(data.corpus)}
    n_batches = math.ceil(sum(1 for q in data.train if q.positives) / global_cfg.batch_size)
    if n_batches == 0:
        raise ValueError("no training question has a judged positive passage")
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accumulation)
    total = steps_per_epoch * cfg.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    params = list({id(p): (n, p) for n, p in model.named_parameters()}.values())
    warmup = int(cfg.warmup_ratio * total)

    def make_optimizer():
        opt = torch.optim.AdamW([
            {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
        return opt, sched

    opt, sched = make_optimizer()

    fingerprint = _fingerprint(cfg, model, data, world)
    state_dir = Path(state_root) / fingerprint
    start_epoch, skip, global_step, history, best = 0, 0, 0, [], None
    epoch_losses: list[float] = []
    last = state_dir / "last"
    if cfg.resume and last.exists():
        fresh_weights = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            state = _read_state(state_dir, fingerprint, rank, world)
            if state is not None:
                prog, resumed, trainer = state
                model.load_state_dict(resumed.state_dict())
                opt.load_state_dict(trainer["optimizer"])
                sched.load_state_dict(trainer["scheduler"])
                _set_rng_state(*trainer["rng"])
        # a damaged state costs the time it would have saved, never the run (the model, optimiser
        # and schedule are rebuilt below, so a half-loaded state leaves nothing behind)
        except Exception as e:  # json, safetensors, torch and checksums each raise their own
            state, why = None, f"it is damaged ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        else:
            why = "it belongs to a different config or data"
        if state is not None:
            start_epoch, skip = prog["epoch"], prog["step_in_epoch"]
            global_step, history, best = prog["global_step"], prog["history"], prog["best"]
            epoch_losses = list(prog.get("epoch_losses", []))
            if main:
                print(f"resuming from {last}: epoch {start_epoch + 1}, step {skip} of {steps_per_epoch}")
        else:
            if main:
                print(f"ignoring {last}: {why}; training starts over")
            # a partly loaded state (or the random draws of loading it) must not leak into the fresh run
            model.load_state_dict(fresh_weights)
            opt, sched = make_optimizer()
            seed()
    dist_.barrier()  # every rank has read the state before rank 0 may replace it
    if start_epoch == 0 and skip == 0:
        history, best = [], None
        if main:
            shutil.rmtree(state_dir, ignore_errors=True)
            # epoch 0: the starting model, so the curve shows what training adds (and it can win)
            best = _validate_and_keep(model, data, cfg, pid_index, state_dir, history, 0, None, 0.0, 0, best)
        rngs = _rng_states()  # the other ranks wait here while rank 0 validates
        if main:
            _save_state(state_dir, model, opt, sched, 0, 0, global_step, history, best, fingerprint,
                        rng_states=rngs)
        dist_.barrier()

    towers = _ddp(model) if world > 1 else None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches = epoch_batches(data, global_cfg, epoch, pid_index)
        groups = [batches[i:i + cfg.grad_accumulation] for i in range(0, len(batches), cfg.grad_accumulation)]
        bar = tqdm(total=len(groups), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not (progress and main))
        t0, seen, losses = time.perf_counter(), 0, epoch_losses if skip else []
        for step in range(skip, len(groups)):
            opt.zero_grad(set_to_none=True)
            step_loss = step_gradients(model, towers, groups[step], data.corpus, pid_index, cfg)
            seen += sum(len(batch) for batch in groups[step])
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            global_step += 1
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", q_per_s=f"{seen / (time.perf_counter() - t0):.1f}")
            bar.update(1)
            if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and step + 1 < len(groups):
                rngs = _rng_states()
                if main:
                    _save_state(state_dir, model, opt, sched, epoch, step + 1, global_step, history, best,
                                fingerprint, losses, rngs)
        bar.close()
        seconds = time.perf_counter() - t0
        loss = float(np.mean(losses)) if losses else None
        if main:
            best = _validate_and_keep(model, data, cfg, pid_index, state_dir, history, epoch + 1, loss, seconds,
                                      seen, best)
        skip = 0
        rngs = _rng_states()  # the other ranks wait here while rank 0 validates
        if main:
            _save_state(state_dir, model, opt, sched, epoch + 1, 0, global_step, history, best, fingerprint,
                        rng_states=rngs)
        dist_.barrier()

    if main:
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(state_dir / "best", tmp, dirs_exist_ok=True)
    dist_.barrier()
    if main:   # after the barrier: no rank reads the state any more
        shutil.rmtree(state_dir, ignore_errors=True)
    return dist_.broadcast_object(history)
