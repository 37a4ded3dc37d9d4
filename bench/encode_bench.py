"""Encoding: dprpipe's passage encoding against the plain fp32 loop, and against the CPU's peak.

Inputs: a BEIR dataset folder (a seeded sample of passages: the gold passages of test queries
first, so retrieval quality can be compared on it) and params.yaml's `model` and `encode`
sections (the default model, all-MiniLM-L6-v2, at `passage_max_length`).
Outputs (a dict, see `run`):
- passages/s of `encode.encode_texts` (length-sorted batches, bf16 autocast only where the
  CPU has native bf16) and of the naive loop (batches in corpus order, every one padded to
  max_length, fp32), with the ratio;
- forced bf16 autocast on a small subset, to show what it costs on a CPU without AMX;
- model FLOPs per passage, achieved GFLOPS and the fraction of this machine's fp32 GEMM peak
  measured in the same run;
- agreement of the embeddings: minimum cosine to the naive loop's, and nDCG@10 of the test
  queries over the sample with either set of embeddings.

The attention kernel (`attention_kernel`, run on its own: `python bench/encode_bench.py
--attention-kernel`): passages/s with PyTorch's fused attention (sdpa) against the unfused one
(eager, what `model.attention: auto` picks on a CPU), on the corpus's longest passages,
alternating, medians over `repeats` runs.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from measure import params_section, section_config, timed


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """Throughput of one (m x k) @ (k x n) matmul in `dtype` with torch's threads."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    t, _ = timed(lambda: a @ b, repeats, warmup=2)
    return 2 * m * k * n / t.median / 1e9


def gemm_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul throughput with torch's threads: the practical peak the encoder can reach."""
    return matmul_gflops(n, n, n, torch.float32, repeats)


def model_flops(lengths: np.ndarray, layers: int, hidden: int, ffn: int) -> float:
    """Forward FLOPs of a BERT encoder over sequences of these token lengths (multiply-add = 2).

    Per token and layer: Q, K, V and output projections 4*h^2 and the FFN 2*h*f multiply-adds;
    attention scores and the weighted sum add 2*L*h multiply-adds per token (4*L^2*h FLOPs).
    """
    lengths = lengths.astype(np.float64)
    dense = 2 * (4 * hidden**2 + 2 * hidden * ffn) * lengths
    attention = 4 * lengths**2 * hidden
    return float(layers * (dense + attention).sum())


@torch.inference_mode()
def naive_encode(model, texts: list[str], batch_size: int, max_length: int) -> np.ndarray:
    """The plain loop: corpus order, each batch padded to max_length, fp32, no autocast."""
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = model.tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length,
                                padding="max_length", return_tensors="pt")
        out.append(model.encode_passage(batch).numpy())
    return np.concatenate(out)


def sample_passages(ds, split: str, n: int, seed: int = 13):
    """Gold passages of the split's queries first (in query order), then random others."""
    gold, seen = [], set()
    for q in ds.splits[split]:
        for d in q.positives:
            if d not in seen and len(gold) < n:
                seen.add(d)
                gold.append(d)
    by_id = {p.id: p for p in ds.corpus}
    rest = [p.id for p in ds.corpus if p.id not in seen]
    random.Random(seed).shuffle(rest)
    ids = gold + rest[:max(0, n - len(gold))]
    return [by_id[i] for i in ids]


def ndcg_on_sample(q_emb: np.ndarray, p_emb: np.ndarray, queries, pids: list[str]) -> float:
    from dprpipe.evaluate import ndcg_at_k

    scores = q_emb @ p_emb.T
    out = []
    for i, q in enumerate(queries):
        ranked = [pids[j] for j in np.argsort(-scores[i], kind="stable")]
        out.append(ndcg_at_k(ranked, q.relevant, 10))
    return float(np.mean(out))


