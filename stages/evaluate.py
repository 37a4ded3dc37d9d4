"""evaluate: score retrieval runs against the evaluation split's judgements and answers.

Outputs: a metrics JSON {system: {metric: value}} and a recall@k curve CSV (k, one column
per system) for `dvc plots`. Scoring rules (trec_eval's tie order, BEIR's identical-id rule
and averaging) are in dprpipe/evaluate.py; a judged query missing from a run is left out of
that run's averages, with a warning on stderr.

--pieces names the piece map that prepare writes when it splits documents; where that file
exists (and evaluate.fold_to_documents is on) the judged metrics score documents, each at its
best piece's score (MaxP). Every run is folded as a passage run, the hybrid too: it fuses the
BM25 and dense passage runs, as the search service does, and its fused run is folded like the
others. Where the file does not exist the corpus holds whole documents and runs are scored
as they are.
"""

import sys
from pathlib import Path

from stage_cli import load_params, parser, run

from dprpipe.records import read_corpus, read_pieces, read_queries
from dprpipe.evaluate import EvaluateConfig, evaluate_runs, missing_queries
from dprpipe.io import DataError, atomic_write, read_run, write_json
from dprpipe.search import hybrid_run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True, help="query file of the evaluation split")
    p.add_argument("--run", action="append", required=True, metavar="NAME=PATH", help="a run to score (repeatable)")
    p.add_argument("--hybrid", action="append", default=[], metavar="NAME=SPARSE+DENSE",
                   help="a fused run of two --run names, e.g. hybrid=bm25+dpr (repeatable)")
    p.add_argument("--pieces", help="piece map of a split corpus (prepare writes it only when it splits "
                   "documents); where it exists, runs are folded to documents (MaxP)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--plot", required=True, help="recall@k curve CSV")
    args = p.parse_args()
    cfg = load_params(args.params, "evaluate", EvaluateConfig)
    corpus = read_corpus(args.corpus)
    known = {x.id for x in corpus}
    runs = {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep:
            p.error(f"--run takes NAME=PATH, got {spec!r}")
        runs[name] = read_run(path)
        stray = next((d for hits in runs[name].values() for d, _ in hits if d not in known), None)
        if stray is not None:
            raise DataError(path, None, f"passage {stray!r} is not in {args.corpus}; "
                            "the run belongs to another corpus (rerun its stage)")
    for spec in args.hybrid:
        name, _, pair = spec.partition("=")
        sparse, _, dense = pair.partition("+")
        if sparse not in runs or dense not in runs:
            p.error(f"--hybrid {spec!r} must name two --run systems, e.g. hybrid=bm25+dpr")
        runs[name] = hybrid_run(runs[sparse], runs[dense], cfg.hybrid_weight, cfg.hybrid_normalize)
    queries = read_queries(args.queries)
    for name, r in runs.items():
        missing = missing_queries(r, queries)
        if missing:
            print(f"warning: {name}: {len(missing)} judged queries are not in the run (e.g. {missing[0]!r}); "
                  "they are left out of its averages, as BEIR does", file=sys.stderr)
    pieces = read_pieces(args.pieces) if args.pieces and Path(args.pieces).exists() else None
    if pieces and cfg.fold_to_documents:
        print(f"scoring documents: {len(pieces)} split documents, each at its best piece's score (MaxP)")
    metrics, curve = evaluate_runs(runs, queries, corpus, cfg, pieces)
    write_json(args.metrics, metrics)
    with atomic_write(args.plot) as f:
        f.write("k," + ",".join(runs) + "\n")
        for k, row in curve.items():
            f.write(f"{k}," + ",".join(f"{row[name]:.4f}" for name in runs) + "\n")
    for name, m in metrics.items():
        print(f"{name:>12}: " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "queries"))


if __name__ == "__main__":
    run(main)
