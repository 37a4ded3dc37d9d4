"""encode: embed the corpus with the passage encoder and the evaluation queries with the query encoder.

--model is a checkpoint folder written by train (its saved encoder config is used) or, for
the zero-shot baseline, a base model ("default", a hub name or a folder) encoded with the
`model` params. Outputs in --out: passages.npy/.ids (float32 memmap) and queries.npy/.ids.
"""

from dataclasses import dataclass

from common import load_params, parser, run

from dprpipe.data import read_corpus, read_queries
from dprpipe.encode import encode_passages_to, encode_texts, save_embeddings
from dprpipe.io import atomic_dir
from dprpipe.model import DualEncoder, EncoderConfig, device


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = 64
    block_size: int = 16384     # passages length-sorted and encoded together; bounds memory


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder, or 'base' for the model params' base model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_params(args.params, "encode", EncodeConfig)
    enc = load_params(args.params, "model", EncoderConfig)
    model, _ = DualEncoder.load(enc.model if args.model == "base" else args.model, enc)
    model.to(device())
    corpus = read_corpus(args.corpus)
    queries = read_queries(args.queries)
    with atomic_dir(args.out) as tmp:
        encode_passages_to(model, corpus, len(corpus), tmp / "passages.npy", tmp / "passages.ids",
                           cfg.batch_size, cfg.block_size, progress=True)
        q = encode_texts(model, [x.text for x in queries], "query", cfg.batch_size, progress=True)
        save_embeddings(tmp / "queries.npy", tmp / "queries.ids", q, [x.id for x in queries])


if __name__ == "__main__":
    run(main)
