"""The experiment report (dprpipe/report.py, stages/report.py).

- the report against hand-worked records (the statistics and verdicts: tests/test_claims.py):
  the results table, the markdown's sections, stable PNG bytes;
- the committed reports/experiments.md (and its PNGs) equal what `dprpipe.report` makes from the
  committed reports/experiments.json, with the paths and params dvc.yaml gives the report stage.
The experiments flow that collects the records: tests/test_experiments.py.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import warnings

import pytest
import yaml
from claims_fixtures import CFG, rec
from flow_fixtures import ROOT

from dprpipe.claims import VARIANT_KEYS, ExperimentSet, ReportConfig, read_experiments, write_experiments
from dprpipe.config import from_mapping
from dprpipe.report import build_report, render_markdown, render_plots, render_table


# ---------------------------------------------------------------- the table


def test_table_mean_and_spread_over_seeds():
    records = [rec("dpr_hn1", s, d, minutes=m) for s, d, m in ((13, 0.70, 30), (14, 0.72, 31), (15, 0.74, 32))]
    records.append(rec("dpr_inbatch", 13, 0.66, minutes=29))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in render_table(records)[2:]}
    assert list(rows) == ["BM25", "zero-shot starting model (no training)", "DPR, in-batch negatives only",
                          "DPR, +1 BM25 negative", "hybrid (BM25 + DPR, +1 BM25 negative)"]
    # 3 seeds: mean ± sd of every metric and of the training time; 3 runs
    assert rows["DPR, +1 BM25 negative"] == (
        "| DPR, +1 BM25 negative | 0.7200 ± 0.0200 | 0.6700 ± 0.0200 | 0.6200 ± 0.0200 | 0.7700 ± 0.0200 | "
        "0.8200 ± 0.0200 | 0.9200 ± 0.0200 | 31.0 ± 1.0 | 3 |")
    # one seed: no spread; BM25 is deterministic: equal over the reference runs, so no spread either
    assert rows["DPR, in-batch negatives only"].endswith(
        "| 0.6600 | 0.6100 | 0.5600 | 0.7100 | 0.7600 | 0.8600 | 29.0 | 1 |")
    assert rows["BM25"] == "| BM25 | 0.6000 | 0.5500 | 0.5000 | 0.6500 | 0.7000 | 0.8000 | – | 3 |"
    # the best mean of a column is bold (here the hybrid everywhere)
    assert rows["hybrid (BM25 + DPR, +1 BM25 negative)"].startswith(
        "| hybrid (BM25 + DPR, +1 BM25 negative) | **0.7500")


def test_table_shows_the_hybrid_of_the_default_beside_the_references():
    default = rec("dpr_sep_dense", 13, 0.80, hybrid=0.85)
    rows = [line.split(" | ")[0].lstrip("| ") for line in render_table([rec("dpr_hn1", 13, 0.70), default])[2:]]
    assert rows == ["BM25", "zero-shot starting model (no training)", "DPR, +1 BM25 negative",
                    "DPR, +1 dense negative, separate encoders (the default)", "hybrid (BM25 + DPR, +1 BM25 negative)",
                    "hybrid (BM25 + DPR, +1 dense negative, separate encoders (the default))"]
    # without the default's variant: only the reference's hybrid
    rows = [line.split(" | ")[0] for line in render_table([rec("dpr_hn1", 13, 0.70), rec("dpr_dense", 13, 0.8)])]
    assert sum("hybrid" in r for r in rows) == 1


# ---------------------------------------------------------------- the markdown


def test_markdown_sections_and_links():
    exps = ExperimentSet("scifact", "test", [rec("dpr_inbatch", 13, 0.66), rec("dpr_hn1", 13, 0.70)])
    md = render_markdown(exps, CFG, "recall_at_k.png", "validation.png")
    assert md.startswith("# The DPR paper's claims on scifact\n")
    assert "2 training runs: `dpr_inbatch` (1), `dpr_hn1` (1); seed 13. Scored on the test split (300 queries)." in md
    for heading in ("## Results", "## The paper's claims on this data", "## Plots", "## Runs"):
        assert f"\n{heading}\n" in md
    assert "- **(1) held.** A trained dual encoder beats BM25 by a wide margin." in md
    assert "![Recall@k of each system](recall_at_k.png)" in md
    assert ("| `dpr_hn1-s13` | `dpr_hn1` | 13 | experiment `0000000` | true | – | – | 1 | bm25 | 13 | 0.7000 "
            "| 0.7500 | 3 | 0.7900 (3) | 30.0 |") in md
    assert VARIANT_KEYS == ("model.shared", "train.batch_size", "train.grad_cache_chunk", "train.hard_negatives",
                            "train.negatives", "train.seed")
    assert render_markdown(exps, CFG, "recall_at_k.png", "validation.png") == md      # pure


def _runs_cell(md: str, run: str, column: str) -> str:
    """The cell of the runs table in `run`'s row and `column`'s column."""
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| run |"))
    row = next(line for line in lines if line.startswith(f"| `{run}` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    return cells[[c.strip() for c in header.strip("|").split("|")].index(column)]


@pytest.mark.parametrize("marks, train, want", [
    # training kept the starting model: its score and epoch 0, though epoch 3 scored better
    ({0: True, 1: False, 2: False, 3: False}, {}, "0.7600 (0)"),
    ({0: True, 1: True, 2: True, 3: False}, {}, "0.7800 (2)"),       # the last kept, not the best
    (None, {"kept_epoch": 0, "val_ndcg@10": 0.76}, "0.7600 (0)"),     # metrics/train.json's kept epoch
    (None, {"kept_epoch": 2}, "0.7800 (2)"),
    (None, {}, "0.7900 (3)"),       # a run that records neither: the best trained epoch
])
def test_runs_table_shows_the_kept_epoch(marks, train, want):
    r = rec("dpr_hn1", 13, 0.70)
    if marks is not None:
        r.history[:] = [dict(h, kept=marks[h["epoch"]]) for h in r.history]
    r.train.update(train)
    md = render_markdown(ExperimentSet("scifact", "test", [r]), CFG, "recall_at_k.png", "validation.png")
    assert _runs_cell(md, "dpr_hn1-s13", "best val nDCG@10 (epoch)") == want


# ---------------------------------------------------------------- files


def test_plots_are_reproducible_pngs():
    records = [rec("dpr_hn1", s, 0.70 + 0.01 * s) for s in (13, 14)] + [rec("dpr_inbatch", 13, 0.66)]
    first = render_plots(records)
    assert render_plots(records) == first
    for png in first:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert b"Software" not in png and b"Matplotlib" not in png    # no version stamp in the bytes
    assert render_plots(records[:2]) != first


def test_runs_without_validation_get_a_labelled_empty_plot_and_no_warning():
    """Runs trained on the dev split too (train.include_dev) have no validation scores: the
    validation plot says so, and matplotlib is not asked for a legend of nothing (a warning)."""
    validated = [rec("dpr_hn1", 13, 0.70)]
    unvalidated = [dataclasses.replace(validated[0], history=[])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, empty = render_plots(unvalidated)
    assert empty != render_plots(validated)[1]


def _report_stage() -> dict:
    """The report stage's paths, from its command in dvc.yaml (so the test follows dvc.yaml)."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    args = shlex.split(stage["cmd"])
    return {args[i].lstrip("-"): args[i + 1] for i in range(len(args)) if args[i].startswith("--")}


