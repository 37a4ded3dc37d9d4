"""mine_dense: hard negatives from a dense encoder's own ranking, for the training splits.

--model is the encoder whose ranking is mined: 'base' (the `model` params' base model, whose
passage embeddings the zero-shot encode stage wrote) or a checkpoint folder written by train.
--embeddings is an encode stage's output folder made with that same model (passages.npy/.ids):
the passages are not encoded again, only the questions.

Outputs: <out>/<split>.jsonl ({"id", "negatives": [[docid, score], ...]}) for each --split, the
shape the BM25 mine stage writes, so train reads either.
"""

import time
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe.dense_mine import DenseMineConfig, exact_search, mine_dense, positive_scores
from dprpipe.encode import encode_texts, load_embeddings
from dprpipe.io import atomic_dir, write_jsonl
from dprpipe.model import DualEncoder, EncoderConfig, device
from dprpipe.records import read_corpus, read_queries


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="'base' or a checkpoint folder")
    p.add_argument("--embeddings", required=True, help="encode stage output of the same model (passages.npy/.ids)")
    p.add_argument("--corpus", required=True, help="corpus JSONL (passage texts, for answer matching)")
    p.add_argument("--split", action="append", default=[], help="query file to mine negatives for (repeatable)")
    p.add_argument("--out", required=True, help="output folder of <split>.jsonl negatives")
    args = p.parse_args()
    cfg = load_params(args.params, "mine_dense", DenseMineConfig)
    enc = load_params(args.params, "model", EncoderConfig)
    model, _ = DualEncoder.load(enc.model if args.model == "base" else args.model, enc)
    model.to(device())
    folder = Path(args.embeddings)
    p_emb, ids = load_embeddings(folder / "passages.npy", folder / "passages.ids")
    pid_index = {d: i for i, d in enumerate(ids)}
    splits = {path: read_queries(path) for path in args.split}
    text_of = None
    if any(q.answers for qs in splits.values() for q in qs):
        texts = {p.id: p.text for p in read_corpus(args.corpus)}
        text_of = texts.__getitem__
    with atomic_dir(args.out) as tmp:
        for path, queries in splits.items():
            t0 = time.perf_counter()
            q_emb = encode_texts(model, [q.text for q in queries], "query", progress=True)
            negs = mine_dense(queries, q_emb, lambda q, k: exact_search(p_emb, ids, q, k),
                              positive_scores(queries, q_emb, p_emb, pid_index), cfg, text_of)
            write_jsonl(tmp / Path(path).name, ({"id": qid, "negatives": [[d, round(s, 4)] for d, s in hits]}
                                                for qid, hits in negs.items()))
            short = sum(len(h) < cfg.negatives for h in negs.values())
            print(f"{path}: {len(queries)} queries mined in {time.perf_counter() - t0:.2f}s"
                  f" ({short} with fewer than {cfg.negatives} negatives)")


if __name__ == "__main__":
    run(main)
