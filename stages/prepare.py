"""prepare: read a BEIR or DPR dataset, check it, and write the normalised corpus and query splits.

Outputs: <out>/corpus.jsonl, <out>/<split>.jsonl for each split, <out>/pieces.json (the piece
map, only where prepare.max_words split documents), <out>/negatives/<split>.jsonl (the hard
negatives a DPR dataset provides, in the mine stage's format, only where it provides them), and
a data report JSON (a DVC metric) with the counts and, under "checks", the cases each data check
found. A check set to "error" (prepare.on_*) stops the stage with one line naming the file and
line, and nothing is written; one set to "warn" prints a warning line and goes on.
"""

from stage_cli import load_params, parser, run

from dprpipe.io import atomic_dir, write_json, write_jsonl
from dprpipe.prepare import PrepareConfig, negative_records, prepare
from dprpipe.records import write_corpus, write_pieces, write_queries


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="folder for corpus.jsonl and <split>.jsonl")
    p.add_argument("--report", required=True, help="data report JSON (a DVC metrics file)")
    args = p.parse_args()
    cfg = load_params(args.params, "prepare", PrepareConfig)
    ds, report = prepare(cfg)
    with atomic_dir(args.out) as tmp:
        write_corpus(tmp / "corpus.jsonl", ds.corpus)
        for split, queries in ds.splits.items():
            write_queries(tmp / f"{split}.jsonl", queries)
        if ds.pieces:
            write_pieces(tmp / "pieces.json", ds.pieces)
        for split, records in negative_records(ds).items():
            write_jsonl(tmp / "negatives" / f"{split}.jsonl", records)
    write_json(args.report, report)
    flat = {**{k: v for k, v in report.items() if k != "checks"},
            **{f"checks.{k}": v for k, v in report["checks"].items()}}
    print(", ".join(f"{k}={v}" for k, v in flat.items()))


if __name__ == "__main__":
    run(main)
