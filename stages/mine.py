"""mine: BM25 over the corpus; hard negatives for the training splits, a BM25 run for evaluation.

Outputs: <negatives>/<split>.jsonl ({"id", "negatives": [[docid, score], ...]}) for each
--split, and the BM25 run of the --eval queries as TSV `qid\\tdocid\\tscore`.
"""

import time
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe.io import atomic_dir, write_jsonl, write_run
from dprpipe.mine import MineConfig, Miner
from dprpipe.records import read_corpus, read_queries


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", action="append", default=[], help="query file to mine negatives for (repeatable)")
    p.add_argument("--eval", required=True, help="query file of the evaluation split")
    p.add_argument("--negatives", required=True, help="output folder of <split>.jsonl negatives")
    p.add_argument("--run", required=True, help="output BM25 run (TSV) of the evaluation queries")
    args = p.parse_args()
    cfg = load_params(args.params, "mine", MineConfig)

    t0 = time.perf_counter()
    miner = Miner(read_corpus(args.corpus), cfg, progress=True)
    print(f"bm25 index: {miner.index.n_docs} passages, {len(miner.index.vocab)} terms "
          f"in {time.perf_counter() - t0:.1f}s")
    with atomic_dir(args.negatives) as tmp:
        for path in args.split:
            queries = read_queries(path)
            t0 = time.perf_counter()
            negs = miner.negatives(queries)
            write_jsonl(tmp / Path(path).name, ({"id": qid, "negatives": [[d, round(s, 4)] for d, s in hits]}
                                                for qid, hits in negs.items()))
            short = sum(len(h) < cfg.negatives for h in negs.values())
            print(f"{path}: {len(queries)} queries mined in {time.perf_counter() - t0:.2f}s"
                  f" ({short} with fewer than {cfg.negatives} negatives)")
    write_run(args.run, miner.run(read_queries(args.eval), cfg.run_depth))


if __name__ == "__main__":
    run(main)
