"""Peer: the stock sentence-transformers fine-tuning recipe on SciFact, scored by the project's evaluator.

What it measures: how far the library's own recipe gets from the same base model (the bundled
all-MiniLM-L6-v2) and the same training claims, so the project's training can be compared
with it on the same test split and the same metric code.

The recipe (sentence-transformers' documented one, not the project's):
  - one (claim, positive passage) pair per judged positive; passages are "title text";
  - one hard negative per pair from `sentence_transformers.util.mine_hard_negatives`, mined with
    the base model over the whole corpus (`range_max=30`, `sampling_strategy="random"`);
    `--hard-negatives 0` trains on the pairs alone (in-batch negatives only);
  - `SentenceTransformerTrainer` with `MultipleNegativesRankingLoss(scale=20)` (= temperature 0.05),
    `BatchSamplers.NO_DUPLICATES`, batch 32, lr 5e-5, 10% linear warm-up then linear decay,
    3 epochs, the trainer's defaults otherwise (weight decay 0, gradient clipping at norm 1.0),
    the model's own max_seq_length (256) for claims and passages alike, bf16 autocast where the
    project's `precision` setting (params.yaml `model.precision`, `auto` = native bf16 only)
    turns it on; the last epoch's weights are kept (no validation-based choice).

Data comes through the project's reader and checks (`dprpipe.data.prepare`): by default every
train claim (809 on SciFact, `dev_fraction` 0); with `--holdout` the project's own train/dev
split (params.yaml `prepare.dev_fraction` and `prepare.seed`, 728/81 on SciFact), and the dev
claims are then scored too: over the whole corpus, and on the train stage's validation pool
(dev positives + `train.val_negatives` BM25 negatives, `dprpipe.train.validate`), the figure
`metrics/train.json` reports as val_ndcg@10.

Scoring: the fine-tuned model encodes the corpus and the test claims (sentence-transformers'
`encode`, fp32); exact inner-product search gives a top-1000 run, which `dprpipe.evaluate`
scores with params.yaml's `evaluate` settings, alone and fused with the project's BM25 run
(params.yaml `mine` settings) as the evaluate stage's hybrid does.

Outputs: one record per (setting, seed) in the --out JSON (records of other settings and seeds
already there are kept), with nDCG@10, MRR@10, Recall@k, and the wall seconds of mining,
training and encoding, next to the CPU they were measured on. Printed as a table too.

    HF_HUB_OFFLINE=1 python bench/peer_st.py --seeds 13 14 15 --out bench/peer_st.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base model is a local folder: never the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from measure import DEFAULT_DATA, ROOT, load_average, machine, section_config

from dprpipe.prepare import PrepareConfig, prepare
from dprpipe.evaluate import EvaluateConfig, evaluate_runs
from dprpipe.io import Run, atomic_write
from dprpipe.mine import MineConfig, Miner
from dprpipe.model import EncoderConfig, passage_texts, resolve_model, uses_bf16
from dprpipe.records import Passage, Query
from dprpipe.search import hybrid_run
from dprpipe.train import TrainConfig

RUN_DEPTH = 1000  # as deep as the index stage's run: the hybrid fuses the same depth


def load_split(data: str, holdout: bool) -> tuple[list[Passage], list[Query], list[Query], list[Query]]:
    """corpus, train, dev (empty without --holdout) and test, through the project's prepare."""
    params = section_config(PrepareConfig, "prepare")
    cfg = PrepareConfig(dataset=str(data), format=params.format, max_words=params.max_words,
                        dev_fraction=params.dev_fraction if holdout else 0.0, seed=params.seed,
                        on_leakage="warn")
    ds, _ = prepare(cfg, warn=lambda message: None)
    return ds.corpus, ds.splits["train"], ds.splits.get("dev", []), ds.splits["test"]


