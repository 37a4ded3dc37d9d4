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

Gradient caching (`train.grad_cache_chunk`): peak RSS and questions/s of training steps at
batch 32, 128 and 256 with chunks of 32, beside batch 32 and 128 without caching, each in a
fresh process (`grad_cache_child`) so one configuration's peak does not hide another's. A
configuration runs one warm-up step of 32 questions (same chunking: the kernels of its shapes),
then `repeats` steps (at most 2 above 32 questions) over distinct training questions
(`train.step_gradients`, as the train stage runs it; the default precision); the figures are the
median step and the process's peak RSS (VmHWM), also above its RSS once model and data are loaded.

The step's parts (`step_parts`, run on its own: `python bench/train_bench.py --step-parts`):
seconds per training step as the train stage runs it (`FastDropout`, fused AdamW), with PyTorch's
dropout modules, and with those and its unfused AdamW; alternating, medians over `repeats` runs.

Cheaper steps (`cheaper_steps`, run on its own: `python bench/train_bench.py --cheaper-steps`):
seconds per train-stage step with `train.detach_negatives` (the hard negatives encoded without a
graph), `train.frozen_layers` 0 to 3 (the passage encoder's embeddings and bottom layers not
trained), both, or passages cut at 192 tokens, against params.yaml's step; alternating, medians
over `repeats` runs.

The attention kernel (`attention_kernel`, run on its own: `python bench/train_bench.py
--attention-kernel`): seconds per train-stage step and peak RSS with Hugging Face's `sdpa`
attention (PyTorch's fused kernel) against `eager` (unfused; what `model.attention: auto` picks on
a CPU), each run in a fresh process, alternating, medians over `repeats` runs.

Attention dropout (`attention_dropout`, run on its own: `python bench/train_bench.py
--attention-dropout [--rate 0]`): seconds per training step at the rate given (default 0) against
the model's own rate, the default precision, alternating, medians over `repeats` runs.
Dropout inside attention draws one random number per attention weight and keeps PyTorch from
its fused attention kernel; at 0 that kernel runs.

