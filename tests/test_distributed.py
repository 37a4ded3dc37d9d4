"""dprpipe.distributed and DDP training: 2 CPU processes (gloo) with batch b train like 1 process with 2b.

The two ranks are started with torch.multiprocessing on a free 127.0.0.1 port. Dropout is off in
these models, so both runs compute the same function and must agree up to float rounding (the
ranks multiply smaller matrices in another order). The models are cosine ones: with raw inner
products at temperature 0.1 the logits reach the hundreds, and float32 rounding in the softmax
grows to ~1e-4 of the gradient (the same comparison in float64 agrees to 1e-13).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)
from dense_fixtures import tiny_encoder, toy_corpus, toy_negatives, toy_queries
from torch import nn

from dprpipe import distributed
from dprpipe.model import DualEncoder
from dprpipe.records import Query
from dprpipe.checkpoint import fingerprint as _fingerprint
from dprpipe.loss import gathered_order, step_gradients
from dprpipe.train import TrainConfig, TrainData, _ddp, epoch_batches, train

WORLD = 2
# frozen_layers is the default's (1 of the toy encoder's 2 layers), so DDP is checked with a frozen layer
BASE = TrainConfig(epochs=2, hard_negatives=1, negative_pool=3, lr=3e-3, warmup_ratio=0.0, temperature=0.1,
                   include_dev=False, checkpoint_every=1, seed=7, val_negatives=3)
# per-rank batch sizes; the reference trains one process with WORLD times as many questions per batch
SCENARIOS = {
    # 15 questions in global batches of 14: the last batch has 1 question, so rank 1's slice is empty
    "uneven": (replace(BASE, batch_size=7), {"pooling": "mean", "normalize": True}, 15),
    # separate encoders, 2 hard negatives, 2 micro-batches per step (DDP no_sync), batches 6, 6, 4
    "accumulate": (replace(BASE, batch_size=3, hard_negatives=2, grad_accumulation=2),
                   {"pooling": "mean", "normalize": True, "shared": False}, 16),
    # gradient caching in chunks of 2 (dividing neither 3 questions nor 9 passages per rank), separate
    # encoders, 2 micro-batches per step; global batches 6, 6, 1, so rank 1's last slice is empty
    "cached": (replace(BASE, batch_size=3, hard_negatives=2, grad_accumulation=2, grad_cache_chunk=2),
               {"pooling": "mean", "normalize": True, "shared": False}, 13),
}
# Adam divides each gradient by its own running norm, so a weight whose gradient is near zero moves by
# float noise (DDP sums the gradients in another order): 1.2e-5 seen on AVX-512. 1e-4 is 3% of one
# step at lr 3e-3, while a wrong gradient moves weights by whole steps
TOL = {"rtol": 1e-5, "atol": 1e-4}
RANKS_TIMEOUT = 300  # seconds; the run takes ~5


def _model(encoder: dict) -> DualEncoder:
    model = tiny_encoder(seed=0, **encoder)
    for m in model.modules():  # dropout would draw different masks in 1 and 2 processes
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _data(n_train: int) -> TrainData:
    train_q, dev_q = toy_queries()
    return TrainData(toy_corpus(), train_q[:n_train], dev_q, toy_negatives())


def _check_gather_with_grad(rank: int) -> None:
    """Rank 0 holds 3 rows, rank 1 holds 0 then 1: every rank gets all rows, gradient only for its own."""
    for rows in ([3, 0], [3, 1]):
        t = torch.full((rows[rank], 2), float(rank + 1), requires_grad=True)
        out = distributed.gather_with_grad(t)
        want = torch.cat([torch.full((rows[r], 2), float(r + 1)) for r in range(WORLD)])
        assert torch.equal(out, want), (rank, out)
        weights = torch.arange(out.numel(), dtype=torch.float32).view_as(out)
        (out * weights).sum().backward()
        start = sum(rows[:rank])
        assert torch.equal(t.grad, weights[start:start + rows[rank]])


def _first_step_grads(model: DualEncoder, cfg: TrainConfig, data: TrainData, reductions: list | None = None) -> dict:
    """The gradient of the first optimiser step (global batches of WORLD * cfg.batch_size questions), as
    train() computes it: in one process, or in a process group this rank's parameters through DDP.
    Under DDP, `reductions` receives the index of each gradient bucket DDP all-reduces."""
    pid_index = {p.id: i for i, p in enumerate(data.corpus)}
    group = epoch_batches(data, replace(cfg, batch_size=cfg.batch_size * WORLD), 0, pid_index)[:cfg.grad_accumulation]
    towers = _ddp(model) if distributed.is_distributed() else None
    if towers is not None and reductions is not None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted(state, bucket):
            reductions.append(bucket.index())
            return allreduce_hook(state, bucket)   # DDP's own reduction (the average)

        towers.register_comm_hook(None, counted)
    model.train()
    step_gradients(model, towers, group, data.corpus, pid_index, cfg)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_main(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.backend() == "gloo"
    try:
        assert (distributed.rank(), distributed.world_size()) == (rank, WORLD)
        _check_gather_with_grad(rank)
        for name, (cfg, encoder, n_train) in SCENARIOS.items():
            folder = Path(root) / name
            folder.mkdir(exist_ok=True)
            reductions: list[int] = []
            grads = _first_step_grads(_model(encoder), cfg, _data(n_train), reductions)
            torch.save(grads, folder / f"grads{rank}.pt")
            (folder / f"reductions{rank}.json").write_text(json.dumps(reductions))
            model = _model(encoder)
            history = train(model, _data(n_train), cfg, folder / "out", folder / "state", progress=False)
            torch.save({"history": history, "weights": model.state_dict()}, folder / f"rank{rank}.pt")
        _interrupted_run(Path(root) / "uneven-killed", *SCENARIOS["uneven"])
    finally:
        distributed.shutdown()


def _interrupted_run(folder: Path, cfg: TrainConfig, encoder: dict, n_train: int) -> None:
    """Every rank's run stopped in its first step, leaving the resumable state saved before it."""
    import dprpipe.loss as loss_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real, loss_mod.distributed_batch_loss = loss_mod.distributed_batch_loss, interrupted
    try:
        train(_model(encoder), _data(n_train), cfg, folder / "out", folder / "state", progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        loss_mod.distributed_batch_loss = real


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # fork: the ranks inherit the imported torch and transformers (spawn re-imports them, ~7 s of CPU each)
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("TOKENIZERS_PARALLELISM", "false")
        ranks = mp.start_processes(_rank_main, args=(distributed.free_port(), str(root)), nprocs=WORLD,
                                   join=False, start_method="fork")
    # a rank that hangs (a collective nobody else joins) must fail the test, not stall the suite
    deadline = time.monotonic() + RANKS_TIMEOUT
    while not ranks.join(timeout=5):   # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {RANKS_TIMEOUT} s")
    return root


def _single(tmp_path, name: str, batch_size: int):
    cfg, encoder, n_train = SCENARIOS[name]
    model = _model(encoder)
    history = train(model, _data(n_train), replace(cfg, batch_size=batch_size), tmp_path / "out",
                    tmp_path / "state", progress=False)
    return history, model.state_dict()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow  # shares the 2-process run (~10 s)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_gradient_equals_the_single_process_gradient(ddp_runs, name):
    """The loss scaled by the world size, averaged by DDP: the gradient of one process with the whole batch."""
    cfg, encoder, n_train = SCENARIOS[name]
    ranks = [torch.load(ddp_runs / name / f"grads{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _first_step_grads(_model(encoder), cfg, _data(n_train))
    assert ranks[0].keys() == ranks[1].keys() == ref.keys()
    worst = 0.0
    for k in ref:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # all-reduced: bit-identical on every rank
        # relative to the tensor's largest entry; a tensor whose gradient is all rounding noise (the
        # attention key bias: softmax ignores a shift) is held to 1e-9 absolute
        scale = max(float(ref[k].abs().max()), 2e-5)
        worst = max(worst, float((ranks[0][k] - ref[k]).abs().max()) / scale)
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=0, atol=1e-4 * scale,
                                   msg=lambda m, k=k: f"{k}: {m}")
    print(f"{name}: worst gradient difference {worst:.1e} of the tensor's largest entry")
    # unscaled (DDP's plain average), the gradient would be half: the comparison can tell
    assert not torch.allclose(ranks[0]["query_model.embeddings.word_embeddings.weight"] / WORLD,
                              ref["query_model.embeddings.word_embeddings.weight"], rtol=1e-3, atol=0)


@pytest.mark.slow  # shares the 2-process run (~10 s)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_two_processes_equal_one_process_with_double_batch(ddp_runs, tmp_path, name):
    cfg, _, _ = SCENARIOS[name]
    ranks = [torch.load(ddp_runs / name / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ref_history, ref_weights = _single(tmp_path / "ref", name, WORLD * cfg.batch_size)

    # the replicas never drift apart: DDP gives both ranks the same gradient
    assert _max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    assert ranks[0]["history"] == ranks[1]["history"]  # rank 0's, broadcast

    got = ranks[0]["history"]
    assert [h["epoch"] for h in got] == [h["epoch"] for h in ref_history] == [0, 1, 2]
    losses, ref_losses = [h["loss"] for h in got[1:]], [h["loss"] for h in ref_history[1:]]
    print(f"{name}: losses 2 ranks {losses} vs 1 process {ref_losses}; "
          f"max weight difference {_max_diff(ranks[0]['weights'], ref_weights):.2e}")
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for h, r in zip(got, ref_history):
        assert h["val_ndcg@10"] == pytest.approx(r["val_ndcg@10"], abs=1e-6)
    for k in ref_weights:
        torch.testing.assert_close(ranks[0]["weights"][k], ref_weights[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")

    # rank 0 wrote the best checkpoint, the same as the single process's
    best, meta = DualEncoder.load(str(ddp_runs / name / "out"))
    ref_best, ref_meta = DualEncoder.load(str(tmp_path / "ref" / "out"))
    assert meta["epoch"] == ref_meta["epoch"]
    assert _max_diff(best.state_dict(), ref_best.state_dict()) < TOL["atol"]

    # and the comparison can tell: one process with the per-rank batch trains differently
    _, small_weights = _single(tmp_path / "small", name, cfg.batch_size)
    assert _max_diff(small_weights, ref_weights) > 10 * TOL["atol"]


@pytest.mark.slow  # shares the 2-process run (~10 s)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ddp_reduces_each_gradient_bucket_once_per_optimiser_step(ddp_runs, name):
    """Micro-batches and gradient caching's chunks backpropagate under no_sync but the last."""
    for r in range(WORLD):
        buckets = json.loads((ddp_runs / name / f"reductions{r}.json").read_text())
        assert buckets and sorted(buckets) == list(range(len(buckets))), (r, buckets)


@pytest.mark.slow  # shares the 2-process run (~10 s)
def test_ddp_gradient_caching_equals_the_uncached_single_process_gradient(ddp_runs):
    """Dropout is off, so gradient caching changes nothing but float rounding, across ranks too."""
    cfg, encoder, n_train = SCENARIOS["cached"]
    got = torch.load(ddp_runs / "cached" / "grads0.pt", weights_only=True)
    ref = _first_step_grads(_model(encoder), replace(cfg, grad_cache_chunk=0), _data(n_train))
    assert got.keys() == ref.keys()
    worst = max(float((got[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 2e-5) for k in ref)
    print(f"cached, 2 ranks vs uncached, 1 process: max abs gradient difference "
          f"{max(float((got[k] - ref[k]).abs().max()) for k in ref):.1e}, relative {worst:.1e}")
    assert worst < 1e-4


@pytest.mark.slow  # shares the 2-process run (~10 s)
def test_ddp_state_resumes_only_at_the_same_world_size(ddp_runs):
    cfg, encoder, n_train = SCENARIOS["uneven"]
    assert list((ddp_runs / "uneven" / "state").iterdir()) == []   # a finished run leaves no state
    fp = _fingerprint(cfg, _model(encoder), _data(n_train), WORLD)
    last = ddp_runs / "uneven-killed" / "state" / fp / "last"   # the interrupted run's, in its fingerprint's folder
    state = torch.load(last / "trainer.pt", weights_only=True)
    assert len(state["torch_rng_ranks"]) == WORLD  # each rank's RNG, for an exact resume
    progress = json.loads((last / "progress.json").read_text())
    assert progress["fingerprint"] == fp
    assert _fingerprint(cfg, _model(encoder), _data(n_train), 1) != fp


# ---------------------------------------------------------------- single-process pieces


def test_single_process_is_a_world_of_one(monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched() and not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.ones(2, 3, requires_grad=True)
    assert distributed.gather_with_grad(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(5) == [5]
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert distributed.launched() and not distributed.init_from_env()  # torchrun with one process


def test_backend_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend() == "gloo" and distributed.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert distributed.backend() == "nccl"


@pytest.mark.parametrize("n, parts, want", [
    (7, 2, [(0, 4), (4, 7)]),
    (4, 2, [(0, 2), (2, 4)]),
    (1, 2, [(0, 1), (1, 1)]),
    (5, 1, [(0, 5)]),
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),
])
def test_split_even(n, parts, want):
    assert distributed.split_even(n, parts) == want


def test_gathered_order_puts_columns_back_in_single_process_order():
    q = Query("q", "x")
    # question i brings positive 10*i and negatives 10*i+1..; ranks hold questions [0, 1] and [2]
    batch = [(q, 0, [1]), (q, 10, [11, 12]), (q, 20, [21])]
    bounds = [(0, 2), (2, 3)]
    gathered = [0, 10, 1, 11, 12, 20, 21]  # rank 0's positives and negatives, then rank 1's
    cols = [0, 10, 20, 1, 11, 12, 21]       # _columns(batch): all positives, then all negatives
    order = gathered_order(batch, bounds)
    assert [gathered[i] for i in order] == cols
    # an empty slice contributes nothing
    assert gathered_order(batch[:1], [(0, 1), (1, 1)]) == [0, 1]


def test_torchrun_command_stays_on_loopback():
    cmd = distributed.torchrun_command("stages/train.py", ["--out", "m"], 4, port=29511)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--master-addr=127.0.0.1" in cmd and "--master-port=29511" in cmd
    assert cmd[-3:] == ["stages/train.py", "--out", "m"]
