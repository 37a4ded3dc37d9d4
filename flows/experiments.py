"""The experiment set of the paper's claims as DVC experiments, collected into a report.

`python -m flows.experiments --seeds 13 14 15` (the `experiments` flow) runs every variant at
every seed; `--runs dpr_sep_dense-s14 dpr_hn1-s13 ...` runs exactly the named runs. It does, in the
workspace:

1. The run of the set that is params.yaml's own (the variant whose keys params.yaml holds, at its
   seed: `dpr_sep_dense-s13` with the defaults): `dvc repro` of the pipeline stages, which DVC
   skips when dvc.lock is up to date. That run is the workspace's (committed at HEAD), not an
   experiment.
2. Every other (variant, seed) run, named `<variant>-s<seed>` (`dprpipe.claims.VARIANTS`): a
   finished experiment of that name on HEAD with the same params is reused (unless dvc.yaml or a
   file the stages depend on differs from HEAD); otherwise the run is
   made, one at a time, with `dvc exp run --temp --name <name> -S <variant's keys>
   -S train.seed=<seed> <pipeline stages>` in a temporary copy of the workspace. DVC's run cache
   restores every stage that already ran with the same code, data and params (in an earlier
   experiment, or before a commit): such a run checks out outputs instead of training again.
3. The set's records (params, metrics per system, training history, recall curve) are written to
   reports/experiments.json, and `dvc repro report` writes reports/experiments.md and its plots.

Inputs: the workspace (dvc.yaml, params.yaml, a git commit to base experiments on), the seeds and
variants, or the runs. Outputs: the experiments (`dvc exp show`), reports/experiments.json, the
report files, and a Prefect markdown artifact `experiments-report`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

if __package__ in (None, ""):   # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dprpipe.claims import (REFERENCE, SEED_KEY, VARIANTS, ExperimentSet, Record,  # noqa: E402
                            record_from_outputs, run_name, to_json)
from flows.stage_runner import (ENCODING, EVALUATION, MINING, TRAINING, StageError, _dvc_env, _flatten,  # noqa: E402
                                dvc_repro, hydra_value, resolve_workspace, skipped, workspace_lock)

PIPELINE = [*MINING, *TRAINING, *ENCODING, *EVALUATION]   # what an experiment runs (not the report)
REPORT_STAGE = "report"
RECORDS = "reports/experiments.json"          # the report stage's input (dvc.yaml)
REPORT = "reports/experiments.md"             # its output
# the outputs a record is read from (dvc.yaml's train and evaluate stages)
OUTPUTS = {"retrieval_json": "metrics/retrieval.json", "train_json": "metrics/train.json",
           "train_csv": "plots/train.csv", "recall_csv": "plots/recall.csv"}
IGNORED_PARAMS = ("report.", "gate.")   # params no experiment reads: changing them must not rerun anything


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Planned:
    """One run of the set: its experiment name and the `-S` values that define it."""

    name: str
    variant: str
    seed: int
    sets: dict[str, Any]


def plan(variants: Sequence[str] | None, seeds: Sequence[int]) -> list[Planned]:
    """The runs of the set, variant by variant, seed by seed.

    >>> [p.name for p in plan(["dpr_hn2", "dpr_inbatch"], [13, 14])]
    ['dpr_hn2-s13', 'dpr_hn2-s14', 'dpr_inbatch-s13', 'dpr_inbatch-s14']
    """
    names = list(dict.fromkeys(variants or VARIANTS))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; the set has {', '.join(VARIANTS)}")
    if not seeds:
        raise ValueError("give at least one seed")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    return [Planned(run_name(v, s), v, s, {**VARIANTS[v].overrides, SEED_KEY: s}) for v in names for s in seeds]


def plan_runs(names: Sequence[str]) -> list[Planned]:
    """The runs named `<variant>-s<seed>` (as `dvc exp show` lists them), in the order given: a set
    whose variants have different seeds, e.g. the default at three seeds and the others at one.

    >>> [(p.variant, p.seed) for p in plan_runs(["dpr_sep_dense-s14", "dpr_hn1-s13"])]
    [('dpr_sep_dense', 14), ('dpr_hn1', 13)]
    """
    runs: dict[str, Planned] = {}
    for name in names:
        m = re.fullmatch(r"(.+)-s(-?[0-9]+)", name)
        if m is None:
            raise ValueError(f"run {name!r} is not named <variant>-s<seed> (e.g. {run_name(REFERENCE, 13)})")
        p = plan([m[1]], [int(m[2])])[0]
        runs.setdefault(p.name, p)     # "x-s013" is "x-s13": one run, not two
    if not runs:
        raise ValueError("give at least one run")
    return list(runs.values())


def planned(seeds: Sequence[int] | None, variants: Sequence[str] | None, runs: Sequence[str] | None) -> list[Planned]:
    """The set the flow runs: the named `runs`, or every variant (default: all) at every seed (default: 13)."""
    if runs is not None and (seeds or variants):
        raise ValueError("give the runs by name, or seeds and variants, not both")
    return plan_runs(runs) if runs is not None else plan(variants, seeds or [13])


def _norm(value: Any) -> Any:
    # DVC rewrites params.yaml when it applies -S, and a float such as 3e-05 may come back as a string
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def same_params(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Equal flattened params, ignoring IGNORED_PARAMS and float spellings.

    >>> same_params({"train.lr": "3e-05", "report.metric": "x"}, {"train.lr": 3.0e-5})
    True
    """
    def keep(d):
        return {k: _norm(v) for k, v in d.items() if not k.startswith(IGNORED_PARAMS)}
    return keep(have) == keep(want)


