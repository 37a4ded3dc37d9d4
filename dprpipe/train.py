"""DPR training: NLL of the positive passage against in-batch and BM25 hard negatives.

Each step takes `batch_size` questions; each brings one positive (sampled per epoch among
its judged positives) and `hard_negatives` passages sampled from the top `negative_pool` of
its mined negatives (a question without mined negatives falls back to random passages, as in
DPR). `negatives` names their sources: BM25's (`mine`), the encoder's own ranking
(`dense_mine`), the dataset's (`provided`), or several joined by "+", interleaved best first.
Validation always ranks the dev questions against their BM25 negatives, so candidates trained
on different negatives are compared on the same pool. The batch's loss and gradient (masks,
DDP, gradient caching) are `loss`'s.

Sampling for epoch e is drawn from a generator seeded by (seed, e), and the training state
(weights, optimiser, schedule, RNG, position) is saved every `checkpoint_every` steps, so a
killed run resumed with `resume` reaches the same weights as an uninterrupted one. The state
(`checkpoint`) lives in a scratch folder keyed by the run's fingerprint (config and training
data), outside the checkpoint, and is removed once the run has finished: the checkpoint alone
is the result.

Under torchrun (see `distributed`) N processes train like one process with batch N * batch_size:
every rank draws the same global batches and trains on its slice of each (see `loss`); the
result is the single-process one. Rank 0 alone validates and writes checkpoints; dropout masks
differ per rank (seed + rank). Training puts `FastDropout` in place of the encoders' dropout
modules (same rates; cheaper masks on the CPU) and steps with a fused AdamW where it can.
Two settings make a step cheaper: `frozen_layers` leaves the passage encoder's
embeddings and bottom layers untrained (`freeze_bottom`; backward stops above them), and
`detach_negatives` encodes the hard negatives without a graph (see `loss`).

With `include_dev` the dev questions join the training questions and nothing is validated, so
the last epoch is kept: the refit once the params have been chosen on dev.

Inputs: the encoder, corpus, train/dev queries and mined negatives. Output: the best
checkpoint by validation (a `DualEncoder.save` folder) and a per-epoch history.
"""

from __future__ import annotations

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
from .checkpoint import fingerprint, read_state, save_state, state_folder
from .encode import encode_texts
from .io import atomic_dir
from .evaluate import ndcg_at_k
from .loss import Towers, step_gradients
from .model import DualEncoder, check_attention_dropout, passage_texts, use_fast_dropout
from .records import Passage, Query

__all__ = ["NEGATIVE_SOURCES", "TrainConfig", "TrainData", "epoch_batches", "interleave", "seed_everything",
           "state_folder", "train", "validate"]

NEGATIVE_SOURCES = ("bm25", "dense", "provided")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_size: int = 32
    hard_negatives: int = 1        # mined negatives per question (0 = in-batch only)
    negative_pool: int = 30        # sample them from this many top mined negatives
    negatives: str = "dense"       # their source: bm25 | dense | provided, or several joined by "+"
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
    passage_max_length: int = 256  # passage tokens while training (0 = the encoder's); shorter is cheaper
    nproc: int = 1                 # processes for the train stage (torchrun); batch_size is per process
    grad_cache_chunk: int = 0      # > 0: gradient caching, texts encoded N at a time (memory of N, any batch)
    include_dev: bool = True       # train on the dev questions too (no validation: the last epoch is kept)
    attention_dropout: float | None = 0.0   # dropout on attention weights while training (None: the model's own)
    detach_negatives: bool = False # hard negatives encoded without a graph (see `loss.batch_loss`)
    frozen_layers: int = 1         # the passage encoder's embeddings and first N layers are not trained (0: none)

    def __post_init__(self):
        if self.validation not in ("ndcg@10", "avg_rank"):
            raise ValueError(f"unknown validation {self.validation!r}; expected 'ndcg@10' or 'avg_rank'")
        if self.batch_size < 1 or self.epochs < 0 or self.hard_negatives < 0:
            raise ValueError("batch_size must be >= 1, epochs and hard_negatives >= 0")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        unknown = [s for s in self.negative_sources() if s not in NEGATIVE_SOURCES]
        if unknown or not self.negatives:
            raise ValueError(f"unknown negatives {self.negatives!r}; expected one of {', '.join(NEGATIVE_SOURCES)} "
                             "or several joined by '+'")
        check_attention_dropout(self.attention_dropout)
        if self.grad_cache_chunk < 0:
            raise ValueError(f"grad_cache_chunk must be >= 0 (0: off), got {self.grad_cache_chunk}")
        if self.detach_negatives and (self.grad_cache_chunk or self.nproc > 1):
            raise ValueError("detach_negatives runs in one process without gradient caching; "
                             "set grad_cache_chunk: 0 and nproc: 1, or detach_negatives: false")
        if self.frozen_layers < 0:
            raise ValueError(f"frozen_layers must be >= 0 (0: every layer trains), got {self.frozen_layers}")

    def negative_sources(self) -> list[str]:
        return self.negatives.split("+")

    def negatives_read(self) -> list[str]:
        """The negative sources a run reads: training's, and BM25's for validation's dev pool (none in the refit)."""
        return list(dict.fromkeys(self.negative_sources() + ([] if self.include_dev else ["bm25"])))