def pairs(train: list[Query], corpus: list[Passage]) -> dict[str, list[str]]:
    """One (claim, positive passage) row per judged positive, in the split's order."""
    text = dict(zip((p.id for p in corpus), passage_texts(corpus, use_title=True)))
    rows = [(q.text, text[d]) for q in train for d in q.positives if d in text]
    return {"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]}


def dense_run(model, queries: list[Query], corpus: list[Passage], p_emb: np.ndarray, batch_size: int
              ) -> tuple[Run, float]:
    """Exact inner-product top-RUN_DEPTH run of `queries` over the encoded corpus; and encoding seconds."""
    t0 = time.perf_counter()
    q_emb = model.encode([q.text for q in queries], batch_size=batch_size, convert_to_numpy=True,
                         normalize_embeddings=True, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    scores = q_emb @ p_emb.T
    depth = min(RUN_DEPTH, len(corpus))
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    run: Run = {}
    for i, q in enumerate(queries):
        order = top[i][np.argsort(-scores[i, top[i]], kind="stable")]
        run[q.id] = [(corpus[j].id, float(scores[i, j])) for j in order]
    return run, seconds


def project_validation(model_dir: str, corpus: list[Passage], dev: list[Query]) -> dict[str, float]:
    """The train stage's validation figure (dev pool of positives + BM25 negatives) for a saved model."""
    from dprpipe.model import DualEncoder
    from dprpipe.train import TrainData, validate

    enc = section_config(EncoderConfig, "model")
    train_cfg = section_config(TrainConfig, "train")
    negatives = {qid: [d for d, _ in negs] for qid, negs in
                 Miner(corpus, section_config(MineConfig, "mine")).negatives(dev).items()}
    model, _ = DualEncoder.load(model_dir, replace(enc, model=model_dir))
    pid_index = {p.id: i for i, p in enumerate(corpus)}
    return validate(model, TrainData(corpus, [], dev, negatives), train_cfg, pid_index)


def run_seed(seed: int, args, corpus, train, dev, test, bm25: dict[str, Run], bf16: bool) -> dict:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import mine_hard_negatives

    base = resolve_model("default")
    random.seed(seed)  # mine_hard_negatives' random sampling draws from Python's random
    np.random.seed(seed)
    torch.manual_seed(seed)
    texts = passage_texts(corpus, use_title=True)
    dataset = Dataset.from_dict(pairs(train, corpus))
    n_pairs = len(dataset)
    mining_s = 0.0
    if args.hard_negatives:
        miner = SentenceTransformer(base, device="cpu")
        t0 = time.perf_counter()
        dataset = mine_hard_negatives(dataset, miner, corpus=texts, range_max=args.range_max,
                                      sampling_strategy="random", num_negatives=args.hard_negatives,
                                      batch_size=args.batch_size, output_format="n-tuple", verbose=False)
        mining_s = time.perf_counter() - t0
        del miner

    model = SentenceTransformer(base, device="cpu")
    loss = MultipleNegativesRankingLoss(model, scale=20.0)
    with tempfile.TemporaryDirectory(prefix="peer_st-") as tmp:
        targs = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, warmup_steps=0.1, bf16=bf16, use_cpu=True,
            batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
            save_strategy="no", eval_strategy="no", logging_steps=10, report_to="none",
            disable_tqdm=not args.progress)
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset, loss=loss)
        t0 = time.perf_counter()
        out = trainer.train()
        training_s = time.perf_counter() - t0
        steps = out.global_step
        model.eval()

        t0 = time.perf_counter()
        p_emb = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                             normalize_embeddings=True, show_progress_bar=False)
        corpus_s = time.perf_counter() - t0
        runs_test, q_s = dense_run(model, test, corpus, p_emb, args.batch_size)
        ev = section_config(EvaluateConfig, "evaluate")
        runs = {"peer": runs_test, "bm25": bm25["test"],
                "hybrid": hybrid_run(bm25["test"], runs_test, ev.hybrid_weight, ev.hybrid_normalize)}
        test_m, _ = evaluate_runs(runs, test, corpus, ev)
        record = {"seed": seed, "pairs": n_pairs, "rows": len(dataset), "steps": steps,
                  "columns": dataset.column_names, "test": test_m,
                  "seconds": {"mining": round(mining_s, 1), "training": round(training_s, 1),
                              "encoding_corpus": round(corpus_s, 1), "encoding_queries": round(q_s, 1)}}
        if dev:
            dev_run, _ = dense_run(model, dev, corpus, p_emb, args.batch_size)
            record["dev"], _ = evaluate_runs({"peer": dev_run, "bm25": bm25["dev"],
                                              "hybrid": hybrid_run(bm25["dev"], dev_run, ev.hybrid_weight,
                                                                   ev.hybrid_normalize)}, dev, corpus, ev)
            model.save(str(Path(tmp) / "model"))
            record["dev_pool"] = project_validation(str(Path(tmp) / "model"), corpus, dev)
    return record