def is_workspace_run(ws_params: dict[str, Any], planned: Planned) -> bool:
    """The run is params.yaml's own: every value that defines it is already there."""
    return all(k in ws_params and _norm(ws_params[k]) == _norm(v) for k, v in planned.sets.items())


def dataset_override(ws: Path, ws_params: dict[str, Any]) -> dict[str, Any]:
    """`prepare.dataset` made absolute when it is relative and outside the repository.

    A queued experiment runs in a copy under .dvc/tmp/exps, where such a path (the default
    `../shared/datasets/scifact`) would name a folder that does not exist.
    """
    ds = ws_params.get("prepare.dataset")
    if isinstance(ds, str) and not os.path.isabs(ds):
        full = (ws / ds).resolve()
        if not full.is_relative_to(ws):
            return {"prepare.dataset": str(full)}
    return {}


# ---------------------------------------------------------------- what DVC holds


@dataclass(frozen=True)
class Found:
    """An experiment `dvc exp show` lists."""

    name: str
    rev: str
    baseline: str
    state: str | None       # a queued run's state (success, failed, queued, running); None if not queued
    failed: bool
    params: dict[str, Any]

    @property
    def done(self) -> bool:
        return not self.failed and self.state in (None, "success")


def parse_exp_show(data: list[dict]) -> tuple[dict[str, Any], list[Found]]:
    """The workspace's flattened params and every experiment, from `dvc exp show --json`."""
    ws_params: dict[str, Any] = {}
    found = []

    def params_of(d: dict | None) -> dict[str, Any]:
        return _flatten(((d or {}).get("params") or {}).get("params.yaml", {}).get("data") or {})

    for item in data:
        if item.get("rev") == "workspace":
            ws_params = params_of(item.get("data"))
            continue
        for group in item.get("experiments") or []:
            executor = group.get("executor") or {}
            for rev in group.get("revs") or []:
                found.append(Found(
                    name=rev.get("name") or group.get("name") or "", rev=rev["rev"], baseline=item["rev"],
                    state=executor.get("state"), failed=bool(rev.get("error")) or executor.get("state") == "failed",
                    params=params_of(rev.get("data"))))
    return ws_params, found


def finished(found: list[Found], name: str, want: dict[str, Any], head: str) -> Found | None:
    """The finished experiment `name` on the `head` commit that ran with the `want` params.

    An experiment of another commit is not looked for: it may have run other code, and DVC's run
    cache already makes rerunning it cheap where nothing it depends on changed.
    """
    return next((f for f in found if f.name == name and f.baseline == head and f.done
                 and same_params(f.params, want)), None)