def test_report_stage_is_wired_apart_from_the_pipeline():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    report = stages["report"]
    paths = _report_stage()
    assert report["deps"][0] == paths["records"] == "reports/experiments.json"
    outs = [next(iter(o)) for o in report["outs"]]
    assert outs == [paths["out"], paths["recall-plot"], paths["validation-plot"]]
    assert all(o[name]["cache"] is False for o, name in zip(report["outs"], outs))    # committed in git
    # the report reads no output of another stage, and no stage reads the report's files: adding
    # it leaves the pipeline's stages as they were, and experiments (which run them) never run it
    produced = {next(iter(o)) if isinstance(o, dict) else o
                for name, s in stages.items() if name != "report"
                for key in ("outs", "metrics", "plots") for o in s.get(key, [])}
    assert not any(d == p or d.startswith(p + "/") for d in report["deps"] for p in produced)
    assert not any(str(d).startswith("reports/") for name, s in stages.items() if name != "report"
                   for d in s.get("deps", []))
    assert report["params"] == ["report"]      # the whole section, which it reads


def test_report_stage_script(tmp_path):
    records = tmp_path / "experiments.json"
    write_experiments(records, ExperimentSet("scifact", "test", [rec("dpr_hn1", 13, 0.70)]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"report": {"metric": "ndcg@10", "min_difference": 0.02}}))
    args = [sys.executable, str(ROOT / "stages" / "report.py"), "--params", str(tmp_path / "params.yaml"),
            "--records", str(records), "--out", "out/r.md", "--recall-plot", "out/plots/a.png",
            "--validation-plot", "out/plots/b.png"]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "out" / "r.md").read_text()
    assert "![Recall@k of each system](plots/a.png)" in md and "`report.min_difference` (0.0200)" in md
    assert (tmp_path / "out" / "plots" / "b.png").read_bytes().startswith(b"\x89PNG")
    r = subprocess.run(args[:5] + [str(tmp_path / "none.json")] + args[6:], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and "none.json: cannot read it" in r.stderr


def test_committed_report_equals_what_the_records_give():
    """reports/experiments.md and its PNGs are exactly what `dvc repro report` makes from the committed
    reports/experiments.json and params.yaml's `report` section."""
    paths = _report_stage()
    records = ROOT / paths["records"]
    if not records.is_file():
        pytest.skip(f"{paths['records']} does not exist yet: collect it with `python -m flows.experiments`")
    cfg = from_mapping(ReportConfig, yaml.safe_load((ROOT / "params.yaml").read_text()).get("report"), "report")
    old = os.getcwd()
    os.chdir(ROOT)     # the stage runs from the project root, with dvc.yaml's relative paths
    try:
        files = build_report(read_experiments(paths["records"]), cfg, paths["out"], paths["recall-plot"],
                             paths["validation-plot"])
    finally:
        os.chdir(old)
    stale = "is stale: regenerate it with `dvc repro report` (or `python -m flows.experiments`)"
    for path, data in files.items():
        assert (ROOT / path).is_file(), f"{path} is missing: run `dvc repro report`"
        if path.endswith(".md"):
            assert (ROOT / path).read_text(encoding="utf-8") == data.decode("utf-8"), f"{path} {stale}"
        else:
            assert (ROOT / path).read_bytes() == data, f"{path} {stale} (or matplotlib changed its PNG output)"
