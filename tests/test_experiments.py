"""The experiments flow (flows/experiments.py): the paper's claims as DVC experiments.

- its planning and reuse helpers on hand-written `dvc exp show` data and a small git repository;
- slow: the flow on the tiny workspace of tests/flow_fixtures.py, with two variants and one seed:
  one experiment runs (`dvc exp run --temp`), the records and the report are written; a second
  run creates no experiment and reruns nothing; after a code change the experiment runs again,
  with the stages the change does not touch restored from DVC's run cache; after a commit it
  runs again with every stage restored from the run cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from flow_fixtures import commit, flow_env, make_workspace, run

from dprpipe.claims import ReportConfig, read_experiments
from dprpipe.report import build_report
from flows.experiments import (Found, changed, dataset_override, finished, is_workspace_run, parse_exp_show, pipeline_files,
                               plan, plan_runs, same_params, untracked)


# ---------------------------------------------------------------- the plan and what DVC holds


def test_plan_names_and_overrides():
    runs = plan(["dpr_sep", "dpr_inbatch"], [13, 14, 13])
    assert [r.name for r in runs] == ["dpr_sep-s13", "dpr_sep-s14", "dpr_inbatch-s13", "dpr_inbatch-s14"]
    same = {"train.negatives": "bm25"}
    assert runs[0].sets == {"train.hard_negatives": 1, "model.shared": False, **same, "train.seed": 13}
    assert runs[3].sets == {"train.hard_negatives": 0, "model.shared": True, **same, "train.seed": 14}
    assert [r.name for r in plan(None, [7])] == ["dpr_inbatch-s7", "dpr_hn1-s7", "dpr_hn2-s7", "dpr_sep-s7",
                                                 "dpr_dense-s7", "dpr_b128-s7", "dpr_sep_dense-s7"]
    with pytest.raises(ValueError, match="unknown variant.* dpr_hn3; the set has dpr_inbatch, dpr_hn1"):
        plan(["dpr_hn3"], [13])


def test_plan_runs_by_name():
    runs = plan_runs(["dpr_sep_dense-s14", "dpr_hn1-s13", "dpr_sep_dense-s14", "dpr_sep_dense-s15"])
    assert [(r.name, r.variant, r.seed) for r in runs] == [
        ("dpr_sep_dense-s14", "dpr_sep_dense", 14), ("dpr_hn1-s13", "dpr_hn1", 13),
        ("dpr_sep_dense-s15", "dpr_sep_dense", 15)]
    # the same runs as variants x seeds would give
    assert runs[1] == plan(["dpr_hn1"], [13])[0] and runs[2] == plan(["dpr_sep_dense"], [15])[0]
    # one run however its seed is spelled
    assert [r.name for r in plan_runs(["dpr_hn1-s13", "dpr_hn1-s013"])] == ["dpr_hn1-s13"]
    for bad in ("dpr_hn1", "dpr_hn1-13", "dpr_hn1-sx", "dpr_hn1-s--3", "dpr_hn1-s\u00b2", "-s13"):
        with pytest.raises(ValueError, match="is not named <variant>-s<seed>"):
            plan_runs([bad])
    with pytest.raises(ValueError, match="unknown variant.* dpr_hn3"):
        plan_runs(["dpr_hn3-s13"])
    with pytest.raises(ValueError, match="at least one run"):
        plan_runs([])


def test_cli_takes_runs_or_seeds_and_variants_not_both(capsys, monkeypatch):
    import flows.experiments as fe

    for argv, error in ((["--runs", "dpr_hn1-s13", "--seeds", "14"], "not both"),
                        (["--runs", "dpr_hn1-13"], "is not named <variant>-s<seed>"),
                        (["--runs", "dpr_hn9-s13"], "unknown variant")):
        with pytest.raises(SystemExit) as e:
            fe.main(argv)
        assert e.value.code == 2 and error in capsys.readouterr().err, argv
    # the flow itself refuses both, before it starts
    with pytest.raises(ValueError, match="not both"):
        fe.experiments.fn(runs=["dpr_hn1-s13"], seeds=[14])

    # the names reach the flow as given, and no seeds or variants with them
    seen = {}

    class Done:
        name = "Completed"
        message = None

        def is_completed(self):
            return True

        def result(self):
            return {}

    def fake(**kwargs):
        seen.update(kwargs)
        return Done()

    monkeypatch.setattr(fe, "experiments", fake)
    assert fe.main(["--runs", "dpr_sep_dense-s14", "dpr_hn1-s13"]) == 0
    assert (seen["runs"], seen["seeds"], seen["variants"]) == (["dpr_sep_dense-s14", "dpr_hn1-s13"], None, None)
    assert fe.main(["--seeds", "14", "--variants", "dpr_hn1"]) == 0
    assert (seen["runs"], seen["seeds"], seen["variants"]) == (None, [14], ["dpr_hn1"])


def test_workspace_run_and_dataset_override(tmp_path):
    ws = tmp_path / "repo"
    ws.mkdir()
    params = {"train.hard_negatives": 1, "model.shared": True, "train.negatives": "bm25", "train.seed": 13,
              "prepare.dataset": "../data/scifact"}
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


def test_parse_exp_show_and_finished():
    head, old = "a" * 40, "b" * 40
    shown = (_show(head, ("dpr_inbatch-s13", "1" * 40, "success", False, 13),
                   ("dpr_inbatch-s14", "2" * 40, "failed", True, 14),
                   ("dpr_inbatch-s15", "3" * 40, "queued", False, 15),
                   ("dpr_inbatch-s16", "5" * 40, None, False, 16))
             + _show(old, ("dpr_inbatch-s17", "4" * 40, None, False, 17))[1:])
    ws_params, found = parse_exp_show(shown)
    assert ws_params == {"train.seed": 13, "train.hard_negatives": 0}
    assert [(f.name, f.baseline[0], f.done) for f in found] == [
        ("dpr_inbatch-s13", "a", True), ("dpr_inbatch-s14", "a", False), ("dpr_inbatch-s15", "a", False),
        ("dpr_inbatch-s16", "a", True), ("dpr_inbatch-s17", "b", True)]
    assert isinstance(found[0], Found)
    want = {"train.seed": 13, "train.hard_negatives": 0}
    # finished on HEAD with these params (a run from DVC's queue, or one run with --temp)
    assert finished(found, "dpr_inbatch-s13", want, head).rev == "1" * 40
    assert finished(found, "dpr_inbatch-s16", {**want, "train.seed": 16}, head).rev == "5" * 40
    # other params; a failed or a queued run; another commit's: nothing to reuse
    assert finished(found, "dpr_inbatch-s13", {**want, "train.seed": 14}, head) is None
    assert finished(found, "dpr_inbatch-s14", {**want, "train.seed": 14}, head) is None
    assert finished(found, "dpr_inbatch-s15", {**want, "train.seed": 15}, head) is None
    assert finished(found, "dpr_inbatch-s17", {**want, "train.seed": 17}, head) is None
    assert finished(found, "dpr_inbatch-s17", {**want, "train.seed": 17}, old).rev == "4" * 40


def test_pipeline_files_changed_and_untracked(tmp_path):
    ws = tmp_path / "repo"
    ws.mkdir()
    dvc_yaml = {"stages": {
        "train": {"cmd": "x", "deps": ["stages/train.py", "data/prepared", "${prepare.dataset}"], "outs": ["models/dpr"]},
        "evaluate": {"cmd": "x", "deps": ["stages/evaluate.py"]},
        "report": {"cmd": "x", "deps": ["stages/report.py"]}}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml), encoding="utf-8")
    for rel in ("stages/train.py", "stages/evaluate.py", "stages/report.py", "data/prepared/x.jsonl"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(rel, encoding="utf-8")
    (ws / "data" / ".gitignore").write_text("/prepared\n", encoding="utf-8")   # a DVC output, as DVC ignores it
    run(["git", "init", "-q"], ws)
    # the report is no pipeline stage; a templated dep is the dataset, outside git
    files = pipeline_files(ws)
    assert files == ["dvc.yaml", "data/prepared", "stages/evaluate.py", "stages/train.py"]
    assert untracked(ws, files) == ["dvc.yaml", "stages/evaluate.py", "stages/train.py"]
    commit(ws, "code")
    assert untracked(ws, files) == [] and changed(ws, files) == []
    (ws / "stages" / "evaluate.py").write_text("edited", encoding="utf-8")
    (ws / "stages" / "report.py").write_text("edited", encoding="utf-8")
    assert changed(ws, files) == ["stages/evaluate.py"]


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
def test_experiments_flow_runs_once_then_reuses_and_restores_from_the_run_cache(tmp_path, flow_harness):
    from flows.experiments import experiments

    ws = make_workspace(tmp_path / "repo")
    kwargs = dict(workspace=str(ws), seeds=[13], variants=["dpr_sep_dense", "dpr_inbatch"])

    # 1. dpr_sep_dense at seed 13 is params.yaml's own run: `dvc repro` in the workspace; dpr_inbatch runs as
    # an experiment (its prepare and mine come from the run cache: the workspace run made them)
    state = experiments(return_state=True, **kwargs)
    assert state.is_completed(), state.message
    first = state.result()
    assert first["workspace"] == ["dpr_sep_dense-s13"] and first["run"] == ["dpr_inbatch-s13"], first
    assert first["reused"] == [] and first["report"] == "ran"
    assert "train" in first["ran"]["dpr_inbatch-s13"] and "train" in first["ran"]["workspace"], first["ran"]
    assert {"prepare", "mine"} <= set(first["cached"]["dpr_inbatch-s13"]), first["cached"]
    refs = _exp_refs(ws)
    assert len(refs) == 1 and refs[0].endswith("/dpr_inbatch-s13"), refs
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], ws).stdout)
    [group] = [g for b in shown for g in b.get("experiments") or []]
    params = group["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert group["name"] == "dpr_inbatch-s13" and params["train"]["hard_negatives"] == 0
    assert "dpr" in group["revs"][0]["data"]["metrics"]["metrics/retrieval.json"]["data"]

    # the records: the workspace run and the experiment, each with its history and recall curve
    exps = read_experiments(ws / "reports" / "experiments.json")
    assert [(r.name, r.source) for r in exps.records] == [("dpr_sep_dense-s13", "workspace"),
                                                           ("dpr_inbatch-s13", "experiment")]
    assert exps.records[1].rev == refs[0].split()[0]
    # every key of the set as the run saw it: the batch settings are the tiny workspace's
    assert exps.records[1].params == {"model.shared": True, "train.hard_negatives": 0, "train.negatives": "bm25",
                                      "train.batch_size": 4, "train.grad_cache_chunk": 0, "train.seed": 13}
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

    # 2. nothing changed: no experiment run, no stage run, the same records, the report skipped
    state = experiments(return_state=True, **kwargs)
    second = state.result()
    assert second == {"workspace": ["dpr_sep_dense-s13"], "reused": ["dpr_inbatch-s13"], "run": [],
                      "ran": {"workspace": []}, "cached": {}, "report": "unchanged"}, second
    assert _exp_refs(ws) == refs
    assert {p: (ws / p).read_bytes() for p in snapshot} == snapshot

    # 3. pipeline code changed (not committed): the workspace reruns what it touches, and the experiment,
    # which ran the old code, runs again under its name: only evaluate, the rest from the run cache
    with open(ws / "stages" / "evaluate.py", "a", encoding="utf-8") as f:
        f.write("# changed\n")
    third = experiments(return_state=True, **kwargs).result()
    assert third["run"] == ["dpr_inbatch-s13"] and third["reused"] == [], third
    # (evaluate may come from the run cache too: on this tiny data both variants can keep the same model,
    # and then the workspace's evaluate has just run on the experiment's inputs)
    assert third["ran"]["workspace"] == ["evaluate"] and third["ran"]["dpr_inbatch-s13"] in ([], ["evaluate"]), third
    assert {"prepare", "mine", "train", "encode", "index"} <= set(third["cached"]["dpr_inbatch-s13"]), third
    new_refs = _exp_refs(ws)
    assert len(new_refs) == 1 and new_refs[0].endswith("/dpr_inbatch-s13") and new_refs != refs, new_refs
    assert read_experiments(ws / "reports" / "experiments.json").records[1].rev == new_refs[0].split()[0]
    records = (ws / "reports" / "experiments.json").read_text()

    # 4. after committing the results (a new baseline commit), the experiment is made again on it, and no
    # stage runs: train is restored from the run cache; the records keep the same figures
    commit(ws, "experiment results")
    fourth = experiments(return_state=True, **kwargs).result()
    assert fourth["run"] == ["dpr_inbatch-s13"] and fourth["ran"] == {"workspace": [], "dpr_inbatch-s13": []}, fourth
    assert "train" in fourth["cached"]["dpr_inbatch-s13"], fourth   # the rest: cached, or unchanged from dvc.lock
    after = read_experiments(ws / "reports" / "experiments.json")
    before = json.loads(records)
    assert [r.metrics for r in after.records] == [r["metrics"] for r in before["records"]]
    # and with nothing changed since, nothing runs
    fifth = experiments(return_state=True, **kwargs).result()
    assert fifth["run"] == [] and fifth["reused"] == ["dpr_inbatch-s13"] and fifth["report"] == "unchanged", fifth

    # `dvc plots diff` overlays the workspace's committed run and the experiment
    r = run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "dpr_inbatch-s13", "--json"], ws)
    assert "dpr_inbatch-s13" in r.stdout and "plots/train.csv" in r.stdout
