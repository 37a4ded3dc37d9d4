"""encode: embed the corpus with the passage encoder and the evaluation queries with the query encoder.

--model is a checkpoint folder written by train (its saved encoder config is used) or, for
the zero-shot baseline, a base model ("default", a hub name or a folder) encoded with the
`model` params. Outputs in --out: passages.npy/.ids (float32 memmap) and queries.npy/.ids.

With `encode.shards` > 1 the passages are encoded in shards on Dask worker processes
(`encode.dask_address`, or a local cluster of one worker per shard, at most one per core) and
merged into the same files (dprpipe/shard.py). The queries are always encoded here.
"""

import os
from dataclasses import asdict
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe.encode import EncodeConfig, encode_passages_to, encode_texts, save_embeddings
from dprpipe.io import atomic_dir
from dprpipe.model import DualEncoder, EncoderConfig, device
from dprpipe.records import read_corpus, read_queries
from dprpipe.shard import dask_submit, encode_sharded


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
            # an absolute model path: the Dask workers may run in another folder (or on another machine)
            model_ref = str(Path(name).resolve()) if Path(name).exists() else name
            with dask_submit(cfg.dask_address, min(cfg.shards, os.cpu_count() or 1)) as submit:
                encode_sharded(submit, model_ref, asdict(enc), args.corpus, tmp / "passages.npy", tmp / "passages.ids",
                               cfg.shards, cfg.batch_size, cfg.block_size, passages=len(corpus))
        else:
            encode_passages_to(model, corpus, len(corpus), tmp / "passages.npy", tmp / "passages.ids",
                               cfg.batch_size, cfg.block_size, progress=True)
        q = encode_texts(model, [x.text for x in queries], "query", cfg.batch_size, progress=True)
        save_embeddings(tmp / "queries.npy", tmp / "queries.ids", q, [x.id for x in queries])


if __name__ == "__main__":
    run(main)