def setting(args) -> str:
    split = "holdout" if args.holdout else "all"
    negs = f"hn{args.hard_negatives}" if args.hard_negatives else "inbatch"
    return f"{split}-{negs}-ep{args.epochs}-lr{args.lr:g}"


def summary(records: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of the headline test figures, per setting."""
    out: dict = {}
    for name in sorted({r["setting"] for r in records}):
        rs = [r for r in records if r["setting"] == name]
        row = {"seeds": [r["seed"] for r in rs]}
        for system in ("peer", "hybrid"):
            for metric in ("ndcg@10", "recall@100", "mrr@10"):
                vals = [r["test"][system][metric] for r in rs]
                row[f"test_{system}_{metric}_mean"] = round(statistics.mean(vals), 4)
                if len(vals) > 1:
                    row[f"test_{system}_{metric}_std"] = round(statistics.stdev(vals), 4)
        out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="BEIR dataset folder (default: SciFact)")
    p.add_argument("--seeds", type=int, nargs="+", default=[13])
    p.add_argument("--out", default=str(ROOT / "bench" / "peer_st.json"))
    p.add_argument("--holdout", action="store_true",
                   help="train on the project's train split only and score its dev split too")
    p.add_argument("--hard-negatives", type=int, default=1, help="mined negatives per pair; 0 = in-batch only")
    p.add_argument("--range-max", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    args = p.parse_args()

    torch_dev = torch.device("cpu")
    enc = section_config(EncoderConfig, "model")
    bf16 = uses_bf16(enc, torch_dev)
    corpus, train, dev, test = load_split(args.data, args.holdout)
    miner = Miner(corpus, section_config(MineConfig, "mine"))
    bm25 = {"test": miner.run(test, RUN_DEPTH), "dev": miner.run(dev, RUN_DEPTH) if dev else {}}
    info = machine()
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    name = setting(args)
    records = [r for r in old.get("runs", []) if not (r["setting"] == name and r["seed"] in args.seeds)]
    for seed in args.seeds:
        load_before = load_average()[0]
        r = run_seed(seed, args, corpus, train, dev, test, bm25, bf16)
        r = {"setting": name, **r, "load_average_1min": [round(load_before, 2), round(load_average()[0], 2)],
             "bf16": bf16, "cpu": info["cpu"], "train_claims": len(train),
             "dev_claims": len(dev), "test_claims": len(test)}
        records.append(r)
        records.sort(key=lambda x: (x["setting"], x["seed"]))
        report = {"what": "sentence-transformers' stock recipe on SciFact, scored by dprpipe.evaluate",
                  "machine": info,
                  "note": "wall seconds are inflated where other jobs shared the CPU (load_average_1min: "
                          "before and after each seed)",
                  "runs": records, "summary": summary(records)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_path) as f:
            json.dump(report, f, indent=2)
        t, s = r["test"], r["seconds"]
        line = (f"{name} seed {seed}: test nDCG@10 {t['peer']['ndcg@10']:.4f}  R@100 {t['peer']['recall@100']:.4f}"
                f"  MRR@10 {t['peer']['mrr@10']:.4f}  hybrid nDCG@10 {t['hybrid']['ndcg@10']:.4f}")
        if "dev" in r:
            line += f"  | dev nDCG@10 {r['dev']['peer']['ndcg@10']:.4f} (pool {r['dev_pool']['ndcg@10']:.4f})"
        line += (f"  | mining {s['mining']:.0f}s, training {s['training']:.0f}s, encoding "
                 f"{s['encoding_corpus'] + s['encoding_queries']:.0f}s on {info['cpu']} ({info['cores']} cores)")
        print(line, flush=True)
    print(json.dumps(summary(records), indent=2))


if __name__ == "__main__":
    main()
