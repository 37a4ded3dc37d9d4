"""report: the experiment report of the paper's claims, from the collected experiment records.

Inputs: reports/experiments.json (written by `python -m flows.experiments`) and params.yaml's
`report` section. Outputs: the markdown report and its two PNG plots (recall@k curves, validation
score per epoch), committed in git (`cache: false` in dvc.yaml).
"""

from stage_cli import load_params, parser, run

from dprpipe.claims import ReportConfig, read_experiments
from dprpipe.io import atomic_write
from dprpipe.report import build_report


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--records", required=True, help="the collected experiment records (JSON)")
    p.add_argument("--out", required=True, help="the markdown report")
    p.add_argument("--recall-plot", required=True, help="PNG of the recall@k curves")
    p.add_argument("--validation-plot", required=True, help="PNG of the validation score per epoch")
    args = p.parse_args()
    cfg = load_params(args.params, "report", ReportConfig)
    files = build_report(read_experiments(args.records), cfg, args.out, args.recall_plot, args.validation_plot)
    for path, data in files.items():
        with atomic_write(path, "wb") as f:
            f.write(data)
    print(f"wrote {', '.join(files)} from {args.records}")


if __name__ == "__main__":
    run(main)
