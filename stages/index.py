"""index: build the FAISS index over passage embeddings and search the evaluation queries.

Outputs: the index folder (index.faiss, ids.txt, index.json) and the dense run TSV.
"""

import time

from stage_cli import load_params, parser, run

from dprpipe.encode import load_embeddings
from dprpipe.index import IndexConfig, Searcher, build_index, save_index
from dprpipe.io import write_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--embeddings", required=True, help="encode output folder")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--run", required=True, help="dense run TSV of the evaluation queries")
    p.add_argument("--depth", type=int, default=1000, help="hits per query in the run")
    p.add_argument("--exact", action="store_true", help="exact search, ignoring the index params (baselines)")
    args = p.parse_args()
    cfg = IndexConfig() if args.exact else load_params(args.params, "index", IndexConfig)
    emb, ids = load_embeddings(f"{args.embeddings}/passages.npy", f"{args.embeddings}/passages.ids")
    t0 = time.perf_counter()
    index = build_index(emb, cfg)
    print(f"{cfg.kind} index over {len(ids)} passages in {time.perf_counter() - t0:.1f}s")
    save_index(args.out, index, ids, cfg)
    q, qids = load_embeddings(f"{args.embeddings}/queries.npy", f"{args.embeddings}/queries.ids")
    write_run(args.run, Searcher(index, ids).run(qids, q, args.depth))


if __name__ == "__main__":
    run(main)
