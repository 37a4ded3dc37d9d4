"""train: fine-tune the dual encoder with in-batch and BM25 hard negatives.

Outputs: the best checkpoint (a Hugging Face folder, --out), the resumable training state
(--state, kept between runs so `train.resume` can continue a killed run), and the per-epoch
history as a metrics JSON and a plot CSV.
"""

from pathlib import Path

from common import load_params, parser, run

from dprpipe.data import read_corpus, read_queries
from dprpipe.io import DataError, atomic_write, read_jsonl, write_json
from dprpipe.model import DualEncoder, EncoderConfig, device
from dprpipe.train import TrainConfig, TrainData, train


def read_negatives(folder: Path) -> dict[str, list[str]]:
    negs = {}
    for path in sorted(folder.glob("*.jsonl")):
        for lineno, obj in read_jsonl(path):
            try:
                negs[str(obj["id"])] = [str(d) for d, _ in obj["negatives"]]
            except (KeyError, TypeError, ValueError):
                raise DataError(path, lineno, 'expected {"id": ..., "negatives": [[docid, score], ...]}; '
                                "rerun the mine stage") from None
    return negs


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--corpus", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--negatives", required=True, help="folder of mined negatives (<split>.jsonl)")
    p.add_argument("--out", required=True, help="best checkpoint folder")
    p.add_argument("--state", required=True, help="resumable training state folder")
    p.add_argument("--metrics", required=True, help="training metrics JSON")
    p.add_argument("--plot", required=True, help="per-epoch validation CSV")
    args = p.parse_args()
    enc = load_params(args.params, "model", EncoderConfig)
    cfg = load_params(args.params, "train", TrainConfig)
    data = TrainData(read_corpus(args.corpus), read_queries(args.train), read_queries(args.dev),
                     read_negatives(Path(args.negatives)))
    model, _ = DualEncoder.load(enc.model, enc)
    model.to(device())
    history = train(model, data, cfg, args.out, args.state)
    last = history[-1] if history else {}
    # epoch 0 is the validation of the starting model, not a trained epoch
    write_json(args.metrics, {"epochs": max((h["epoch"] for h in history), default=0),
                              "train_seconds": round(sum(h["seconds"] for h in history), 1),
                              **{k: round(v, 4) for k, v in last.items() if k.startswith("val_")}})
    with atomic_write(args.plot) as f:
        f.write("epoch,loss,val_ndcg@10,val_avg_rank\n")
        for h in history:
            loss = "" if h["loss"] is None else f"{h['loss']:.5f}"
            f.write(f"{h['epoch']},{loss},{h.get('val_ndcg@10', float('nan')):.4f},"
                    f"{h.get('val_avg_rank', float('nan')):.3f}\n")


if __name__ == "__main__":
    run(main)