def _paths(entries: Any) -> list[str]:
    """The paths of a dvc.yaml deps list (plain strings or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def pipeline_files(ws: Path) -> list[str]:
    """dvc.yaml and the files and folders the pipeline stages depend on that exist in the workspace."""
    stages = (yaml.safe_load((ws / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    return ["dvc.yaml", *sorted({p for name in PIPELINE for p in _paths(stages.get(name, {}).get("deps"))
                                 if "${" not in p and (ws / p).exists()})]


def untracked(ws: Path, paths: Sequence[str]) -> list[str]:
    """The files under `paths` git does not track: an experiment's temporary copy is made from git
    (plus the workspace's changes to tracked files) and would lack them. DVC's outputs are ignored."""
    return git(ws, "ls-files", "--others", "--exclude-standard", "--", *paths).split()


def changed(ws: Path, paths: Sequence[str]) -> list[str]:
    """The tracked files under `paths` that differ from HEAD (HEAD's experiments did not run them)."""
    return [line[3:] for line in git(ws, "status", "--porcelain", "--untracked-files=no", "--", *paths).splitlines()]


# ---------------------------------------------------------------- DVC and git


def _run(ws: Path, args: list[str], what: str) -> str:
    r = subprocess.run(args, cwd=ws, env=_dvc_env(), capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        raise StageError(f"`{what}` exited with {r.returncode} in {ws}:\n{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout


def dvc(ws: Path, *args: str) -> str:
    return _run(ws, [sys.executable, "-m", "dvc", *args], "dvc " + " ".join(args))


def git(ws: Path, *args: str) -> str:
    return _run(ws, ["git", *args], "git " + " ".join(args))


@task(name="list-experiments", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def list_experiments(ws: Path) -> tuple[dict[str, Any], list[Found]]:
    """`dvc exp show --json`: the workspace's params and HEAD's experiments. I/O only, so it is retried."""
    return parse_exp_show(json.loads(dvc(ws, "exp", "show", "--json")))


@task(name="push-experiments", retries=3, retry_delay_seconds=[10, 30, 90], cache_policy=NO_CACHE)
def push_experiments(ws: Path, names: list[str], git_remote: str = "origin") -> str:
    """`dvc exp push <git_remote> <names>`: the experiments' git refs to the git remote and their
    outputs to the default DVC remote. I/O only, so it is retried."""
    return dvc(ws, "exp", "push", git_remote, *names)


@task(name="remove-experiment", cache_policy=NO_CACHE)
def remove_experiment(ws: Path, name: str) -> None:
    """Remove HEAD's experiment `name`, which ran with other params (DVC refuses to run a name twice)."""
    get_run_logger().warning("experiment %s ran with other params: removing it so the set can run it again", name)
    dvc(ws, "exp", "remove", name)


def run_experiment(ws: Path, planned: Planned, extra: dict[str, Any]) -> dict:
    """`dvc exp run --temp --name <name> -S ... <pipeline stages>`: the stages DVC ran, restored
    from its run cache, or skipped (see `dvc_repro`)."""
    sets = {**extra, **planned.sets}
    overrides = [f"{key}={hydra_value(value)}" for key, value in sets.items()]
    return dvc_repro.with_options(task_run_name=f"experiment {planned.name}")(ws, PIPELINE, overrides,
                                                                           experiment=planned.name)


# ---------------------------------------------------------------- records


def workspace_record(ws: Path, planned: Planned, ws_params: dict[str, Any]) -> Record:
    """The record of the workspace's own run, from its output files."""
    texts = {k: (ws / path).read_text(encoding="utf-8") for k, path in OUTPUTS.items()}
    return record_from_outputs(planned.name, planned.variant, planned.seed, "workspace", None, ws_params, **texts)


def experiment_record(ws: Path, planned: Planned, found: Found) -> Record:
    """The record of a finished experiment, from the files of its commit (metrics and plots are in git)."""
    texts = {k: git(ws, "show", f"{found.rev}:{path}") for k, path in OUTPUTS.items()}
    return record_from_outputs(planned.name, planned.variant, planned.seed, "experiment", found.rev, found.params,
                               **texts)


def experiment_set(ws_params: dict[str, Any], records: list[Record]) -> ExperimentSet:
    dataset = str(ws_params.get("prepare.dataset", ""))
    return ExperimentSet(dataset=os.path.basename(os.path.normpath(dataset)) if dataset else "",
                         eval_split=str(ws_params.get("eval_split", "")), records=records)


# ---------------------------------------------------------------- the flow


@flow(name="experiments")
def experiments(workspace: str = ".", seeds: list[int] | None = None, variants: list[str] | None = None,
                lock_timeout: float = 3600.0, push: bool = False, runs: list[str] | None = None):
    """Run (or reuse) the experiment set of the paper's claims and write its report.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml, a git repository).
        seeds: `train.seed` values; every variant runs once per seed (default [13]).
        variants: names from `dprpipe.claims.VARIANTS` (default: all of them).
        lock_timeout: seconds to wait for another flow run on this workspace before skipping.
        push: push the set's experiments with `dvc exp push origin <names>` (git refs to the git
            remote `origin`, outputs to the default DVC remote).
        runs: run names `<variant>-s<seed>`: the set is exactly these runs, instead of every
            variant at every seed (give `runs`, or `seeds` and `variants`, not both).
    """
    runs = planned(seeds, variants, runs)
    logger = get_run_logger()
    ws = resolve_workspace(workspace)
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        ws_params, found = list_experiments(ws)
        head = git(ws, "rev-parse", "HEAD").strip()
        local = [p for p in runs if is_workspace_run(ws_params, p)]
        summary: dict[str, Any] = {"workspace": [p.name for p in local], "reused": [], "run": [],
                                   "ran": {}, "cached": {}}
        if local:
            # the workspace's own run: DVC reruns what is stale, and nothing if dvc.lock is current
            done = dvc_repro(ws, PIPELINE, [])
            summary["ran"]["workspace"] = list(done["ran"])
        extra = dataset_override(ws, ws_params)
        wanted = {p.name: {**ws_params, **extra, **p.sets} for p in runs if p not in local}
        files = pipeline_files(ws)
        edited = changed(ws, files)
        if edited:
            logger.info("pipeline files differ from HEAD (%s): HEAD's experiments are not reused", ", ".join(edited))
        todo = []
        for p in runs:
            if p in local:
                continue
            if not edited and (hit := finished(found, p.name, wanted[p.name], head)):
                logger.info("%s: experiment %s on HEAD has these params; not rerun", p.name, hit.rev[:7])
                summary["reused"].append(p.name)
            else:
                todo.append(p)
        if todo and (missing := untracked(ws, files)):
            raise ValueError(f"the pipeline depends on files git does not track: {', '.join(missing)}; "
                             "`git add` (or commit) them, then rerun, so the experiments have them")
        for p in todo:
            if any(f.name == p.name and f.baseline == head for f in found):
                remove_experiment(ws, p.name)
            result = run_experiment(ws, p, extra)
            summary["run"].append(p.name)
            summary["ran"][p.name] = list(result["ran"])
            summary["cached"][p.name] = list(result["cached"])
        if todo:
            _, found = list_experiments(ws)
        records = []
        for p in runs:
            if p in local:
                records.append(workspace_record(ws, p, ws_params))
                continue
            hit = finished(found, p.name, wanted[p.name], head)
            if hit is None:   # listed before, gone after (removed meanwhile)
                raise StageError(f"experiment {p.name} is not in `dvc exp show` after its run; rerun the flow")
            records.append(experiment_record(ws, p, hit))
        path = ws / RECORDS
        text = to_json(experiment_set(ws_params, records))
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            logger.info("wrote %s (%d runs)", RECORDS, len(records))
        else:
            logger.info("%s unchanged (%d runs)", RECORDS, len(records))
        if push and (names := [p.name for p in runs if p not in local]):
            push_experiments(ws, names)
            summary["pushed"] = names
        report = dvc_repro(ws, [REPORT_STAGE], [])
        summary["report"] = "ran" if REPORT_STAGE in report["ran"] else "unchanged"
        create_markdown_artifact(key="experiments-report", markdown=(ws / REPORT).read_text(encoding="utf-8"),
                                 description="The experiment set of the paper's claims (reports/experiments.md)")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.experiments", description=__doc__.strip().splitlines()[0],
        epilog="Runs as a Prefect flow (on a temporary local server unless PREFECT_API_URL is set).")
    p.add_argument("--workspace", default=".", help="the DVC project folder (default: the current directory)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="train.seed values (default: 13)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--runs", nargs="+", metavar="NAME",
                   help="instead of --seeds and --variants: exactly these runs, named <variant>-s<seed> "
                        f"(e.g. {run_name('dpr_sep_dense', 14)} {run_name(REFERENCE, 13)})")
    p.add_argument("--lock-timeout", type=float, default=3600.0, help="seconds to wait for a busy workspace")
    p.add_argument("--push", action="store_true", help="push the experiments: dvc exp push origin <names>")
    args = p.parse_args(argv)
    try:   # before a Prefect server is started for it
        planned(args.seeds, args.variants, args.runs)
    except ValueError as e:
        p.error(str(e))
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED as ANALYTICS
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP, temporary_settings

    # the temporary server's 20 s default is too short on a busy 2-core machine (e.g. during training);
    # its telemetry heartbeat only fails on a closed network (and races the new database: "locked")
    with temporary_settings({STARTUP: max(STARTUP.value(), 120), ANALYTICS: False}):
        state = experiments(workspace=args.workspace, seeds=args.seeds, variants=args.variants,
                            lock_timeout=args.lock_timeout, push=args.push, runs=args.runs, return_state=True)
    if not state.is_completed() or state.name == "Skipped":
        print(f"experiments: {state.name}: {state.message or ''}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