def run(data: str, quick: bool, repeats: int) -> dict:
    from dataclasses import replace

    from dprpipe.prepare import read_dataset
    from dprpipe.encode import encode_texts
    from dprpipe.model import DualEncoder, EncoderConfig, native_bf16, passage_texts

    enc_cfg = section_config(EncoderConfig, "model")
    batch_size = int((params_section("encode").get("batch_size")) or 32)
    model, _ = DualEncoder.load(enc_cfg.model, enc_cfg)
    mcfg = model.passage_model.config
    max_len = enc_cfg.passage_max_length

    ds = read_dataset(data)
    split = "test" if "test" in ds.splits else next(iter(ds.splits))
    # 128 passages x 3 runs x 2 paths is ~80 s here; the rate is steady well before that
    n = 16 if quick else 128
    passages = sample_passages(ds, split, n)
    texts = passage_texts(passages, enc_cfg.use_title)
    pids = [p.id for p in passages]

    # warm-up on one batch each (first-call allocations and kernel selection), then the timed runs
    encode_texts(model, texts[:batch_size], "passage", batch_size)
    naive_encode(model, texts[:batch_size], batch_size, max_len)
    t_ours, emb_ours = timed(lambda: encode_texts(model, texts, "passage", batch_size), repeats)
    t_naive, emb_naive = timed(lambda: naive_encode(model, texts, batch_size, max_len), repeats)

    # forced bf16 autocast (what `precision: bf16` does) on a few passages against fp32 on the same
    n_bf16 = 4 if quick else 8
    bf16_model = DualEncoder(model.query_model, model.passage_model, model.tokenizer,
                             replace(enc_cfg, precision="bf16"))
    fp32_model = DualEncoder(model.query_model, model.passage_model, model.tokenizer,
                             replace(enc_cfg, precision="fp32"))
    t_bf16, emb_bf16 = timed(lambda: encode_texts(bf16_model, texts[:n_bf16], "passage", batch_size),
                             repeats, warmup=1)
    t_fp32_small, emb_fp32_small = timed(lambda: encode_texts(fp32_model, texts[:n_bf16], "passage", batch_size),
                                         repeats, warmup=1)

    lengths = np.array([len(x) for x in model.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]])
    useful = model_flops(lengths, mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.intermediate_size)
    padded = model_flops(np.full(len(texts), max_len), mcfg.num_hidden_layers, mcfg.hidden_size,
                         mcfg.intermediate_size)
    # ours pads each length-sorted batch to its longest member: the FLOPs it actually runs
    order = np.argsort(-lengths, kind="stable")
    ours_run = sum(model_flops(np.full(len(order[s:s + batch_size]), lengths[order[s]]), mcfg.num_hidden_layers,
                               mcfg.hidden_size, mcfg.intermediate_size)
                   for s in range(0, len(texts), batch_size))
    peak = gemm_peak_gflops(1024 if quick else 2048, repeats + 2)

    # quality: cosine to the naive fp32 embeddings; nDCG@10 of the queries whose gold is all in the sample
    cos = np.sum(emb_ours * emb_naive, axis=1) / (np.linalg.norm(emb_ours, axis=1) * np.linalg.norm(emb_naive, axis=1))
    in_sample = set(pids)
    queries = [q for q in ds.splits[split] if q.positives and all(d in in_sample for d in q.positives)]
    q_emb = encode_texts(model, [q.text for q in queries], "query", batch_size) if queries else None
    ndcg_ours = ndcg_on_sample(q_emb, emb_ours, queries, pids) if queries else None
    ndcg_naive = ndcg_on_sample(q_emb, emb_naive, queries, pids) if queries else None
    cos_bf16 = np.sum(emb_bf16 * emb_fp32_small, axis=1) / (
        np.linalg.norm(emb_bf16, axis=1) * np.linalg.norm(emb_fp32_small, axis=1))

    ours_ps, naive_ps = len(texts) / t_ours.median, len(texts) / t_naive.median
    return {
        "passages": len(texts), "batch_size": batch_size, "max_length": max_len,
        "precision_auto_is_bf16": native_bf16(torch.device("cpu")),
        "mean_tokens": float(lengths.mean()), "share_at_max_length": float((lengths >= max_len).mean()),
        "ours_s": t_ours.to_json(), "naive_s": t_naive.to_json(),
        "ours_passages_per_s": ours_ps, "naive_passages_per_s": naive_ps, "ratio": ours_ps / naive_ps,
        "bf16_passages": n_bf16, "bf16_s": t_bf16.to_json(), "fp32_small_s": t_fp32_small.to_json(),
        "bf16_slowdown": t_bf16.median / t_fp32_small.median,
        "bf16_min_cosine": float(cos_bf16.min()),
        "gflop_per_passage_useful": useful / len(texts) / 1e9,
        "gflop_per_passage_naive": padded / len(texts) / 1e9,
        "gemm_peak_gflops": peak,
        "ours_gflops_run": ours_run / t_ours.median / 1e9,
        "ours_gflops_useful": useful / t_ours.median / 1e9,
        "naive_gflops_run": padded / t_naive.median / 1e9,
        "naive_gflops_useful": useful / t_naive.median / 1e9,
        "ours_fraction_of_peak": ours_run / t_ours.median / 1e9 / peak,
        "naive_fraction_of_peak": padded / t_naive.median / 1e9 / peak,
        "min_cosine_vs_naive": float(cos.min()),
        "ndcg_queries": len(queries), "ndcg_ours": ndcg_ours, "ndcg_naive": ndcg_naive,
        "ndcg_diff": None if ndcg_ours is None else abs(ndcg_ours - ndcg_naive),
        "torch_threads": torch.get_num_threads(),
    }