@dataclass
class TrainData:
    corpus: Sequence[Passage]
    train: Sequence[Query]
    dev: Sequence[Query]
    negatives: Mapping[str, Sequence[str]]  # qid -> mined negative ids, best first
    val_negatives: Mapping[str, Sequence[str]] | None = None  # for the dev pool; None: `negatives`


def interleave(sources: Sequence[Mapping[str, Sequence[str]]]) -> dict[str, list[str]]:
    """Merge negative lists per question: first of each source, then second of each, ..., no repeats.

    >>> interleave([{"q": ["a", "b", "c"]}, {"q": ["b", "d"], "r": ["e"]}])
    {'q': ['a', 'b', 'd', 'c'], 'r': ['e']}
    """
    out: dict[str, list[str]] = {}
    for qid in dict.fromkeys(q for src in sources for q in src):
        lists = [src.get(qid, []) for src in sources]
        merged = (d for rank in range(max(map(len, lists))) for lst in lists if rank < len(lst) for d in [lst[rank]])
        out[qid] = list(dict.fromkeys(merged))
    return out


def adamw(params, **options) -> torch.optim.AdamW:
    """`torch.optim.AdamW(params, **options)`, fused where all `params` are on a CPU or CUDA device:
    one kernel per step instead of a dozen elementwise passes per tensor (on the 2 x 22M parameters
    of MiniLM's two encoders, 23 ms against 150-200 ms a step on a 2-core AMD EPYC); the same update."""
    params = list(params)   # tensors, or groups of them (dicts with "params")
    tensors = [t for g in params for t in g["params"]] if isinstance(params[0], dict) else params
    fused = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **options)


