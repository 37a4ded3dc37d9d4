"""Training: questions/s of DPR training steps in fp32 and with the default settings.

Inputs: a BEIR dataset folder (train split; BM25 negatives mined here with params.yaml's
`mine` settings) and params.yaml's `model` and `train` sections (default model, batch size,
hard negatives, passage length, temperature, learning rate).
Outputs (a dict, see `run`): seconds per optimiser step (median over the timed steps, after
one warm-up step) and questions/s for `precision: fp32` and for the configured default
(`auto`: bf16 autocast only where the CPU has native bf16), what `auto` resolves to here, and
the step losses of both (equal losses mean the default runs the fp32 computation).

Each step is the train stage's: `train.epoch_batches` batches, `train.batch_loss` under the
configured autocast, backward, gradient clipping and an AdamW step.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from measure import section_config


def _steps(precision: str, data, cfg, enc_cfg, n_steps: int) -> dict:
    from dprpipe.model import DualEncoder, autocast
    from dprpipe.train import batch_loss, epoch_batches, seed_everything

    seed_everything(cfg.seed)
    model, _ = DualEncoder.load(enc_cfg.model, replace(enc_cfg, precision=precision))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pid_index = {p.id: i for i, p in enumerate(data.corpus)}
    batches = epoch_batches(data, cfg, 0, pid_index)[:n_steps + 1]
    dev = next(model.parameters()).device
    seconds, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(model.cfg, dev):
            loss = batch_loss(model, batch, data.corpus, pid_index, cfg.temperature, cfg.passage_max_length)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed_s = seconds[1:]  # the first step warms up allocators and kernels
    median = sorted(timed_s)[len(timed_s) // 2]
    return {"step_s": timed_s, "warmup_s": seconds[0], "median_step_s": median,
            "questions_per_s": cfg.batch_size / median, "losses": losses}


def run(data: str, quick: bool, repeats: int) -> dict:
    from dprpipe.prepare import read_dataset
    from dprpipe.mine import MineConfig, Miner
    from dprpipe.model import EncoderConfig, native_bf16
    from dprpipe.train import TrainConfig, TrainData

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    if quick:
        cfg = replace(cfg, batch_size=4)
    ds = read_dataset(data)
    n_steps = 1 if quick else repeats
    train = [q for q in ds.splits["train"] if q.positives][:cfg.batch_size * (n_steps + 1)]
    miner = Miner(ds.corpus, section_config(MineConfig, "mine"))
    negatives = {qid: [d for d, _ in hits] for qid, hits in miner.negatives(train).items()}
    data_ = TrainData(corpus=ds.corpus, train=train, dev=[], negatives=negatives)

    fp32 = _steps("fp32", data_, cfg, enc_cfg, n_steps)
    default = _steps(enc_cfg.precision, data_, cfg, enc_cfg, n_steps)
    return {
        "batch_size": cfg.batch_size, "hard_negatives": cfg.hard_negatives,
        "passage_max_length": cfg.passage_max_length, "steps_timed": n_steps,
        "default_precision": enc_cfg.precision,
        "default_uses_bf16": enc_cfg.precision == "bf16" or (enc_cfg.precision == "auto"
                                                              and native_bf16(torch.device("cpu"))),
        "fp32": fp32, "default": default,
        "ratio": default["questions_per_s"] / fp32["questions_per_s"],
        "same_losses": fp32["losses"] == default["losses"],
    }