def attention_kernel(data: str, repeats: int, n: int = 384) -> dict:
    """Passages/s of `encode_texts` with PyTorch's fused attention (sdpa) against the unfused one
    (eager, what `model.attention: auto` picks on a CPU), on the `n` longest passages of the
    dataset (most at `passage_max_length`), alternating `repeats` times, with the lowest cosine
    between the two kernels' embeddings. Both models live in one process: encoding keeps no graph,
    so neither's memory weighs on the other."""
    from dataclasses import replace

    from measure import alternating, cpu_model

    from dprpipe.encode import encode_texts
    from dprpipe.model import DualEncoder, EncoderConfig, passage_texts, uses_bf16
    from dprpipe.prepare import read_dataset

    enc_cfg = replace(section_config(EncoderConfig, "model"), shared=True)   # the query encoder is not used
    batch_size = int((params_section("encode").get("batch_size")) or 32)
    texts = sorted(passage_texts(read_dataset(data).corpus, enc_cfg.use_title), key=len, reverse=True)[:n]
    models = {kernel: DualEncoder.load(enc_cfg.model, replace(enc_cfg, attention=kernel))[0]
              for kernel in ("sdpa", "eager")}
    vectors = {}

    def encode(kernel: str) -> dict:
        t, v = timed(lambda: encode_texts(models[kernel], texts, "passage", batch_size), 1)
        vectors[kernel] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return {"passages_per_s": len(texts) / t.median}

    for model in models.values():   # first-call allocations and kernel selection
        encode_texts(model, texts[:batch_size], "passage", batch_size)
    runs, median = alternating({k: lambda k=k: encode(k) for k in models}, repeats, "passages_per_s")
    return {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "uses_bf16": uses_bf16(enc_cfg, torch.device("cpu")), "passages": len(texts),
            "batch_size": batch_size, "max_length": enc_cfg.passage_max_length, "runs": runs,
            "median_passages_per_s": median, "speedup": median["eager"] / median["sdpa"],
            "min_cosine": float(np.min(np.sum(vectors["eager"] * vectors["sdpa"], axis=1)))}


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    from measure import DEFAULT_DATA, table

    p = argparse.ArgumentParser(description="one encoding measurement on its own (bench/run.py runs `run`)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--attention-kernel", action="store_true",
                      help="passages/s with the fused attention (sdpa) against the unfused one (eager)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    res = attention_kernel(args.data, args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"{res['cpu']}, {res['torch_threads']} torch threads, bf16 autocast: {res['uses_bf16']}; the "
          f"{res['passages']} longest passages, batch {res['batch_size']}, at most {res['max_length']} tokens; "
          f"medians of {args.repeats} runs")
    print(table(["attention", "passages/s", "passages/s per run", "load (1 min) per run"], [
        [k, res["median_passages_per_s"][k], ", ".join(f"{r['passages_per_s']:.1f}" for r in rs),
         ", ".join(f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in rs)] for k, rs in res["runs"].items()]))
    print(f"eager / sdpa: {res['speedup']:.2f}x; lowest cosine between the two kernels' embeddings "
          f"{res['min_cosine']:.6f}")
