"""The experiment set of the paper's claims (issue 6) as DVC experiments, collected into a report.

`python -m flows.experiments --seeds 13 14 15` (the `experiments` flow) does, in the workspace:

1. The runs of the set that are params.yaml's own (`dpr_hn1` at params.yaml's seed): `dvc repro`
   of the pipeline stages, which DVC skips when dvc.lock is up to date. That run is the workspace's
   (committed at HEAD), not an experiment.
2. Every other (variant, seed) run, named `<variant>-s<seed>` (`dprpipe.report.VARIANTS`): a
   finished DVC experiment of that name, from any baseline commit, whose params and pipeline code
   equal what this run would use is reused; otherwise the run is queued with
   `dvc exp run --queue --name <name> -S <variant's keys> -S train.seed=<seed> <pipeline stages>`.
3. The queue runs in the foreground (`dvc exp run --run-all --jobs <jobs>`), each experiment in a
   temporary copy of the repository; every queued run must end as a finished experiment. If DVC's
   queue worker dies with runs still queued (a known race of its file broker), it is restarted.
4. The set's records (params, metrics per system, training history, recall curve) are written to
   reports/experiments.json, and `dvc repro report` writes reports/experiments.md and its plots.

Why the flow looks for finished experiments itself instead of relying on DVC's run cache: the
train stage has a persistent, uncached output (`models/dpr-state`), so DVC never puts train in its
run cache, and a queued experiment starts from a fresh copy without that folder: it would always
retrain. With nothing changed, a rerun finds every experiment, queues nothing, rewrites the same
records, and `dvc repro report` skips the report.

Inputs: the workspace (dvc.yaml, params.yaml, a git commit to base experiments on), the seeds and
variants. Outputs: the experiments (`dvc exp show`), reports/experiments.json, the report files,
and a Prefect markdown artifact `experiments-report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

if __package__ in (None, ""):   # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dprpipe.claims import (SEED_KEY, VARIANTS, ExperimentSet, Record, record_from_outputs, run_name,  # noqa: E402
                            to_json)
from flows.stage_runner import (ENCODING, EVALUATION, MINING, TRAINING, StageError, _dvc_env, _flatten,  # noqa: E402
                                dvc_repro, hydra_value, resolve_workspace, skipped, workspace_lock)

PIPELINE = [*MINING, *TRAINING, *ENCODING, *EVALUATION]   # what an experiment runs (not the report)
REPORT_STAGE = "report"
RECORDS = "reports/experiments.json"          # the report stage's input (dvc.yaml)
REPORT = "reports/experiments.md"             # its output
# the outputs a record is read from (dvc.yaml's train and evaluate stages)
OUTPUTS = {"retrieval_json": "metrics/retrieval.json", "train_json": "metrics/train.json",
           "train_csv": "plots/train.csv", "recall_csv": "plots/recall.csv"}
IGNORED_PARAMS = ("report.",)   # params no experiment reads: changing them must not retrain anything

_EXPERIMENT = re.compile(r"^Reproducing experiment '([^']+)'")
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_WORKERS = re.compile(r"Worker status: (\d+) active, (\d+) idle")
WATCH_SECONDS = 60.0   # how often run_queue checks that DVC's queue still has a worker


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


def _paths(entries: Any) -> list[str]:
    """The paths of a dvc.yaml deps/outs/metrics/plots list (plain strings or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def pipeline_code(ws: Path) -> dict[str, str]:
    """md5 of every file the pipeline stages depend on that is in the repository (code, not data).

    An experiment is reused only if it ran with these same files (its dvc.lock records their md5).
    A dependency that a stage writes (e.g. the evaluate stage's input `data/runs/dpr.tsv`) is data,
    different in every experiment, and is left out, whether or not the workspace holds a copy of it.
    """
    stages = (yaml.safe_load((ws / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    written = {o.rstrip("/") for st in stages.values() for key in ("outs", "metrics", "plots")
               for o in _paths(st.get(key))}
    out = {}
    for name in PIPELINE:
        for path in _paths(stages.get(name, {}).get("deps")):
            if "${" in path or not (ws / path).is_file():
                continue    # templated (the dataset) or a folder made by an upstream stage
            if any(path == o or path.startswith(o + "/") for o in written):
                continue
            out[path] = hashlib.md5((ws / path).read_bytes()).hexdigest()
    return out


def locked_code(lock_text: str) -> dict[str, set[str]]:
    """path -> the md5s the pipeline stages' entries in a dvc.lock record for it (one if consistent).

    Read from the experiment's own dvc.lock: `dvc exp show` merges the deps of all stages, and a
    stage that did not run in the experiment (the report) blanks the hashes of files it shares.

    >>> lock = "stages:\\n  train:\\n    deps:\\n    - path: a.py\\n      hash: md5\\n      md5: 0f\\n"
    >>> locked_code(lock)
    {'a.py': {'0f'}}
    """
    stages = (yaml.safe_load(lock_text) or {}).get("stages", {})
    out: dict[str, set[str]] = {}
    for name in PIPELINE:
        for dep in (stages.get(name) or {}).get("deps", []):
            out.setdefault(dep["path"], set()).add(dep.get("md5"))
    return out


def same_code(locked: dict[str, set[str]], code: dict[str, str]) -> bool:
    """Every pipeline code file has, in the lock, the md5 it has now."""
    return all(locked.get(path) == {md5} for path, md5 in code.items())


# ---------------------------------------------------------------- what DVC holds


@dataclass(frozen=True)
class Found:
    """An experiment `dvc exp show` lists (finished, queued, running or failed)."""

    name: str
    rev: str
    baseline: str
    state: str | None       # the queue's state: success, failed, queued, running; None if not queued
    failed: bool
    params: dict[str, Any]
    log: str | None

    @property
    def done(self) -> bool:
        return not self.failed and self.state in (None, "success")

    @property
    def pending(self) -> bool:
        return not self.failed and self.state in ("queued", "running")


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
                d = rev.get("data") or {}
                found.append(Found(
                    name=rev.get("name") or group.get("name") or "", rev=rev["rev"], baseline=item["rev"],
                    state=executor.get("state"), failed=bool(rev.get("error")) or executor.get("state") == "failed",
                    params=params_of(d), log=(executor.get("local") or {}).get("log")))
    return ws_params, found


def matching(found: list[Found], name: str, want: dict[str, Any], code: dict[str, str], head: str,
             lock_of: Callable[[str], dict[str, set[str]]]) -> Found | None:
    """The finished experiment `name` run with `want` params and the current `code` (`lock_of(rev)`:
    the code md5s in its dvc.lock); one based on HEAD first, then in `dvc exp show`'s order."""
    hits = [f for f in found if f.name == name and f.done and same_params(f.params, want)
            and same_code(lock_of(f.rev), code)]
    hits.sort(key=lambda f: f.baseline != head)
    return hits[0] if hits else None


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
    """`dvc exp show --json --all-commits`: experiments of every baseline, so that a commit made
    after a run (e.g. of the report) does not hide its experiments. I/O only, so it is retried."""
    return parse_exp_show(json.loads(dvc(ws, "exp", "show", "--json", "--all-commits")))


@task(name="queue-experiment", task_run_name="queue {planned.name}", cache_policy=NO_CACHE)
def queue_experiment(ws: Path, planned: Planned, extra: dict[str, Any]) -> list[str]:
    """`dvc exp run --queue --name <name> -S ... <pipeline stages>`; returns the command."""
    sets = {**extra, **planned.sets}
    args = ["exp", "run", "--queue", "--name", planned.name]
    for key, value in sets.items():
        args += ["-S", f"{key}={hydra_value(value)}"]
    args += ["-m", f"experiments flow: {planned.name}", *PIPELINE]
    get_run_logger().info("$ dvc %s", " ".join(args))
    dvc(ws, *args)
    return ["dvc", *args]


@task(name="remove-experiment", cache_policy=NO_CACHE)
def remove_experiment(ws: Path, found: Found, why: str) -> None:
    """Remove a stale finished experiment of HEAD, whose name the set needs again (DVC refuses to
    queue a name that HEAD's experiments already have)."""
    get_run_logger().warning("experiment %s (%s) %s: removing it so the set can run it again under that name",
                             found.name, found.rev[:7], why)
    dvc(ws, "exp", "remove", found.name)   # by name: `exp remove` takes HEAD's names, not commit hashes


def stalled(status: str) -> bool:
    """`dvc queue status` shows experiments waiting in the queue and no worker to run them.

    >>> stalled("Task  Name  Created  Status\\n7156741  dpr_sep-s14  05:27 PM  Queued\\n\\nWorker status: 0 active, 0 idle")
    True
    >>> stalled("7156741  dpr_sep-s14  05:27 PM  Queued\\nWorker status: 1 active, 0 idle")
    False
    """
    m = _WORKERS.search(status)
    queued = any(line.split()[-1:] == ["Queued"] for line in status.splitlines())
    return bool(m) and queued and m.group(1) == m.group(2) == "0"


def _watch_queue(ws: Path, jobs: int, stop: threading.Event, logger: Any, every: float = WATCH_SECONDS) -> None:
    """Restart DVC's queue worker when it has died with experiments still queued.

    DVC's worker can crash between two experiments on a half-written message of its file-system
    broker (kombu's "JSONDecodeError: Expecting value"; treeverse/dvc-task#73), and then
    `dvc exp run --run-all` waits for ever. Two stalled readings in a row (a worker takes a moment
    to start) trigger `dvc queue start`.
    """
    misses = 0
    while not stop.wait(every):
        try:
            misses = misses + 1 if stalled(dvc(ws, "queue", "status")) else 0
            if misses >= 2:
                logger.warning("DVC's queue has experiments waiting and no worker (it crashed?): "
                               "`dvc queue start --jobs %d`", jobs)
                misses = 0
                dvc(ws, "queue", "start", "--jobs", str(jobs))
        except StageError as err:   # a failed reading is not a stall; the watchdog itself must not die
            misses = 0
            logger.warning("queue watchdog: %s", err)


@task(name="run-queue", cache_policy=NO_CACHE)
def run_queue(ws: Path, jobs: int, watch_seconds: float = WATCH_SECONDS) -> dict[str, list[str]]:
    """`dvc exp run --run-all`: run the queue in the foreground, its output in the log, restarting
    DVC's worker if it dies (`_watch_queue`). Returns {experiment: [stages it ran]}. DVC exits 0
    even when an experiment failed: the caller checks every run it queued."""
    logger = get_run_logger()
    args = [sys.executable, "-m", "dvc", "exp", "run", "--run-all", "--jobs", str(jobs)]
    logger.info("$ dvc exp run --run-all --jobs %d  (in %s)", jobs, ws)
    proc = subprocess.Popen(args, cwd=ws, env=_dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    assert proc.stdout is not None
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_queue, args=(ws, jobs, stop, logger, watch_seconds), daemon=True)
    watcher.start()
    try:
        ran = _follow(proc.stdout, logger)
    finally:
        stop.set()
    if proc.wait() != 0:
        raise StageError(f"`dvc exp run --run-all` exited with {proc.returncode} in {ws}")
    return ran


def _follow(lines: Any, logger: Any) -> dict[str, list[str]]:
    """Log DVC's output line by line; {experiment: [stages it ran]} from its progress lines."""
    ran: dict[str, list[str]] = {}
    current = None
    for raw in lines:
        line = raw.rstrip("\n").split("\r")[-1].rstrip()
        if not line:
            continue
        logger.info("%s", line)
        if m := _EXPERIMENT.match(line):
            current = m.group(1)
            ran.setdefault(current, [])
        elif (m := _RUNNING.match(line)) and current is not None:
            ran[current].append(m.group(1))
    return ran


def _tail(path: str | None, lines: int = 30) -> str:
    if not path or not os.path.isfile(path):
        return "(no log)"
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


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
                jobs: int = 1, lock_timeout: float = 3600.0):
    """Run (or reuse) the experiment set of the paper's claims and write its report.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml, a git repository).
        seeds: `train.seed` values; every variant runs once per seed (default [13]).
        variants: names from `dprpipe.report.VARIANTS` (default: all of them).
        jobs: experiments run at once by the queue (training uses every core: keep 1 on a small machine).
        lock_timeout: seconds to wait for another flow run on this workspace before skipping.
    """
    logger = get_run_logger()
    ws = resolve_workspace(workspace)
    runs = plan(variants, seeds or [13])
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        ws_params, found = list_experiments(ws)
        local = [p for p in runs if is_workspace_run(ws_params, p)]
        summary: dict[str, Any] = {"workspace": [p.name for p in local], "reused": [], "queued": [], "ran": {}}
        if local:
            # the workspace's own run: DVC reruns what is stale, and nothing if dvc.lock is current
            done = dvc_repro(ws, PIPELINE, [])
            summary["ran"]["workspace"] = list(done["ran"])
        extra = dataset_override(ws, ws_params)
        code = pipeline_code(ws)
        head = git(ws, "rev-parse", "HEAD").strip()
        locks: dict[str, dict[str, set[str]]] = {}

        def lock_of(rev: str) -> dict[str, set[str]]:
            if rev not in locks:
                locks[rev] = locked_code(git(ws, "show", f"{rev}:dvc.lock"))
            return locks[rev]

        wanted = {p.name: {**ws_params, **extra, **p.sets} for p in runs if p not in local}
        waiting = []
        untracked = git(ws, "ls-files", "--others", "--exclude-standard", "--", *code).split() if code else []
        for p in runs:
            if p in local:
                continue
            if hit := matching(found, p.name, wanted[p.name], code, head, lock_of):
                logger.info("%s: finished experiment %s has these params and code; not rerun", p.name, hit.rev[:7])
                summary["reused"].append(p.name)
                continue
            pending = [f for f in found if f.name == p.name and f.pending]
            if pending:
                if not all(same_params(f.params, wanted[p.name]) for f in pending):
                    raise ValueError(f"experiment {p.name} is queued or running with other params; remove it "
                                     f"(`dvc queue remove {p.name}`, or `dvc queue kill {p.name}`) and rerun")
                logger.info("%s: already in DVC's queue; waiting for it", p.name)
            else:
                if untracked:
                    # a queued experiment is a git stash of the workspace: untracked files are not in it
                    raise ValueError(f"the pipeline depends on files git does not track: {', '.join(untracked)}; "
                                     f"`git add` (or commit) them, then rerun, so the queued experiments have them")
                for stale in [f for f in found if f.name == p.name and f.done and f.baseline == head]:
                    remove_experiment(ws, stale, "ran with other params or code")
                queue_experiment(ws, p, extra)
                summary["queued"].append(p.name)
            waiting.append(p)
        if waiting:
            others = sorted({f.name for f in found if f.pending} - {p.name for p in waiting})
            if others:
                logger.warning("DVC's queue also holds %s: `dvc exp run --run-all` runs them too", ", ".join(others))
            summary["ran"].update(run_queue(ws, jobs))
            _, found = list_experiments(ws)
            failed = []
            for p in waiting:
                if not matching(found, p.name, wanted[p.name], code, head, lock_of):
                    last = [f for f in found if f.name == p.name]
                    failed.append(f"{p.name}: {_tail(last[-1].log if last else None)}")
            if failed:
                raise StageError("experiment(s) did not finish (see `dvc queue logs <name>`):\n" + "\n".join(failed))
        records = []
        for p in runs:
            if p in local:
                records.append(workspace_record(ws, p, ws_params))
            else:
                hit = matching(found, p.name, wanted[p.name], code, head, lock_of)
                if hit is None:   # listed before the queue ran, gone after (removed meanwhile)
                    raise StageError(f"experiment {p.name} is no longer in `dvc exp show`; rerun the flow")
                records.append(experiment_record(ws, p, hit))
        path = ws / RECORDS
        text = to_json(experiment_set(ws_params, records))
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            logger.info("wrote %s (%d runs)", RECORDS, len(records))
        else:
            logger.info("%s unchanged (%d runs)", RECORDS, len(records))
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
    p.add_argument("--seeds", type=int, nargs="+", default=[13], metavar="SEED", help="train.seed values (default: 13)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="VARIANT",
                   help=f"variants to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--jobs", type=int, default=1, help="experiments run at once (default: 1)")
    p.add_argument("--lock-timeout", type=float, default=3600.0, help="seconds to wait for a busy workspace")
    args = p.parse_args(argv)
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED as ANALYTICS
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP, temporary_settings

    # the temporary server's 20 s default is too short on a busy 2-core machine (e.g. during training);
    # its telemetry heartbeat only fails on a closed network (and races the new database: "locked")
    with temporary_settings({STARTUP: max(STARTUP.value(), 120), ANALYTICS: False}):
        state = experiments(workspace=args.workspace, seeds=args.seeds, variants=args.variants, jobs=args.jobs,
                            lock_timeout=args.lock_timeout, return_state=True)
    if not state.is_completed() or state.name == "Skipped":
        print(f"experiments: {state.name}: {state.message or ''}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
