"""The compute floor of the default run: how fast its model stages could go on this CPU.

The default `dvc repro` spends almost all its time in three stages that run the encoder: the
base model's corpus encoding (`encode_zeroshot`, for dense negatives and the zero-shot
baseline), training, and the trained model's corpus encoding (`encode`). All three are matmuls
in bf16 where the CPU has it natively. This script counts their FLOPs and divides by the
fastest matmul torch runs here, at the model's own shapes and a square one: a floor for code
built on torch's matmuls. Below it, only less compute helps (fewer tokens, layers trained or
epochs).

Inputs: a BEIR dataset folder (default SciFact); params.yaml's `model`, `train` and `encode`
sections; `metrics/train.json` when present (the train stage's measured seconds).
Outputs (printed; with --json also a file):
- matmul GFLOPS in bf16 and fp32 at the model's shapes and 2048^3 (the peak is the best of them);
- per stage: TFLOPs, the floor at the peak, the measured seconds (train: metrics/train.json,
  checkpoint saves included; encoding: timed here on a sample and scaled to the corpus by
  FLOPs, without the stage's loading and writing), and the fraction of the peak;
- the floor of the three stages together beside the measured sum.

FLOPs per token and layer as `encode_bench.model_flops`; the backward pass costs twice the
forward of each trained layer (input and weight gradients; the lowest trained layer above frozen
ones needs no input gradient for its first projections, about 1% of training, counted anyway);
frozen layers (`train.frozen_layers`) run forward only. Padding is counted: a training batch
pads to its longest text, the mean longest of random batches of the training questions' or the
corpus's token lengths; encoding pads length-sorted batches to their first (longest) text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from encode_bench import matmul_gflops, model_flops
from measure import ROOT, params_section, section_config, timed


def padded_length(lengths: np.ndarray, batch: int, samples: int = 2000, seed: int = 13) -> float:
    """Mean longest length of `samples` random batches of `batch` texts: what a batch pads to."""
    rng = np.random.default_rng(seed)
    return float(rng.choice(lengths, size=(samples, min(batch, len(lengths)))).max(axis=1).mean())


def per_layer(length: float, count: int, hidden: int, ffn: int) -> float:
    """Forward FLOPs of one layer over `count` texts padded to `length` tokens."""
    return model_flops(np.full(count, length), 1, hidden, ffn)


def training_flops(n_questions: int, q_lengths: np.ndarray, p_lengths: np.ndarray, layers: int, hidden: int,
                   ffn: int, batch: int, hard_negatives: int, epochs: int, frozen: int, shared: bool) -> dict:
    """FLOPs of `epochs` epochs of in-batch training: a step of `b` questions encodes them and
    `b * (1 + hard_negatives)` passages, forward through every layer and backward through the
    trained ones (frozen layers are the passage encoder's, or both sides' when shared). An
    epoch is full batches of `batch` and a last, smaller one (none is dropped)."""
    q_trained = layers - (frozen if shared else 0)

    def step(b: int) -> float:
        q_layer = per_layer(padded_length(q_lengths, b), b, hidden, ffn)
        p_layer = per_layer(padded_length(p_lengths, b * (1 + hard_negatives)), b * (1 + hard_negatives), hidden, ffn)
        return q_layer * (layers + 2 * q_trained) + p_layer * (layers + 2 * (layers - frozen))

    full, last = divmod(n_questions, batch)
    full_step = step(batch)
    epoch = full * full_step + (step(last) if last else 0.0)
    return {"steps": math.ceil(n_questions / batch) * epochs, "query_tokens": padded_length(q_lengths, batch),
            "passage_tokens": padded_length(p_lengths, batch * (1 + hard_negatives)),
            "tflop_per_step": full_step / 1e12, "tflop": epoch * epochs / 1e12}


def encoding_flops(p_lengths: np.ndarray, layers: int, hidden: int, ffn: int, batch: int) -> float:
    """Forward FLOPs of encoding every passage in length-sorted batches padded to their longest."""
    ordered = np.sort(p_lengths)[::-1]
    return sum(model_flops(np.full(len(ordered[s:s + batch]), ordered[s]), layers, hidden, ffn)
               for s in range(0, len(ordered), batch))


def run(data: str, repeats: int, sample: int = 128) -> dict:
    from dprpipe.encode import encode_texts
    from dprpipe.model import DualEncoder, EncoderConfig, passage_texts, uses_bf16
    from dprpipe.prepare import read_dataset
    from dprpipe.train import TrainConfig

    enc_cfg = section_config(EncoderConfig, "model")
    cfg = section_config(TrainConfig, "train")
    batch_size = int(params_section("encode").get("batch_size") or 32)
    model, _ = DualEncoder.load(enc_cfg.model, enc_cfg)
    mc = model.passage_model.config
    layers, hidden, ffn = mc.num_hidden_layers, mc.hidden_size, mc.intermediate_size

    ds = read_dataset(data)
    texts = passage_texts(ds.corpus, enc_cfg.use_title)
    tokenize = model.tokenizer
    p_enc = np.array([len(x) for x in tokenize(texts, truncation=True,
                                               max_length=enc_cfg.passage_max_length)["input_ids"]])
    p_train = np.minimum(p_enc, cfg.passage_max_length)
    # the refit trains on every judged train question (dev too); without it, dev is held out
    questions = [q for q in ds.splits["train"] if q.positives]
    n_questions = len(questions) if cfg.include_dev else len(questions) - round(
        len(questions) * float(params_section("prepare").get("dev_fraction", 0.1)))
    q_lengths = np.array([len(x) for x in tokenize([q.text for q in questions], truncation=True,
                                                   max_length=enc_cfg.query_max_length)["input_ids"]])

    shapes = {"2048 x 2048 x 2048": (2048, 2048, 2048),
              f"8192 x {hidden} x {ffn} (FFN up)": (8192, hidden, ffn),
              f"8192 x {ffn} x {hidden} (FFN down)": (8192, ffn, hidden),
              f"8192 x {hidden} x {hidden} (projection)": (8192, hidden, hidden)}
    gemm = {dtype: {name: matmul_gflops(*s, getattr(torch, dtype), repeats) for name, s in shapes.items()}
            for dtype in ("bfloat16", "float32")}
    bf16 = uses_bf16(enc_cfg, torch.device("cpu"))
    peak = max(gemm["bfloat16" if bf16 else "float32"].values())

    train = training_flops(n_questions, q_lengths, p_train, layers, hidden, ffn, cfg.batch_size,
                           cfg.hard_negatives, cfg.epochs, cfg.frozen_layers, enc_cfg.shared)
    encode_tflop = encoding_flops(p_enc, layers, hidden, ffn, batch_size) / 1e12

    # encoding measured on the corpus's first `sample` passages, scaled to the corpus by FLOPs
    chosen = texts[:sample]
    encode_texts(model, chosen[:batch_size], "passage", batch_size)
    t, _ = timed(lambda: encode_texts(model, chosen, "passage", batch_size), repeats)
    sample_tflop = encoding_flops(p_enc[:sample], layers, hidden, ffn, batch_size) / 1e12
    encode_s = t.median * encode_tflop / sample_tflop

    metrics = ROOT / "metrics" / "train.json"
    train_s = json.loads(metrics.read_text()).get("train_seconds") if metrics.exists() else None
    stages = {"encode_zeroshot": (encode_tflop, encode_s), "train": (train["tflop"], train_s),
              "encode": (encode_tflop, encode_s)}
    rows = {name: {"tflop": tf, "floor_s": tf * 1e3 / peak, "measured_s": s,
                   "fraction_of_peak": None if s is None else tf * 1e3 / peak / s}
            for name, (tf, s) in stages.items()}
    measured = [r["measured_s"] for r in rows.values()]
    return {"bf16": bf16, "gemm_gflops": gemm, "peak_gflops": peak, "train": train,
            "corpus": len(texts), "corpus_mean_tokens": float(p_enc.mean()), "training_questions": n_questions,
            "encode_sample": sample, "encode_sample_s": t.to_json(), "stages": rows,
            "floor_s": sum(r["floor_s"] for r in rows.values()),
            "measured_s": None if None in measured else sum(measured)}


if __name__ == "__main__":
    import argparse

    from measure import DEFAULT_DATA, cpu_model, table

    p = argparse.ArgumentParser(description="the compute floor of the default run (see the module docstring)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    res = run(args.data, args.repeats)
    res["cpu"], res["torch_threads"] = cpu_model(), torch.get_num_threads()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['cpu']}, {res['torch_threads']} torch threads, bf16: {res['bf16']}; medians of {args.repeats} runs")
    print(table(["matmul (m x k x n)", "bf16 GFLOPS", "fp32 GFLOPS"],
                [[name, res["gemm_gflops"]["bfloat16"][name], res["gemm_gflops"]["float32"][name]]
                 for name in res["gemm_gflops"]["bfloat16"]]))
    tr = res["train"]
    print(f"\npeak {res['peak_gflops']:.0f} GFLOPS; corpus {res['corpus']:,} passages, {res['corpus_mean_tokens']:.0f} "
          f"tokens on average; training {res['training_questions']} questions, {tr['steps']} steps, "
          f"a full one {tr['tflop_per_step']:.2f} TFLOP (questions padded to {tr['query_tokens']:.0f} tokens, "
          f"passages to {tr['passage_tokens']:.0f})")
    print(table(["stage", "TFLOP", "floor s (at the peak)", "measured s", "of the peak"],
                [[name, r["tflop"], r["floor_s"], r["measured_s"],
                  "-" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.0%}"]
                 for name, r in res["stages"].items()]))
    total = f", measured {res['measured_s'] / 60:.1f} min" if res["measured_s"] else ""
    print(f"the three stages' floor: {res['floor_s'] / 60:.1f} min{total}")
