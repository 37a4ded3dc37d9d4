"""train: fine-tune the dual encoder with in-batch and mined hard negatives.

--negatives SOURCE=FOLDER (repeatable) names each source's folder of <split>.jsonl negatives:
bm25 (the mine stage), dense (mine_dense), provided (the dataset's, written by prepare);
`train.negatives` picks which of them training samples from. The dev pool of validation is
always BM25's, so every choice of negatives is validated on the same pool.

Outputs: the best checkpoint (a Hugging Face folder, --out), the training record of the kept
epoch as a metrics JSON and the per-epoch history as a plot CSV. --state names a scratch folder,
not a DVC output: a killed run leaves its resumable state there (one subfolder per config and
data fingerprint) for `train.resume` to continue from; a finished run removes its own.

With `train.nproc` > 1 the script starts itself again under torchrun, one process per GPU (or
per CPU process group with gloo), on this node; each trains on `train.batch_size` questions of
every global batch. Started by torchrun already (e.g. on several nodes), it joins that group.
"""

import subprocess
import sys
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe import distributed
from dprpipe.records import read_corpus, read_queries
from dprpipe.io import DataError, atomic_write, read_jsonl, write_json
from dprpipe.model import DualEncoder, EncoderConfig
from dprpipe.train import TrainConfig, TrainData, interleave, train


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


def negative_folders(specs: list[str]) -> dict[str, Path]:
    """SOURCE=FOLDER arguments as {source: folder}; a bare FOLDER is BM25's."""
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = (name, folder) if sep else ("bm25", name)
        out[name] = Path(folder)
    return out


def relaunch(script: Path, nproc: int) -> int:
    """Run `script` with the same arguments in `nproc` processes under torchrun; its exit status."""
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        sys.exit(f"error: train.nproc is {nproc} but {torch.cuda.device_count()} GPU(s) are visible; "
                 "set train.nproc to at most the number of GPUs")
    cmd = distributed.torchrun_command(script.resolve(), sys.argv[1:], nproc)
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def run_training(args, enc: EncoderConfig, cfg: TrainConfig, script: Path) -> None:
    """Train (under torchrun when train.nproc > 1, `script` being the stage that relaunches) and
    write the reports on rank 0."""
    if cfg.nproc > 1 and not distributed.launched():
        sys.exit(relaunch(script, cfg.nproc))
    distributed.init_from_env()
    try:
        history = _train(args, enc, cfg)
        if distributed.is_main():
            _write_reports(args, history)
    finally:
        distributed.shutdown()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--corpus", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--negatives", action="append", required=True, metavar="SOURCE=FOLDER",
                   help="a source's folder of <split>.jsonl negatives (bm25=, dense=, provided=; repeatable)")
    p.add_argument("--out", required=True, help="best checkpoint folder")
    p.add_argument("--state", required=True, help="scratch folder for resumable training states")
    p.add_argument("--metrics", required=True, help="training metrics JSON")
    p.add_argument("--plot", required=True, help="per-epoch validation CSV")
    args = p.parse_args()
    enc = load_params(args.params, "model", EncoderConfig)
    cfg = load_params(args.params, "train", TrainConfig)
    run_training(args, enc, cfg, Path(__file__))


def _train(args, enc: EncoderConfig, cfg: TrainConfig) -> list[dict]:
    if distributed.is_main() and distributed.world_size() != cfg.nproc:
        print(f"note: {distributed.world_size()} process(es) train (train.nproc is {cfg.nproc}); "
              f"a global batch is {distributed.world_size() * cfg.batch_size} questions")
    folders = negative_folders(args.negatives)
    for s in cfg.negatives_read():
        if s not in folders:
            sys.exit(f"error: train.negatives needs the {s} negatives but no --negatives {s}=FOLDER was given "
                     "(dvc.yaml's train command)")
        if not folders[s].is_dir():
            sys.exit(f"error: train.negatives uses the {s} negatives but {folders[s]} is not a folder"
                     + (" (the dataset provides none)" if s == "provided" else "; run the stage that writes it"))
    train_negs = interleave([read_negatives(folders[s]) for s in cfg.negative_sources()])
    data = TrainData(read_corpus(args.corpus), read_queries(args.train), read_queries(args.dev),
                     train_negs, val_negatives=None if cfg.include_dev else read_negatives(folders["bm25"]))
    model, _ = DualEncoder.load(enc.model, enc, attention_dropout=cfg.attention_dropout)
    model.to(distributed.device())
    return train(model, data, cfg, args.out, args.state)  # progress bar on rank 0 only


def _write_reports(args, history: list[dict]) -> None:
    kept = [h for h in history if h.get("kept")]
    best = kept[-1] if kept else {}
    # epoch 0 is the validation of the starting model, not a trained epoch; the figures are the
    # kept epoch's, the one whose model is the checkpoint
    write_json(args.metrics, {"epochs": max((h["epoch"] for h in history), default=0),
                              "kept_epoch": best.get("epoch"),
                              "train_seconds": round(sum(h["seconds"] for h in history), 1),
                              **{k: round(v, 4) for k, v in best.items() if k.startswith("val_")}})
    with atomic_write(args.plot) as f:
        f.write("epoch,loss,val_ndcg@10,val_avg_rank\n")
        for h in history:   # an empty cell: no figure (epoch 0's loss; validation with train.include_dev)
            cells = [f"{h[k]:{fmt}}" if h.get(k) is not None else ""
                     for k, fmt in (("loss", ".5f"), ("val_ndcg@10", ".4f"), ("val_avg_rank", ".3f"))]
            f.write(",".join([str(h["epoch"]), *cells]) + "\n")


if __name__ == "__main__":
    run(main)
