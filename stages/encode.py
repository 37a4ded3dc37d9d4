"""encode: embed the corpus with the passage encoder and the evaluation queries with the query encoder.

--model is a checkpoint folder written by train (its saved encoder config is used) or, for
the zero-shot baseline, a base model ("default", a hub name or a folder) encoded with the
`model` params. Outputs in --out: passages.npy/.ids (float32 memmap) and queries.npy/.ids.

With `encode.shards` > 1 the passages are encoded by the `sharded-encode` Prefect flow
(flows/sharded_encode.py): shards on a Dask cluster (`encode.dask_address`, or a local one), merged
into the same files. The queries are always encoded here.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe.encode import encode_passages_to, encode_texts, save_embeddings
from dprpipe.io import atomic_dir
from dprpipe.model import DualEncoder, EncoderConfig, device
from dprpipe.records import read_corpus, read_queries


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 64
    block_size: int = 16384     # passages length-sorted and encoded together; bounds memory
    shards: int = 1             # > 1: encode the passages in this many shards (Prefect tasks on Dask)
    dask_address: str = ""      # the Dask scheduler for the shards; empty: a local cluster

    def __post_init__(self):
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder, or 'base' for the model params' base model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_params(args.params, "encode", EncodeConfig)
    enc = load_params(args.params, "model", EncoderConfig)
    name = enc.model if args.model == "base" else args.model
    model, _ = DualEncoder.load(name, enc)
    model.to(device())
    corpus = read_corpus(args.corpus)
    queries = read_queries(args.queries)
    with atomic_dir(args.out) as tmp:
        if cfg.shards > 1:
            from flows.sharded_encode import run_sharded_encode

            # absolute paths: the Dask workers may run in another folder (or on another machine)
            run_sharded_encode(str(Path(name).resolve()) if Path(name).exists() else name,
                               str(Path(args.corpus).resolve()), str((tmp / "passages.npy").resolve()),
                               str((tmp / "passages.ids").resolve()), cfg.shards, asdict(enc), cfg.batch_size,
                               cfg.block_size, passages=len(corpus), dask_address=cfg.dask_address)
        else:
            encode_passages_to(model, corpus, len(corpus), tmp / "passages.npy", tmp / "passages.ids",
                               cfg.batch_size, cfg.block_size, progress=True)
        q = encode_texts(model, [x.text for x in queries], "query", cfg.batch_size, progress=True)
        save_embeddings(tmp / "queries.npy", tmp / "queries.ids", q, [x.id for x in queries])


if __name__ == "__main__":
    run(main)
