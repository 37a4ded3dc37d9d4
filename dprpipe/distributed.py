"""Data-parallel helpers over `torch.distributed`: start-up from torchrun's environment, and the
collectives DPR training needs.

`torchrun` (or `python -m torch.distributed.run`) starts one process per device and sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_from_env` joins that group with NCCL
when the process has a GPU and gloo otherwise, so the same code runs on a multi-GPU node and on
CPU. Without those variables everything here is a no-op for a world of one, so a single process
needs no special case.

`gather_with_grad` is the all-gather of in-batch negatives: every rank receives all ranks'
embeddings, and gradients flow back only into its own slice (the others are constants here; their
owners compute their part of the gradient themselves).

Inputs: the environment of the process. Outputs: an initialised default process group, the rank,
world size and device of this process, and collective operations on tensors and objects.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .model import device as default_device

# rank 0 validates and checkpoints alone while the others wait at a barrier: allow for a long validation
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def backend() -> str:
    """NCCL on GPUs, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(timeout: datetime.timedelta = TIMEOUT) -> bool:
    """Join the process group described by torchrun's environment; True if this is a multi-process run.

    A process with no launcher environment, or a world of one, stays single-process (False). On a
    GPU the process is pinned to cuda:LOCAL_RANK before the group starts, so NCCL and `device()`
    use one device per process.
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    if dist.is_initialized():
        return True
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
    dist.init_process_group(backend(), timeout=timeout)  # env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its own GPU under torchrun on a GPU node, else `model.device()`."""
    if torch.cuda.is_available() and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return default_device()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it (pickled), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (rank order); gradients flow into this rank's part only.

    Ranks may hold different numbers of rows (an uneven last batch, even zero rows): sizes are
    exchanged first and the tensors padded to the largest for `all_gather`, then trimmed. This
    rank's slice of the result is `t` itself, so autograd reaches the local encoder; the other
    slices are received copies without a graph.

    With one process it returns `t`. With two ranks holding rows [a, b] and [c]: every rank gets
    [a, b, c], and on rank 0 only a and b carry gradient.
    """
    if not is_distributed():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[rank()] = t
    return torch.cat(parts)


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `n` items over `parts` ranks, the first ranks one longer.

    >>> split_even(7, 2), split_even(1, 3)
    ([(0, 4), (4, 7)], [(0, 1), (1, 1), (1, 1)])
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for r in range(parts):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a one-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(script: str | os.PathLike, args: Sequence[str], nproc: int, port: int | None = None,
                     host: str = "127.0.0.1") -> list[str]:
    """The command that runs `script args` in `nproc` processes on this node under torchrun.

    One node, static rendezvous on `host` (loopback by default: nothing listens outside the machine).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            f"--master-addr={host}", f"--master-port={port or free_port(host)}", str(Path(script)), *args]
def rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's torch RNG states: the CPU generator's, and its CUDA device's (None without CUDA)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def rng_states() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every rank's RNG states (a collective: all ranks call it at the same step)."""
    return all_gather_object(rng_state())


def set_rng_state(cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():   # dropout on a GPU draws from the device's generator
        torch.cuda.set_rng_state(cuda)


