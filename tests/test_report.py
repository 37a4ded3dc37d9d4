"""The experiment report (dprpipe/report.py, stages/report.py) and the experiments flow (flows/experiments.py).

- the report against hand-worked records (the statistics and verdicts: tests/test_claims.py):
  the results table, the markdown's sections, stable PNG bytes;
- the committed reports/experiments.md (and its PNGs) equal what `dprpipe.report` makes from the
  committed reports/experiments.json, with the paths and params dvc.yaml gives the report stage;
- the flow's planning and matching helpers on hand-written `dvc exp show` data;
- slow: the flow on the tiny workspace of tests/flow_fixtures.py, with two variants and one seed:
  one experiment is queued and run, the records and the report are written, and a second run
  creates no experiment and reruns nothing; after a code change the experiment runs again, and
  after a commit it is still found and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from claims_fixtures import CFG, rec
from flow_fixtures import ROOT, commit, flow_env, make_workspace, run

from dprpipe.claims import VARIANT_KEYS, ExperimentSet, ReportConfig, read_experiments, write_experiments
from dprpipe.config import from_mapping
from dprpipe.report import build_report, render_markdown, render_plots, render_table
from flows.experiments import (Found, dataset_override, is_workspace_run, locked_code, matching, parse_exp_show, pipeline_code, plan,
                               same_code, same_params)


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
    # one seed: no spread; BM25 is deterministic, its sd over the reference runs is 0; no training time
    assert rows["DPR, in-batch negatives only"].endswith(
        "| 0.6600 | 0.6100 | 0.5600 | 0.7100 | 0.7600 | 0.8600 | 29.0 | 1 |")
    assert rows["BM25"] == ("| BM25 | 0.6000 ± 0.0000 | 0.5500 ± 0.0000 | 0.5000 ± 0.0000 | 0.6500 ± 0.0000 | "
                            "0.7000 ± 0.0000 | 0.8000 ± 0.0000 | – | 3 |")
    # the best mean of a column is bold (here the hybrid everywhere)
    assert rows["hybrid (BM25 + DPR, +1 BM25 negative)"].startswith(
        "| hybrid (BM25 + DPR, +1 BM25 negative) | **0.7500")


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
    assert ("| `dpr_hn1-s13` | `dpr_hn1` | 13 | experiment `0000000` | true | 1 | 13 | 0.7000 | 0.7500 | 3 "
            "| 0.7900 (3) | 30.0 |") in md
    assert VARIANT_KEYS == ("model.shared", "train.hard_negatives", "train.seed")
    assert render_markdown(exps, CFG, "recall_at_k.png", "validation.png") == md      # pure


# ---------------------------------------------------------------- files


def test_plots_are_reproducible_pngs():
    records = [rec("dpr_hn1", s, 0.70 + 0.01 * s) for s in (13, 14)] + [rec("dpr_inbatch", 13, 0.66)]
    first = render_plots(records)
    assert render_plots(records) == first
    for png in first:
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert b"Software" not in png and b"Matplotlib" not in png    # no version stamp in the bytes
    assert render_plots(records[:2]) != first


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


# ---------------------------------------------------------------- the flow's helpers


def test_plan_names_and_overrides():
    runs = plan(["dpr_sep", "dpr_inbatch"], [13, 14, 13])
    assert [r.name for r in runs] == ["dpr_sep-s13", "dpr_sep-s14", "dpr_inbatch-s13", "dpr_inbatch-s14"]
    assert runs[0].sets == {"train.hard_negatives": 1, "model.shared": False, "train.seed": 13}
    assert runs[3].sets == {"train.hard_negatives": 0, "model.shared": True, "train.seed": 14}
    assert [r.name for r in plan(None, [7])] == ["dpr_inbatch-s7", "dpr_hn1-s7", "dpr_hn2-s7", "dpr_sep-s7"]
    with pytest.raises(ValueError, match="unknown variant.* dpr_hn3; the set has dpr_inbatch, dpr_hn1"):
        plan(["dpr_hn3"], [13])


def test_workspace_run_and_dataset_override(tmp_path):
    ws = tmp_path / "repo"
    ws.mkdir()
    params = {"train.hard_negatives": 1, "model.shared": True, "train.seed": 13, "prepare.dataset": "../data/scifact"}
    hn1, hn2 = plan(["dpr_hn1", "dpr_hn2"], [13])
    assert is_workspace_run(params, hn1) and not is_workspace_run(params, hn2)
    assert not is_workspace_run({**params, "train.seed": 14}, hn1)
    # a queued experiment runs in a copy under .dvc/tmp/exps: a relative path out of the repo must become absolute
    assert dataset_override(ws, params) == {"prepare.dataset": str(tmp_path / "data" / "scifact")}
    assert dataset_override(ws, {**params, "prepare.dataset": "datasets/tiny"}) == {}
    assert dataset_override(ws, {**params, "prepare.dataset": "/abs/scifact"}) == {}


def test_same_params_ignores_the_report_section_and_float_spelling():
    want = {"train.lr": 3.0e-5, "train.seed": 13, "evaluate.ks": [1, 5], "report.wide_margin": 0.05}
    assert same_params({"train.lr": "3e-05", "train.seed": 13, "evaluate.ks": [1, 5], "report.wide_margin": 0.1}, want)
    assert not same_params({"train.lr": 3.0e-5, "train.seed": 14, "evaluate.ks": [1, 5]}, want)
    assert not same_params({"train.lr": 3.0e-5, "train.seed": 13, "evaluate.ks": [1, 5], "new.key": 1}, want)


def _show(baseline: str, *entries) -> list[dict]:
    """`dvc exp show --json` of a workspace and one baseline with experiments (name, rev, state, error, seed)."""
    def data(seed):
        return {"params": {"params.yaml": {"data": {"train": {"seed": seed, "hard_negatives": 0}}}}}
    return [{"rev": "workspace", "name": None, "data": data(13), "error": None, "experiments": None},
            {"rev": baseline, "name": "main", "data": data(13), "error": None, "experiments": [
                {"name": name, "executor": None if state is None else {"state": state, "local": {"log": "/x.out"}},
                 "revs": [{"rev": rev, "name": name, "data": data(seed),
                           "error": {"msg": "Experiment run failed"} if error else None}]}
                for name, rev, state, error, seed in entries]}]


def test_parse_exp_show_and_matching():
    head, old = "a" * 40, "b" * 40
    shown = (_show(head, ("dpr_inbatch-s13", "1" * 40, "success", False, 13),
                   ("dpr_inbatch-s14", "2" * 40, "failed", True, 14),
                   ("dpr_inbatch-s15", "3" * 40, "queued", False, 15))
             + _show(old, ("dpr_inbatch-s13", "4" * 40, None, False, 13))[1:])
    ws_params, found = parse_exp_show(shown)
    assert ws_params == {"train.seed": 13, "train.hard_negatives": 0}
    assert [(f.name, f.baseline[0], f.done, f.pending) for f in found] == [
        ("dpr_inbatch-s13", "a", True, False), ("dpr_inbatch-s14", "a", False, False),
        ("dpr_inbatch-s15", "a", False, True), ("dpr_inbatch-s13", "b", True, False)]
    assert isinstance(found[0], Found) and found[0].log == "/x.out"
    want = {"train.seed": 13, "train.hard_negatives": 0}
    code = {"stages/train.py": "f00"}
    locks = {"1" * 40: {"stages/train.py": {"f00"}}, "4" * 40: {"stages/train.py": {"f00"}}}
    # both baselines match: HEAD's is preferred
    assert matching(found, "dpr_inbatch-s13", want, code, head, locks.get).rev == "1" * 40
    # HEAD's ran other code: the older baseline's, which ran this code, is reused
    locks["1" * 40] = {"stages/train.py": {"0ld"}}
    assert matching(found, "dpr_inbatch-s13", want, code, head, locks.get).rev == "4" * 40
    # other params, or only failed and queued runs: nothing to reuse
    assert matching(found, "dpr_inbatch-s13", {**want, "train.seed": 14}, code, head, locks.get) is None
    assert matching(found, "dpr_inbatch-s14", {**want, "train.seed": 14}, code, head, locks.get) is None
    assert matching(found, "dpr_inbatch-s15", {**want, "train.seed": 15}, code, head, locks.get) is None


def test_locked_code_reads_the_pipeline_stages_only():
    lock = {"schema": "2.0", "stages": {
        "train": {"deps": [{"path": "stages/stage_cli.py", "hash": "md5", "md5": "aa"},
                           {"path": "data/prepared", "hash": "md5", "md5": "dd.dir"}]},
        "evaluate": {"deps": [{"path": "stages/stage_cli.py", "hash": "md5", "md5": "aa"}]},
        "report": {"deps": [{"path": "stages/stage_cli.py", "hash": "md5", "md5": "old"}]}}}
    locked = locked_code(yaml.safe_dump(lock))
    assert locked == {"stages/stage_cli.py": {"aa"}, "data/prepared": {"dd.dir"}}
    assert same_code(locked, {"stages/stage_cli.py": "aa"})
    assert not same_code(locked, {"stages/stage_cli.py": "bb"})
    assert not same_code(locked, {"stages/new.py": "cc"})     # a dependency the run did not have


def test_pipeline_code_is_code_files_not_stage_outputs(tmp_path):
    # the workspace holds a copy of data/runs/dpr.tsv, an input of evaluate that index writes: it differs
    # in every experiment, so counting it as code would make every finished experiment look stale
    dvc_yaml = {"stages": {
        "index": {"cmd": "x", "deps": ["stages/index.py", "data/embeddings"], "outs": ["data/index", "data/runs/dpr.tsv"]},
        "evaluate": {"cmd": "x", "deps": ["stages/evaluate.py", "data/runs/dpr.tsv", "data/index/ids.txt",
                                         "${prepare.dataset}"],
                     "metrics": [{"metrics/retrieval.json": {"cache": False}}]},
        "report": {"cmd": "x", "deps": ["stages/report.py", "metrics/retrieval.json"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml), encoding="utf-8")
    for rel in ("stages/index.py", "stages/evaluate.py", "stages/report.py", "data/runs/dpr.tsv",
                "data/index/ids.txt", "data/embeddings/passages.npy"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel, encoding="utf-8")
    code = pipeline_code(tmp_path)
    assert sorted(code) == ["stages/evaluate.py", "stages/index.py"]     # report is not a pipeline stage
    assert code["stages/index.py"] == hashlib.md5(b"stages/index.py").hexdigest()


def test_queue_watchdog_restarts_a_dead_worker(monkeypatch):
    import threading
    import types

    import flows.experiments as fx

    stalled_text = "7156741  dpr_sep-s14  05:27 PM  Queued\n\nWorker status: 0 active, 0 idle\n"
    busy_text = "7156741  dpr_sep-s14  05:27 PM  Running\n\nWorker status: 1 active, 0 idle\n"
    # one stalled reading (a worker starting up), a busy one, then stalled for good
    readings = iter([stalled_text, busy_text, stalled_text, stalled_text])
    calls, stop = [], threading.Event()

    def fake_run(args, **kw):
        calls.append(args[3:5])
        if args[3:5] == ["queue", "status"]:
            text = next(readings, None)
            if text is None:
                stop.set()
                text = busy_text
            return types.SimpleNamespace(returncode=0, stdout=text)
        return types.SimpleNamespace(returncode=0, stdout="Started '1' new experiments task queue worker.")

    monkeypatch.setattr(fx.subprocess, "run", fake_run)
    warnings = []
    logger = types.SimpleNamespace(warning=lambda *a: warnings.append(a))
    fx._watch_queue(Path("."), 1, stop, logger, every=0.001)
    assert calls == [["queue", "status"]] * 4 + [["queue", "start"]] + [["queue", "status"]]
    assert len(warnings) == 1


def test_queue_watchdog_failed_reading_is_not_a_stall(monkeypatch):
    """A `dvc queue status` that fails (exit 1) resets the count instead of ending the watchdog:
    stalled, failed, stalled is not two stalls in a row, so no restart."""
    import threading
    import types

    import flows.experiments as fx

    stalled_text = "7156741  dpr_sep-s14  05:27 PM  Queued\n\nWorker status: 0 active, 0 idle\n"
    readings = iter([(0, stalled_text), (1, ""), (0, stalled_text)])
    calls, stop = [], threading.Event()

    def fake_run(args, **kw):
        calls.append(args[3:5])
        code, text = next(readings, (0, "Worker status: 1 active, 0 idle\n"))
        if len(calls) == 4:
            stop.set()
        return types.SimpleNamespace(returncode=code, stdout=text, stderr="lock held" if code else "")

    monkeypatch.setattr(fx.subprocess, "run", fake_run)
    warnings = []
    logger = types.SimpleNamespace(warning=lambda *a: warnings.append(a))
    fx._watch_queue(Path("."), 1, stop, logger, every=0.001)
    assert calls == [["queue", "status"]] * 4
    assert len(warnings) == 1 and "lock held" in str(warnings[0])

def test_docstring_examples():
    import doctest

    import dprpipe.report
    import flows.experiments

    for module in (dprpipe.report, flows.experiments):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


# ---------------------------------------------------------------- the flow, end to end


@pytest.fixture(scope="module")
def flow_harness():
    """Offline models, one thread per stage, a git identity, and a Prefect test server."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        for key, value in flow_env().items():
            if key != "PATH" and os.environ.get(key) != value:
                mp.setenv(key, value)
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