def layer_list(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of a Hugging Face encoder, bottom first: its first ModuleList of
    `config.num_hidden_layers` modules (BERT's `encoder.layer`, DistilBERT's `transformer.layer`, ...)."""
    n = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the layers of {type(encoder).__name__}: no list of its "
                     f"num_hidden_layers ({n}) modules; train with frozen_layers: 0")


def freeze_bottom(encoder: nn.Module, n: int) -> int:
    """Stop training the embeddings and the first `n` layers of `encoder` (nothing for n = 0);
    returns the number of parameters frozen. Backward then stops at layer n: the frozen layers
    cost a forward pass only. With a shared encoder the question side is frozen too."""
    if n == 0:
        return 0
    layers = layer_list(encoder)
    if n > len(layers):
        raise ValueError(f"frozen_layers is {n}, but the encoder has {len(layers)} layers")
    embeddings = getattr(encoder, "embeddings", None) or encoder.get_input_embeddings()
    frozen = [p for m in (embeddings, *layers[:n]) for p in m.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


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


@torch.inference_mode()
def validate(model: DualEncoder, data: TrainData, cfg: TrainConfig, pid_index: Mapping[str, int]) -> dict[str, float]:
    """Rank a pool (dev positives + mined negatives) for each dev question: nDCG@10, avg gold rank."""
    dev = [q for q in data.dev if q.positives]
    if not dev:
        return {}
    val_negs = data.negatives if data.val_negatives is None else data.val_negatives
    pool = sorted({pid_index[d] for q in dev for d in q.positives if d in pid_index}
                  | {pid_index[d] for q in dev for d in val_negs.get(q.id, [])[:cfg.val_negatives]
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


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "ndcg@10" else value < best


def _validate_and_keep(model: DualEncoder, data: TrainData, cfg: TrainConfig, pid_index: Mapping[str, int],
                       state_dir: Path, history: list, epoch: int, loss: float | None, seconds: float, seen: int,
                       best: float | None) -> float | None:
    """Validate, log the epoch into `history`, save the model as `best/` if it beats `best`.

    Without validation (no judged dev question, or `include_dev`) every epoch is kept and only the
    last one is saved."""
    val = validate(model, data, cfg, pid_index)
    record = {"epoch": epoch, "loss": loss, "questions_per_s": seen / seconds if seconds else None,
              "seconds": seconds, **{f"val_{k}": v for k, v in val.items()}}
    keep = not val or _better(cfg.validation, val[cfg.validation], best)
    record["kept"] = keep   # the checkpoint is the last epoch kept (epoch 0: the starting model)
    history.append(record)
    print(json.dumps(record))
    if keep and (val or epoch == cfg.epochs):
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


def train(model: DualEncoder, data: TrainData, cfg: TrainConfig, out_dir: str | Path, state_root: str | Path,
          progress: bool = True) -> list[dict]:
    """Train, keep the best epoch by validation in `out_dir`; returns the per-epoch history.

    The resumable state lives in `state_folder(state_root, ...)`, one folder per fingerprint of
    the config and training data: `last/` (weights, optimiser, schedule, RNG, position) and `best/`
    (the best model so far; without validation, the last epoch's, written once it ends). It is a
    scratch folder, not an output: a finished run removes it, so the checkpoint alone is the
    result (and DVC can cache the stage). Under torchrun (an
    initialised process group, see `distributed`) every rank calls this with the same arguments and
    `cfg.batch_size` questions per rank; rank 0 writes `out_dir` and the state (a folder all ranks
    can read, for resume), and every rank returns rank 0's history; `history[i]["kept"]` marks the
    epochs whose model was kept, the last of them being the one in `out_dir`.
    """
    out_dir = Path(out_dir)
    if cfg.include_dev:
        # the params were chosen on dev; the final model learns from it too, for its last epoch
        data = replace(data, train=[*data.train, *data.dev], dev=[])
    world, rank = dist_.world_size(), dist_.rank()
    main = rank == 0

    def seed():
        seed_everything(cfg.seed)
        if world > 1:
            torch.manual_seed(cfg.seed + rank)  # different dropout masks per rank; rank 0 draws as one process

    # a shared encoder frozen to its top trains nothing (only its unused pooler would require grad);
    # refused before the model is touched
    if cfg.frozen_layers and model.query_model is model.passage_model \
            and cfg.frozen_layers == len(layer_list(model.passage_model)):
        raise ValueError(f"frozen_layers: {cfg.frozen_layers} leaves nothing to train: the encoder is shared "
                         "and has no more layers; set frozen_layers below its depth (0: every layer trains)")
    seed()
    use_fast_dropout(model)
    freeze_bottom(model.passage_model, cfg.frozen_layers)
    # the batches of one process with world * batch_size questions; each rank trains on its slice
    global_cfg = replace(cfg, batch_size=cfg.batch_size * world) if world > 1 else cfg
    pid_index = {p.id: i for i, p in enumerate(data.corpus)}
    n_batches = math.ceil(sum(1 for q in data.train if q.positives) / global_cfg.batch_size)
    if n_batches == 0:
        raise ValueError("no training question has a judged positive passage")
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accumulation)
    total = steps_per_epoch * cfg.epochs
    no_decay = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")
    params = list({id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values())
    warmup = int(cfg.warmup_ratio * total)

    def make_optimizer():
        opt = adamw([
            {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
        return opt, sched

    opt, sched = make_optimizer()

    fp = fingerprint(cfg, model, data, world)
    state_dir = Path(state_root) / fp
    start_epoch, skip, global_step, history, best = 0, 0, 0, [], None
    epoch_losses: list[float] = []
    last = state_dir / "last"
    if cfg.resume and last.exists():
        fresh_weights = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            state = read_state(state_dir, fp, rank, world)
            if state is not None:
                prog, resumed, trainer = state
                model.load_state_dict(resumed.state_dict())
                opt.load_state_dict(trainer["optimizer"])
                sched.load_state_dict(trainer["scheduler"])
                dist_.set_rng_state(*trainer["rng"])
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
        rngs = dist_.rng_states()  # the other ranks wait here while rank 0 validates
        if main:
            save_state(state_dir, model, opt, sched, 0, 0, global_step, history, best, fp,
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
                rngs = dist_.rng_states()
                if main:
                    save_state(state_dir, model, opt, sched, epoch, step + 1, global_step, history, best,
                                fp, losses, rngs)
        bar.close()
        seconds = time.perf_counter() - t0
        loss = float(np.mean(losses)) if losses else None
        if main:
            best = _validate_and_keep(model, data, cfg, pid_index, state_dir, history, epoch + 1, loss, seconds,
                                      seen, best)
        skip = 0
        rngs = dist_.rng_states()  # the other ranks wait here while rank 0 validates
        if main:
            save_state(state_dir, model, opt, sched, epoch + 1, 0, global_step, history, best, fp,
                        rng_states=rngs)
        dist_.barrier()

    if main:
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(state_dir / "best", tmp, dirs_exist_ok=True)
    dist_.barrier()
    if main:   # after the barrier: no rank reads the state any more
        shutil.rmtree(state_dir, ignore_errors=True)
    return dist_.broadcast_object(history)
