"""The resumable training state: what a killed run needs to continue to the same weights.

`<state_root>/<fingerprint>/last/` holds the weights, optimiser, schedule, every rank's RNG and the
position (epoch, step, history); `best/` the best model so far. The fingerprint covers the config
(but `resume`), the world size and the training inputs, so a state is only resumed by the run it
belongs to. Every save ends with a checksum file, and `read_state` refuses a state that does not
match it (truncated, corrupted, half-written): the caller then starts over.

Inputs: the model, optimiser, schedule and progress. Outputs: the state folder and what it held.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import distributed as dist_
from .io import DataError, atomic_dir, verify_checksums, write_checksums
from .model import DualEncoder, attention_kernel

if TYPE_CHECKING:
    from .train import TrainConfig, TrainData


def fingerprint(cfg: TrainConfig, model: DualEncoder, data: TrainData, world_size: int = 1) -> str:
    """What a resumable state must match: the config (but resume), the world size and the training inputs.

    `nproc` is left out (the actual world size counts), and a single process adds nothing, so
    states saved before distributed training existed still resume; so does `grad_cache_chunk`
    when it is off. On, it counts: its chunks draw other dropout masks than whole batches. So
    does `attention_dropout` when it is set (None, the model's own rate, adds nothing). The
    way dropout masks are drawn counts too: a state resumed under other masks would not reach an
    uninterrupted run's weights. So does the attention kernel `auto` resolved to here: kernels
    round differently.
    """
    settings = {**asdict(cfg), "resume": None, "encoder": asdict(model.cfg)}
    del settings["nproc"]
    if not cfg.grad_cache_chunk:   # off: states saved before gradient caching existed still resume
        del settings["grad_cache_chunk"]
    if cfg.attention_dropout is None:   # likewise for states saved before the setting existed
        del settings["attention_dropout"]
    if world_size > 1:
        settings["world_size"] = world_size
    settings["encoder"]["attention"] = attention_kernel(model.cfg)
    settings["dropout_masks"] = "int16-lanes"   # `FastDropout`'s: a state saved under bernoulli_ masks starts over
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for q in data.train:
        h.update(f"{q.id}\t{q.text}\t{sorted(q.relevant.items())}\t{list(data.negatives.get(q.id, []))}\n".encode())
    h.update(str(len(data.corpus)).encode())
    return h.hexdigest()[:16]


def save_state(state_dir: Path, model: DualEncoder, opt, sched, epoch: int, step_in_epoch: int,
               global_step: int, history: list, best: float | None, fingerprint: str,
               epoch_losses: Sequence[float] = (),
               rng_states: Sequence[tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
    rng_states = rng_states or [dist_.rng_state()]
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


def read_state(state_dir: Path, fingerprint: str, rank: int, world: int) -> tuple[dict, DualEncoder, dict] | None:
    """The resumable state in `state_dir`: (progress, model, trainer), or None if it is another run's.

    A state that is damaged (truncated, corrupted against its checksums, a file missing or not
    what `save_state` writes) raises; the caller then starts over, as the state only saves time.
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


def state_folder(state_root: str | Path, model: DualEncoder, data: TrainData, cfg: TrainConfig) -> Path:
    """Where `train` keeps the resumable state of this run: `state_root/<fingerprint>`."""
    return Path(state_root) / fingerprint(cfg, model, data, dist_.world_size())