def _exp_refs(ws: Path) -> list[str]:
    out = run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], ws).stdout
    return sorted(line for line in out.splitlines() if "/celery/" not in line)


@pytest.mark.slow
def test_experiments_flow_runs_once_then_reuses(tmp_path, flow_harness):
    from flows.experiments import experiments

    ws = make_workspace(tmp_path / "repo")
    kwargs = dict(workspace=str(ws), seeds=[13], variants=["dpr_hn1", "dpr_inbatch"])

    # 1. dpr_hn1 at seed 13 is params.yaml's own run: `dvc repro` in the workspace; dpr_inbatch is queued and run
    state = experiments(return_state=True, **kwargs)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["workspace"] == ["dpr_hn1-s13"] and first["queued"] == ["dpr_inbatch-s13"], first
    assert first["reused"] == [] and first["report"] == "ran"
    assert "train" in first["ran"]["dpr_inbatch-s13"] and "train" in first["ran"]["workspace"], first["ran"]
    refs = _exp_refs(ws)
    assert len(refs) == 1 and refs[0].endswith("/dpr_inbatch-s13"), refs
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], ws).stdout)
    [group] = [g for b in shown for g in b.get("experiments") or []]
    params = group["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert group["name"] == "dpr_inbatch-s13" and params["train"]["hard_negatives"] == 0
    assert "dpr" in group["revs"][0]["data"]["metrics"]["metrics/retrieval.json"]["data"]

    # the records: the workspace run and the experiment, each with its history and recall curve
    exps = read_experiments(ws / "reports" / "experiments.json")
    assert [(r.name, r.source) for r in exps.records] == [("dpr_hn1-s13", "workspace"),
                                                           ("dpr_inbatch-s13", "experiment")]
    assert exps.records[1].rev == refs[0].split()[0]
    assert exps.records[1].params == {"model.shared": True, "train.hard_negatives": 0, "train.seed": 13}
    for r in exps.records:
        assert [h["epoch"] for h in r.history] == [0, 1] and [row["k"] for row in r.recall][0] == 1
        assert set(r.metrics) == {"bm25", "zeroshot", "dpr", "hybrid"}
    assert exps.dataset == "tiny" and exps.eval_split == "test"
    # the report is what dprpipe.report makes of the records
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        files = build_report(exps, ReportConfig(), "reports/experiments.md", "reports/recall_at_k.png",
                             "reports/validation.png")
    finally:
        os.chdir(cwd)
    for path, data in files.items():
        assert (ws / path).read_bytes() == data, path
    snapshot = {p: (ws / p).read_bytes() for p in ("reports/experiments.json", *files, "dvc.lock")}

    # 2. nothing changed: no experiment queued, no stage run, the same records, the report skipped
    state = experiments(return_state=True, **kwargs)
    second = state.result()
    assert second == {"workspace": ["dpr_hn1-s13"], "reused": ["dpr_inbatch-s13"], "queued": [],
                      "ran": {"workspace": []}, "report": "unchanged"}, second
    assert _exp_refs(ws) == refs
    assert {p: (ws / p).read_bytes() for p in snapshot} == snapshot

    # 3. pipeline code changed (not committed): the workspace reruns what it touches, and the experiment,
    # which ran the old code, is removed and run again under its name
    with open(ws / "stages" / "evaluate.py", "a", encoding="utf-8") as f:
        f.write("# changed\n")
    third = experiments(return_state=True, **kwargs).result()
    assert third["queued"] == ["dpr_inbatch-s13"] and third["reused"] == [], third
    assert third["ran"]["workspace"] == ["evaluate"] and "train" in third["ran"]["dpr_inbatch-s13"], third["ran"]
    new_refs = _exp_refs(ws)
    assert len(new_refs) == 1 and new_refs[0].endswith("/dpr_inbatch-s13") and new_refs != refs, new_refs
    assert read_experiments(ws / "reports" / "experiments.json").records[1].rev == new_refs[0].split()[0]

    # 4. after committing the results (a new baseline commit), the experiment is still found and reused
    commit(ws, "experiment results")
    fourth = experiments(return_state=True, **kwargs).result()
    assert fourth["queued"] == [] and fourth["reused"] == ["dpr_inbatch-s13"] and fourth["report"] == "unchanged"
    assert fourth["ran"] == {"workspace": []}
    assert _exp_refs(ws) == new_refs

    # `dvc plots diff` overlays the workspace's committed run and the experiment
    r = run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "dpr_inbatch-s13", "--json"], ws)
    assert "dpr_inbatch-s13" in r.stdout and "plots/train.csv" in r.stdout