The float32 head (`head_precision`, run on its own: `python bench/train_bench.py --head-precision`):
training questions/s (the steps above, default precision) and encoding passages/s (`encode_texts`
on encode_bench's passage sample) with the pooling, normalisation, similarity and loss in float32,
as dprpipe runs them, against `previous_head` (the same functions left to autocast, as before),
the two alternating, each a median over `repeats` short runs, with the load average at each run;
and the similarity and loss alone (forward and backward, one step's shapes), microseconds per call.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import replace
from unittest import mock
from pathlib import Path

import torch
from measure import alternating, child, section_config

# (questions per batch, grad_cache_chunk): 0 = no caching, the reference
GRAD_CACHE_CONFIGS = ((32, 0), (32, 32), (128, 32), (256, 32), (128, 0))


def _steps(precision: str, data, cfg, enc_cfg, n_steps: int, fast_dropout: bool = True,
           fused_adamw: bool = True) -> dict:
    """`n_steps` timed steps after a warm-up; as the train stage runs them, or (`fast_dropout`,
    `fused_adamw` False) with PyTorch's dropout modules or its unfused AdamW."""
    from dprpipe.model import DualEncoder, autocast, use_fast_dropout
    from dprpipe.loss import batch_loss
    from dprpipe.train import adamw, epoch_batches, freeze_bottom, seed_everything

    seed_everything(cfg.seed)
    model, _ = DualEncoder.load(enc_cfg.model, replace(enc_cfg, precision=precision),
                                attention_dropout=cfg.attention_dropout)
    if fast_dropout:
        use_fast_dropout(model)
    freeze_bottom(model.passage_model, cfg.frozen_layers)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = (adamw(trained, lr=cfg.lr, weight_decay=cfg.weight_decay) if fused_adamw else
           torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay))
    pid_index = {p.id: i for i, p in enumerate(data.corpus)}
    batches = epoch_batches(data, cfg, 0, pid_index)[:n_steps + 1]
    dev = next(model.parameters()).device
    seconds, losses = [], []
    for batch in batches:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(model.cfg, dev):
            loss = batch_loss(model, batch, data.corpus, pid_index, cfg.temperature, cfg.passage_max_length,
                              cfg.detach_negatives)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed_s = seconds[1:]  # the first step warms up allocators and kernels
    median = sorted(timed_s)[len(timed_s) // 2]
    return {"step_s": timed_s, "warmup_s": seconds[0], "median_step_s": median,
            "questions_per_s": cfg.batch_size / median, "losses": losses}


def grad_cache_child(data: str, negatives: str, batch_size: int, chunk: int, steps: int,
                     attention: str | None = None) -> dict:
    """Runs in a fresh process: `steps` training steps of `batch_size` questions, caching in `chunk`s,
    both encoders' attention computed by Hugging Face's `attention` implementation (None: the
    `model` params')."""
    from measure import load_average, peak_rss_bytes, rss_bytes

    from dprpipe.loss import step_gradients
    from dprpipe.model import DualEncoder, EncoderConfig, use_fast_dropout, uses_bf16
    from dprpipe.model import attention_kernel as attention_kernel_of
    from dprpipe.prepare import read_dataset
    from dprpipe.train import TrainConfig, TrainData, adamw, epoch_batches, seed_everything

    enc_cfg = section_config(EncoderConfig, "model")
    if attention:
        enc_cfg = replace(enc_cfg, attention=attention)
    cfg = replace(section_config(TrainConfig, "train"), batch_size=batch_size, grad_cache_chunk=chunk,
                  grad_accumulation=1)
    ds = read_dataset(data)
    data_ = TrainData(corpus=ds.corpus, train=[q for q in ds.splits["train"] if q.positives], dev=[],
                      negatives=json.loads(Path(negatives).read_text()))
    seed_everything(cfg.seed)
    model, _ = DualEncoder.load(enc_cfg.model, enc_cfg, attention_dropout=cfg.attention_dropout)
    use_fast_dropout(model)
    model.train()
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pid_index = {p.id: i for i, p in enumerate(data_.corpus)}
    warmup = epoch_batches(data_, replace(cfg, batch_size=min(32, batch_size)), 1, pid_index)[0]
    batches = [b for b in epoch_batches(data_, cfg, 0, pid_index) if len(b) == batch_size][:steps]
    if len(batches) < steps:
        raise ValueError(f"{len(data_.train)} training questions give {len(batches)} batches of {batch_size}")
    baseline = rss_bytes()
    load0 = load_average()[0]
    seconds, losses = [], []
    for batch in [warmup, *batches]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_gradients(model, None, [batch], data_.corpus, pid_index, cfg)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    timed_s = seconds[1:]
    median = sorted(timed_s)[len(timed_s) // 2]
    peak = peak_rss_bytes()
    return {"batch_size": batch_size, "grad_cache_chunk": chunk, "attention": attention_kernel_of(enc_cfg),
            "steps_timed": steps,
            "texts_per_step": batch_size * (2 + cfg.hard_negatives), "step_s": timed_s, "warmup_s": seconds[0],
            "median_step_s": median, "questions_per_s": batch_size / median, "losses": losses[1:],
            "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak / 2**20,
            "peak_above_baseline_mb": max(0, peak - baseline) / 2**20, "load": [load0, load_average()[0]],
            "uses_bf16": uses_bf16(enc_cfg, torch.device("cpu")),
            "torch_threads": torch.get_num_threads()}


def grad_cache(data: str, quick: bool, repeats: int, negatives: dict) -> dict:
    """Each of `GRAD_CACHE_CONFIGS` (quick: batches of 4 and 8, chunks of 4) in its own process.

    Batches above 32 questions time min(repeats, 2) steps: one such step already runs 8 to 16 chunks
    of each kind twice (an average in itself), and 3 steps of 256 would be most of the section's time.
    The CPU and the load are recorded with the figures (they may be merged into an earlier run's results).
    """
    from measure import busy_processes, cpu_model, load_average

    configs = ((4, 0), (4, 4), (8, 4)) if quick else GRAD_CACHE_CONFIGS
    load0 = load_average()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "negatives.json"
        path.write_text(json.dumps(negatives))
        runs = [child("train_bench", "grad_cache_child", data=data, negatives=str(path), batch_size=b, chunk=c,
                      steps=1 if quick else repeats if b <= 32 else min(repeats, 2))
                for b, c in configs]
    return {"cpu": cpu_model(), "configs": runs,
            "load": {"start": load0, "end": load_average()[0], "others_busy_at_end": busy_processes()}}


def _mined(ds) -> tuple[list, dict[str, list[str]]]:
    """The judged training questions and their BM25 negatives (params.yaml's `mine` settings)."""
    from dprpipe.mine import MineConfig, Miner

    train = [q for q in ds.splits["train"] if q.positives]
    miner = Miner(ds.corpus, section_config(MineConfig, "mine"))
    return train, {qid: [d for d, _ in hits] for qid, hits in miner.negatives(train).items()}


def _first_batches(data: str, n_batches: int):
    """params.yaml's model and train settings, and training data of the first `n_batches` batches
    of judged training questions with their BM25 negatives."""
    from dprpipe.model import EncoderConfig
    from dprpipe.prepare import read_dataset
    from dprpipe.train import TrainConfig, TrainData

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    ds = read_dataset(data)
    all_train, negatives = _mined(ds)
    return enc_cfg, cfg, TrainData(corpus=ds.corpus, train=all_train[:cfg.batch_size * n_batches], dev=[],
                                   negatives=negatives)


def _step_setup(enc_cfg, cfg) -> dict:
    """What a step timing depends on besides the code: CPU, threads, precision, attention kernel, step shape."""
    from measure import cpu_model

    from dprpipe.model import attention_kernel as attention_kernel_of
    from dprpipe.model import uses_bf16

    return {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "uses_bf16": uses_bf16(enc_cfg, torch.device("cpu")), "attention": attention_kernel_of(enc_cfg),
            "attention_dropout": cfg.attention_dropout,
            "batch_size": cfg.batch_size, "hard_negatives": cfg.hard_negatives,
            "passage_max_length": cfg.passage_max_length}


def grad_cache_section(data: str, quick: bool, repeats: int) -> dict:
    """`grad_cache` on its own, e.g. to add its figures to an earlier run's results."""
    from dprpipe.prepare import read_dataset

    return grad_cache(data, quick, repeats, _mined(read_dataset(data))[1])


def run(data: str, quick: bool, repeats: int) -> dict:
    from dprpipe.prepare import read_dataset
    from dprpipe.model import EncoderConfig, uses_bf16
    from dprpipe.train import TrainConfig, TrainData

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    if quick:
        cfg = replace(cfg, batch_size=4)
    ds = read_dataset(data)
    n_steps = 1 if quick else repeats
    all_train, negatives = _mined(ds)
    train = all_train[:cfg.batch_size * (n_steps + 1)]
    data_ = TrainData(corpus=ds.corpus, train=train, dev=[], negatives=negatives)

    fp32 = _steps("fp32", data_, cfg, enc_cfg, n_steps)
    default = _steps(enc_cfg.precision, data_, cfg, enc_cfg, n_steps)
    return {
        "batch_size": cfg.batch_size, "hard_negatives": cfg.hard_negatives,
        "passage_max_length": cfg.passage_max_length, "steps_timed": n_steps,
        "default_precision": enc_cfg.precision,
        "default_uses_bf16": uses_bf16(enc_cfg, torch.device("cpu")),
        "fp32": fp32, "default": default,
        "ratio": default["questions_per_s"] / fp32["questions_per_s"],
        "same_losses": fp32["losses"] == default["losses"],
        "grad_cache": grad_cache(data, quick, repeats, negatives),
    }


def attention_dropout(data: str, repeats: int, rate: float = 0.0) -> dict:
    """Training steps (the default precision) at attention-dropout `rate` ("configured") against the
    model's own rate (None), the two alternating `repeats` times; each run one warm-up and 2 timed steps."""
    enc_cfg, cfg, data_ = _first_batches(data, 3)
    settings = {"configured": rate, "model's own": None}
    runs, median = alternating({
        name: lambda setting=setting: _steps(enc_cfg.precision, data_, replace(cfg, attention_dropout=setting),
                                             enc_cfg, 2)
        for name, setting in settings.items()}, repeats, "median_step_s")
    return {**_step_setup(enc_cfg, cfg), "settings": settings, "runs": runs, "median_step_s": median,
            "speedup": median["model's own"] / median["configured"]}


# (FastDropout, fused AdamW): the train stage's step, then each part undone
STEP_KINDS = {"train stage": (True, True), "PyTorch dropout": (False, True),
              "PyTorch dropout, unfused AdamW": (False, False)}


def step_parts(data: str, repeats: int) -> dict:
    """Training steps (default precision) as the train stage runs them, with PyTorch's dropout
    modules, and with those and the unfused AdamW (the step before `FastDropout` and the fused
    optimiser); the three alternate `repeats` times, each run one warm-up and 2 timed steps."""
    enc_cfg, cfg, data_ = _first_batches(data, 3)
    runs, median = alternating({
        name: lambda fast=fast, fused=fused: _steps(enc_cfg.precision, data_, cfg, enc_cfg, 2, fast_dropout=fast,
                                                    fused_adamw=fused)
        for name, (fast, fused) in STEP_KINDS.items()}, repeats, "median_step_s")
    return {**_step_setup(enc_cfg, cfg), "runs": runs, "median_step_s": median,
            "speedup": median["PyTorch dropout, unfused AdamW"] / median["train stage"]}


# train-section overrides of the cheaper steps, against the configured step ("params.yaml"); each names
# its frozen layers, so a row means the same step whatever params.yaml's default is
CHEAPER_STEPS = {"params.yaml": {}, "frozen_layers 0": {"frozen_layers": 0},
                 "frozen_layers 1": {"frozen_layers": 1}, "frozen_layers 2": {"frozen_layers": 2},
                 "frozen_layers 3": {"frozen_layers": 3},
                 "detach_negatives, frozen_layers 0": {"detach_negatives": True, "frozen_layers": 0},
                 "detach_negatives, frozen_layers 2": {"detach_negatives": True, "frozen_layers": 2},
                 "passage_max_length 192, frozen_layers 0": {"passage_max_length": 192, "frozen_layers": 0}}


def cheaper_steps(data: str, repeats: int) -> dict:
    """Train-stage steps (default precision) with the hard negatives encoded without a graph, the passage
    encoder's bottom layers frozen, or shorter passages, against params.yaml's step; alternating
    `repeats` times, each run one warm-up and 2 timed steps."""
    enc_cfg, cfg, data_ = _first_batches(data, 3)
    runs, median = alternating({
        name: lambda over=over: _steps(enc_cfg.precision, data_, replace(cfg, **over), enc_cfg, 2)
        for name, over in CHEAPER_STEPS.items()}, repeats, "median_step_s")
    return {**_step_setup(enc_cfg, cfg), "runs": runs, "median_step_s": median,
            "speedup": {name: median["params.yaml"] / m for name, m in median.items()}}


ATTENTION_KERNELS = ("sdpa", "eager")   # Hugging Face's attn_implementation: fused, unfused (auto's on a CPU)


def attention_kernel(data: str, repeats: int, steps: int = 2) -> dict:
    """Train-stage steps with PyTorch's fused attention (sdpa) against the unfused one (eager, what
    `auto` picks on a CPU: the attention matrix built and soft-maxed op by op, and kept for the backward), each
    run in its own process (`grad_cache_child`, no caching), alternating `repeats` times."""
    from dprpipe.model import EncoderConfig
    from dprpipe.prepare import read_dataset
    from dprpipe.train import TrainConfig

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "negatives.json"
        path.write_text(json.dumps(_mined(read_dataset(data))[1]))
        runs, median = alternating({
            kernel: lambda kernel=kernel: child("train_bench", "grad_cache_child", data=data, negatives=str(path),
                                                batch_size=cfg.batch_size, chunk=0, steps=steps, attention=kernel)
            for kernel in ATTENTION_KERNELS}, repeats, "median_step_s")
    setup = _step_setup(enc_cfg, cfg)
    del setup["attention"]   # both were measured
    return {**setup, "steps": steps, "runs": runs, "median_step_s": median,
            "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in rs) for k, rs in runs.items()},
            "speedup": median["sdpa"] / median["eager"]}


@contextlib.contextmanager
def previous_head():
    """dprpipe with pooling, normalisation, similarity and loss as autocast leaves them (the similarity
    matmul in bf16, the pooling in the hidden states' dtype): the baseline of the float32 head."""
    import torch.nn.functional as F

    from dprpipe import loss, model

    def pool(hidden, mask, pooling):
        if pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def encode(self, encoder, batch):
        dev = next(encoder.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        v = pool(encoder(**batch).last_hidden_state, batch["attention_mask"], self.cfg.pooling).float()
        return F.normalize(v, dim=-1) if self.cfg.normalize else v

    def compute_loss(scores, targets, mask=None, temperature=1.0):
        scores = scores.float() / temperature
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return F.cross_entropy(scores, targets)

    with mock.patch.object(model.DualEncoder, "_encode", encode), \
            mock.patch.object(loss, "compute_similarity", lambda q, p: q @ p.T), \
            mock.patch.object(loss, "compute_loss", compute_loss):
        yield


def head_precision(data: str, repeats: int, steps: int = 2, passages: int = 128) -> dict:
    """Training questions/s and encoding passages/s with the float32 head and with `previous_head`.

    Each run: `steps` timed training steps after a warm-up (`_steps`, a fresh model each run), or one
    `encode_texts` of `passages` passages after a one-batch warm-up. The two heads alternate, run
    after run, so a change in the load hits both alike.
    """
    from encode_bench import sample_passages
    from measure import cpu_model, load_average, timed

    from dprpipe.encode import encode_texts
    from dprpipe.model import DualEncoder, EncoderConfig, autocast, uses_bf16, passage_texts
    from dprpipe.prepare import read_dataset
    from dprpipe.train import TrainConfig, TrainData

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    ds = read_dataset(data)
    all_train, negatives = _mined(ds)
    data_ = TrainData(corpus=ds.corpus, train=all_train[:cfg.batch_size * (steps + 1)], dev=[], negatives=negatives)
    heads = {"fp32": contextlib.nullcontext, "previous": previous_head}
    out = {"cpu": cpu_model(), "uses_bf16": uses_bf16(enc_cfg, torch.device("cpu")),
           "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size, "hard_negatives": cfg.hard_negatives, "steps": steps, "passages": passages,
        "train": {h: [] for h in heads}, "encode": {h: [] for h in heads}}
    for _ in range(repeats):
        for head, ctx in heads.items():
            load = load_average()[0]
            with ctx():
                r = _steps(enc_cfg.precision, data_, cfg, enc_cfg, steps)
            out["train"][head].append({"questions_per_s": r["questions_per_s"], "losses": r["losses"],
                                       "load": [load, load_average()[0]]})

    model, _ = DualEncoder.load(enc_cfg.model, enc_cfg)
    # the similarity and loss alone (forward and backward) at one step's shapes: the part the heads differ in
    q = torch.randn(cfg.batch_size, model.dim, requires_grad=True)
    p = torch.randn(cfg.batch_size * (1 + cfg.hard_negatives), model.dim, requires_grad=True)
    targets = torch.arange(cfg.batch_size)

    def loss_head(iterations=200):
        from dprpipe import loss

        for _ in range(iterations):
            with autocast(enc_cfg, torch.device("cpu")):
                value = loss.compute_loss(loss.compute_similarity(q, p), targets, None, cfg.temperature)
            value.backward()
        return iterations

    out["loss_head_us"] = {}
    for head, ctx in heads.items():
        with ctx():
            loss_head(20)
            t, n = timed(loss_head, repeats)
        out["loss_head_us"][head] = t.median / n * 1e6

    batch_size = 32
    texts = passage_texts(sample_passages(ds, "test" if "test" in ds.splits else next(iter(ds.splits)), passages),
                          enc_cfg.use_title)
    emb = {}
    for _ in range(repeats):
        for head, ctx in heads.items():
            with ctx():
                encode_texts(model, texts[:batch_size], "passage", batch_size)   # warm-up
                load = load_average()[0]
                t0 = time.perf_counter()
                emb[head] = encode_texts(model, texts, "passage", batch_size)
                seconds = time.perf_counter() - t0
            out["encode"][head].append({"passages_per_s": len(texts) / seconds, "load": [load, load_average()[0]]})
    out["encode_max_abs_difference"] = float(abs(emb["fp32"] - emb["previous"]).max())
    pairs = zip(out["train"]["fp32"], out["train"]["previous"])
    out["train_max_loss_difference"] = max(abs(a - b) for new, old in pairs
                                           for a, b in zip(new["losses"], old["losses"]))
    for kind, key in (("train", "questions_per_s"), ("encode", "passages_per_s")):
        med = {h: sorted(r[key] for r in runs)[len(runs) // 2] for h, runs in out[kind].items()}
        out[f"{kind}_median"] = med
        out[f"{kind}_ratio"] = med["fp32"] / med["previous"]
    return out


if __name__ == "__main__":
    import argparse

    from measure import DEFAULT_DATA, table

    p = argparse.ArgumentParser(description="one training measurement run on its own (see the module docstring)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--head-precision", action="store_true", help="the float32 head's speed cost")
    what.add_argument("--attention-dropout", action="store_true",
                      help="step time at attention dropout --rate against the model's own rate")
    what.add_argument("--attention-kernel", action="store_true",
                      help="steps with the fused attention (sdpa) against the unfused one (eager), with peak RSS")
    what.add_argument("--step-parts", action="store_true",
                      help="the stage's step against PyTorch's dropout modules and unfused AdamW")
    what.add_argument("--cheaper-steps", action="store_true",
                      help="steps with detached negatives, frozen bottom layers or shorter passages")
    p.add_argument("--rate", type=float, default=0.0, help="--attention-dropout's rate (default: 0)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.attention_dropout:
        res = attention_dropout(args.data, args.repeats, args.rate)
    elif args.attention_kernel:
        res = attention_kernel(args.data, args.repeats)
    elif args.step_parts:
        res = step_parts(args.data, args.repeats)
    elif args.cheaper_steps:
        res = cheaper_steps(args.data, args.repeats)
    else:
        res = head_precision(args.data, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")

    def print_steps(column: str, labels: dict[str, str], shape: str, runs: str) -> None:
        """The header and the table of an `alternating` section: a row per kind, labelled by `labels`."""
        rss = "peak_rss_mb" in res
        print(f"{res['cpu']}, {res['torch_threads']} torch threads, bf16 autocast: {res['uses_bf16']}; batch "
              f"{res['batch_size']} questions + {res['hard_negatives']} hard negative(s), passages at "
              f"{res['passage_max_length']} tokens{shape}; medians of {args.repeats} runs of {runs}")
        print(table([column, "s/step", "questions/s", *(["peak RSS MB"] if rss else []), "s/step per run",
                     "load (1 min) per run"], [
            [label, res["median_step_s"][name], res["batch_size"] / res["median_step_s"][name],
             *([res["peak_rss_mb"][name]] if rss else []),
             ", ".join(f"{r['median_step_s']:.2f}" for r in res["runs"][name]),
             ", ".join("-".join(f"{v:.1f}" for v in r["load"]) for r in res["runs"][name])]
            for name, label in labels.items()]))

    dropout = f", attention dropout {res.get('attention_dropout')}"
    if args.attention_dropout:
        print_steps("attention dropout", {name: f"{name} ({rate})" for name, rate in res["settings"].items()},
                    "", "2 steps")
        print(f"speed-up of the configured rate: {res['speedup']:.2f}x")
        raise SystemExit(0)
    if args.attention_kernel:
        print_steps("attention", {k: k for k in ATTENTION_KERNELS}, dropout,
                    f"{res['steps']} steps, each run in its own process")
        print(f"speed-up of eager over sdpa: {res['speedup']:.2f}x")
        raise SystemExit(0)
    if args.step_parts:
        print_steps("step", {name: name for name in STEP_KINDS}, dropout, "2 steps")
        print(f"speed-up of the train stage's step: {res['speedup']:.2f}x")
        raise SystemExit(0)
    if args.cheaper_steps:
        print_steps("step", {name: name for name in CHEAPER_STEPS}, dropout, "2 steps")
        print("speed-up over params.yaml's step: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["speedup"].items()))
        raise SystemExit(0)
    loads = lambda runs: ", ".join("-".join(f"{v:.1f}" for v in r["load"]) for r in runs)  # noqa: E731
    print(f"{res['cpu']}, {res['torch_threads']} torch threads, bf16 autocast: {res['uses_bf16']}; "
          f"medians of {args.repeats} runs")
    print(table(["measure", "float32 head", "previous head", "ratio", "load (1 min) per run: fp32 | previous"], [
        [f"training questions/s (batch {res['batch_size']}, {res['steps']} steps)", res["train_median"]["fp32"],
         res["train_median"]["previous"], res["train_ratio"],
         f"{loads(res['train']['fp32'])} / {loads(res['train']['previous'])}"],
        [f"encoding passages/s ({res['passages']} passages)", res["encode_median"]["fp32"],
         res["encode_median"]["previous"], res["encode_ratio"],
         f"{loads(res['encode']['fp32'])} / {loads(res['encode']['previous'])}"]]))
    print(f"similarity + loss, forward and backward, {res['batch_size']} questions: "
          f"{res['loss_head_us']['fp32']:.0f} us float32, {res['loss_head_us']['previous']:.0f} us previous")
    print(f"largest step-loss difference {res['train_max_loss_difference']:.2e}; "
          f"largest embedding difference {res['encode_max_abs_difference']:.2e}")
