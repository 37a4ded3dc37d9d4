"""Hand-worked experiment records for the claims and report tests."""

from dprpipe.claims import VARIANTS, Record, ReportConfig

CFG = ReportConfig()    # nDCG@10, wide margin 0.05, ties below 0.01


def metrics(v: float) -> dict:
    """A system's metrics, all derived from its nDCG@10 `v` (R@20 = v + 0.1, R@100 = v + 0.2)."""
    return {"ndcg@10": v, "mrr@10": round(v - 0.05, 4), "recall@1": round(v - 0.1, 4), "recall@5": round(v + 0.05, 4),
            "recall@10": round(v + 0.08, 4), "recall@20": round(v + 0.1, 4), "recall@100": round(v + 0.2, 4),
            "queries": 300}


def rec(variant: str, seed: int, dpr: float, bm25: float = 0.60, zeroshot: float = 0.62, hybrid: float = 0.75,
        minutes: float = 30.0) -> Record:
    return Record(name=f"{variant}-s{seed}", variant=variant, seed=seed, source="experiment", rev=f"{seed:040x}",
                  params={**VARIANTS[variant].overrides, "train.seed": seed},
                  metrics={"bm25": metrics(bm25), "zeroshot": metrics(zeroshot), "dpr": metrics(dpr),
                           "hybrid": metrics(hybrid)},
                  train={"epochs": 3, "train_seconds": minutes * 60, "val_ndcg@10": 0.8},
                  history=[{"epoch": e, "loss": None if e == 0 else 1.0 / e, "val_ndcg@10": 0.76 + 0.01 * e,
                            "val_avg_rank": 2.0} for e in range(4)],
                  recall=[{"k": k, "bm25": bm25, "zeroshot": zeroshot, "dpr": dpr, "hybrid": hybrid}
                          for k in (1, 10, 100)])
