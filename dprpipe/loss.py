"""The loss of a training batch and its gradient: in-batch and hard negatives, one process or DDP,
with or without gradient caching.

A batch is a list of (question, positive's corpus position, hard negatives' positions). Every
question is scored against all the batch's passages: the positives (columns 0..B-1), then all
hard negatives; a passage that is another copy of one of its own positives is masked out rather
than counted as a negative. Under torchrun each rank encodes its contiguous slice of a global
batch and all-gathers the embeddings, so the loss has the same columns and masks as one process
(see `distributed_batch_loss`). With `grad_cache_chunk` > 0 the gradient comes from gradient
caching (GradCache, Gao et al. 2021; see `cached_batch_gradients`). With `detach_negatives` the
hard negatives are encoded without a graph (one process, no caching): their scores still train the
question encoder, but no gradient reaches the passage encoder through them.

Inputs: the encoder, a batch, the corpus and its id -> position index. Outputs: losses (tensors or
floats) and gradients accumulated in the encoder's parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed as dist_
from .model import DualEncoder, autocast, compute_loss, compute_similarity, passage_texts
from .records import Passage, Query

if TYPE_CHECKING:
    from .train import TrainConfig


Batch = Sequence[tuple[Query, int, list[int]]]


def columns(batch: Batch) -> list[int]:
    """The batch's passages (corpus positions): the positives (columns 0..B-1), then all hard negatives."""
    return [pos for _, pos, _ in batch] + [n for _, _, negs in batch for n in negs]


def own_positive_mask(batch: Batch, cols: Sequence[int], pid_index: Mapping[str, int]) -> torch.Tensor:
    """mask[i, j]: column j is another copy of one of question i's positives (not a negative for it)."""
    mask = torch.zeros((len(batch), len(cols)), dtype=torch.bool)
    for i, (qr, pos, _) in enumerate(batch):
        own = {pid_index[d] for d in qr.positives if d in pid_index}
        for j, c in enumerate(cols):
            if j != i and c in own:
                mask[i, j] = True
    return mask


def masked_loss(q: torch.Tensor, p: torch.Tensor, batch: Batch, cols: Sequence[int],
                 pid_index: Mapping[str, int], temperature: float) -> torch.Tensor:
    scores = compute_similarity(q, p)
    targets = torch.arange(len(batch), device=scores.device)
    mask = own_positive_mask(batch, cols, pid_index).to(scores.device)  # built on the CPU: one copy, not B*C writes
    return compute_loss(scores, targets, mask, temperature)


def batch_loss(model: DualEncoder, batch: Batch, corpus: Sequence[Passage],
               pid_index: Mapping[str, int], temperature: float, passage_max_length: int = 0,
               detach_negatives: bool = False) -> torch.Tensor:
    """Loss of one batch: passages are the positives (columns 0..B-1) then all hard negatives.

    With `detach_negatives` the hard negatives are encoded without a graph (a negative cache, as in
    Lindgren et al., 2021): their scores still train the question encoder, and the positives (every
    other question's in-batch negatives) the passage encoder, but no gradient flows into the passage
    encoder through them, so they cost a forward pass instead of a forward and a backward.
    """
    cols = columns(batch)
    q = model.encode_query(model.tokenize_queries([qr.text for qr, _, _ in batch]))
    texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    length = passage_max_length or None
    if not detach_negatives or len(texts) == len(batch):
        p = model.encode_passage(model.tokenize_passages(texts, length))
    else:
        positives = model.encode_passage(model.tokenize_passages(texts[:len(batch)], length))
        with torch.no_grad():
            negatives = model.encode_passage(model.tokenize_passages(texts[len(batch):], length))
        p = torch.cat([positives, negatives])
    return masked_loss(q, p, batch, cols, pid_index, temperature)


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
    """For each column of `columns(batch)`, its row in the rank-major gather of the ranks' local columns.

    Rank r encodes `columns(batch[lo:hi])` for its (lo, hi) in `bounds`; the gather holds rank 0's
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
    cols = columns(local)
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
    loss = masked_loss(q_all, p_all.index_select(0, order), batch, columns(batch), pid_index, temperature)
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
    encoders DDP (`find_unused_parameters`, see `train._ddp`) still reduces the query encoder's gradient
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
    cols = columns(local)
    q_texts = [qr.text for qr, _, _ in local]
    p_texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    calls = [(None if qs is None else model.tokenize_queries(q_texts[qs.start:qs.stop]),
              None if ps is None else model.tokenize_passages(p_texts[ps.start:ps.stop], cfg.passage_max_length or None))
             for qs, ps in grad_cache_steps(len(q_texts), len(p_texts), cfg.grad_cache_chunk)]

    rng_before, q_parts, p_parts = [], [], []
    with torch.no_grad(), autocast(model.cfg, dev):
        for queries, passages in calls:
            rng_before.append(dist_.rng_state())
            q, p = plain(queries, passages)
            q_parts += [] if q is None else [q]
            p_parts += [] if p is None else [p]
    rng_after = dist_.rng_state()
    q_emb = torch.cat(q_parts).requires_grad_()
    p_emb = torch.cat(p_parts).requires_grad_()

    with autocast(model.cfg, dev):   # the loss's matmul runs as in the uncached step
        if world > 1:
            q_all = dist_.gather_with_grad(q_emb if hi > lo else q_emb[:0])
            p_all = dist_.gather_with_grad(p_emb if hi > lo else p_emb[:0])
            order = torch.tensor(gathered_order(batch, bounds), device=p_all.device)
            loss = masked_loss(q_all, p_all.index_select(0, order), batch, columns(batch), pid_index,
                                cfg.temperature)
        else:
            loss = masked_loss(q_emb, p_emb, batch, cols, pid_index, cfg.temperature)
    (loss * (world * scale)).backward()
    q_grad = q_emb.grad if q_emb.grad is not None else torch.zeros_like(q_emb)
    p_grad = p_emb.grad if p_emb.grad is not None else torch.zeros_like(p_emb)

    q_at = p_at = 0
    for k, ((queries, passages), rng) in enumerate(zip(calls, rng_before)):
        dist_.set_rng_state(*rng)   # the first pass's dropout masks
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
                if p.requires_grad:   # not when the passage encoder is frozen to its top layer
                    outputs.append(p)
                    grads.append(p_grad[p_at:p_at + len(p)])
                p_at += len(p)
            torch.autograd.backward(outputs, grads)
    dist_.set_rng_state(*rng_after)   # where the first pass left it (the replays drew the same numbers)
    return loss.item()


def step_gradients(model: DualEncoder, towers: nn.Module | None, group: Sequence[Batch], corpus: Sequence[Passage],
                   pid_index: Mapping[str, int], cfg: TrainConfig) -> float:
    """Accumulate one optimiser step's gradient over its micro-batches (`grad_accumulation`); its mean loss.

    `towers` is None in one process; under torchrun it is the DDP module (`train._ddp`), and each rank's
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
                loss = batch_loss(model, batch, corpus, pid_index, cfg.temperature, cfg.passage_max_length,
                                  cfg.detach_negatives)
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
