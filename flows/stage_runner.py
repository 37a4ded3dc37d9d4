"""Shared plumbing of the flows: run DVC stages, guard the workspace, publish the metrics.

The flows never decide what is stale: a flow's task runs `dvc repro <its stages>` (or, when the
run has overrides, `dvc exp run -S key=value ... <its stages>`) in the workspace, and DVC reruns
what changed and skips the rest. DVC's output is streamed into the Prefect log line by line and
parsed for which stages ran and how long each took.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

# the stages each flow runs, in dvc.yaml's order
MINING = ("prepare", "mine", "encode_zeroshot", "mine_dense")   # dense negatives come from the zero-shot embeddings
TRAINING = ("train",)
ENCODING = ("encode", "index_zeroshot", "index")
EVALUATION = ("evaluate",)

RETRIEVAL_METRICS = "metrics/retrieval.json"   # the evaluate stage's metrics file (dvc.yaml)
LOCK_FILE = ".dvc/tmp/prefect-flows.lock"       # the workspace guard (.dvc/tmp is never committed)

# what `dvc repro` / `dvc exp run` print about each stage
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_UNCHANGED = re.compile(r"^Stage '([^']+)' didn't change, skipping")
_CACHED = re.compile(r"^Stage '([^']+)' is cached - skipping run")
_LOCK_WRITTEN = re.compile(r"^Updating lock file")
_EXPERIMENT = re.compile(r"^Reproducing experiment '([^']+)'")
_DVC_LOCKED = "Unable to acquire lock"


# the parameters every stage flow takes, documented once (Prefect shows them in the UI)
FLOW_ARGS = """Args:
    workspace: the DVC project folder (dvc.yaml, params.yaml); default the current directory.
    params: a YAML file in params.yaml's layout; its values that differ from the workspace's
        params.yaml are applied as `-S` overrides.
    dataset: a dataset folder for `prepare.dataset` (applied as an override).
    overrides: `key=value` overrides, as `dvc exp run -S key=value`.
    lock_timeout: seconds to wait for another run on this workspace before skipping
        (0: skip at once; negative: wait forever).
"""


def flow_doc(summary: str):
    """Give a stage flow its docstring: `summary`, then FLOW_ARGS (set before `@flow` reads it)."""
    def deco(fn):
        fn.__doc__ = f"{summary}\n\n{FLOW_ARGS}"
        return fn
    return deco


class StageError(RuntimeError):
    """A DVC stage (or DVC itself) failed; the message carries the end of its output."""


# ---------------------------------------------------------------- parameters


def resolve_workspace(workspace: str | os.PathLike) -> Path:
    """The DVC project folder a flow runs in; it must hold dvc.yaml and params.yaml."""
    ws = Path(workspace).expanduser().resolve()
    for name in ("dvc.yaml", "params.yaml"):
        if not (ws / name).is_file():
            raise ValueError(f"workspace {ws} has no {name}: pass the project folder as the `workspace` parameter")
    return ws


def hydra_value(value: Any) -> str:
    """A YAML value written in the override grammar of `dvc exp run -S` (Hydra's).

    >>> hydra_value([1, 5]), hydra_value(True), hydra_value("../data/x")
    ('[1,5]', 'true', "'../data/x'")
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ValueError(f"cannot pass {value!r} as a -S override; use a scalar or a list")


def _flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_overrides(workspace: Path, params: str | None = None, dataset: str | None = None,
                    overrides: list[str] | None = None) -> list[str]:
    """The `-S key=value` overrides of a run, from the three flow parameters.

    - `params`: a YAML file in params.yaml's layout (relative to the workspace, or absolute);
      each of its values that differs from the workspace params.yaml becomes an override.
      Keys params.yaml does not have are an error (the stages reject unknown keys).
    - `dataset`: an override of `prepare.dataset`, when it differs.
    - `overrides`: `key=value` strings passed to DVC as they are (they win over the two above).
    """
    current = _flatten(yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8")) or {})
    wanted: dict[str, Any] = {}
    if params:
        path = Path(params).expanduser()
        path = path if path.is_absolute() else workspace / path
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the params file {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"params file {path}: expected a mapping of sections, like params.yaml")
        for key, value in _flatten(loaded).items():
            if key not in current:
                raise ValueError(f"params file {path}: {key} is not in {workspace / 'params.yaml'}; "
                                 f"only existing keys can be overridden")
            wanted[key] = value
    if dataset:
        wanted["prepare.dataset"] = dataset
    out = [f"{key}={hydra_value(value)}" for key, value in wanted.items() if current.get(key) != value]
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"override {item!r} is not key=value (as in `dvc exp run -S train.epochs=3`)")
        out.append(item)
    return out


# ---------------------------------------------------------------- the workspace guard

_LOCKS: dict[Path, FileLock] = {}


@contextmanager
def workspace_lock(workspace: Path, timeout: float) -> Iterator[str | None]:
    """Hold the workspace's flow lock; yields None when held, or why the run must skip.

    Two flow runs on one workspace never run DVC at once: the second waits up to `timeout`
    seconds (negative: forever), then skips. The lock is re-entrant in one process, so the
    pipeline flow holds it across its subflows.
    """
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(path, FileLock(path))
    owner = path.with_suffix(".owner")
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else "another process"
        yield (f"workspace {workspace} is busy: {holder} holds {path}; waited {timeout:g}s, "
               f"so this run is skipped (raise `lock_timeout` to wait longer)")
        return
    try:
        if lock.lock_counter == 1:
            owner.write_text(f"flow run {flow_run.name or '?'} ({flow_run.id or 'no id'}, pid {os.getpid()}) "
                             f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
        yield None
    finally:
        if lock.lock_counter == 1:
            owner.unlink(missing_ok=True)
        lock.release()


def skipped(reason: str):
    """The final state of a run that did not get the workspace."""
    get_run_logger().warning(reason)
    return Completed(name="Skipped", message=reason)


# ---------------------------------------------------------------- DVC


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml's commands call `python`: make it this interpreter, even if the venv is not activated
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stage_command(stages: list[str], overrides: list[str], message: str | None = None,
                  experiment: str | None = None) -> list[str]:
    """`dvc repro <stages>`, or with overrides `dvc exp run -S ... <stages>` (saved as one experiment);
    a named `experiment` runs in a temporary copy of the workspace (`dvc exp run --temp --name`),
    leaving the workspace as it was."""
    if not overrides and experiment is None:
        return ["repro", *stages]
    args = ["exp", "run"]
    if experiment is not None:
        args += ["--temp", "--name", experiment]
    for item in overrides:
        args += ["-S", item]
    if message:
        args += ["-m", message]
    return args + list(stages)


def _task_run_name() -> str:
    from prefect.runtime import task_run

    name = task_run.parameters.get("experiment")
    return ("dvc " + " ".join(task_run.parameters.get("stages", []))) + (f" ({name})" if name else "")


@task(name="dvc-repro", task_run_name=_task_run_name, cache_policy=NO_CACHE)
def dvc_repro(workspace: Path, stages: list[str], overrides: list[str], experiment: str | None = None) -> dict:
    """Run DVC stages in one `dvc repro` (DVC also reruns whatever upstream of them is stale).

    No retries: the stages are compute (and a rerun of the flow continues where DVC stopped).
    With `experiment`, the stages run as that named experiment in a temporary copy (see
    `stage_command`). Returns {"targets", "command", "order": stages as DVC met them, "ran": {stage: seconds},
    "skipped": [...], "cached": [...], "experiment", "seconds"}. A failing stage raises StageError
    with the end of its output, which is also logged.
    """
    logger = get_run_logger()
    message = f"Prefect flow run {flow_run.name}: {' '.join(stages)}" if flow_run.name else None
    args = stage_command(stages, overrides, message, experiment)
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    result = {"targets": list(stages), "command": "dvc " + " ".join(args), "order": [], "ran": {}, "skipped": [],
              "cached": [], "experiment": None, "seconds": 0.0}
    tail: deque[str] = deque(maxlen=40)
    current, started = None, 0.0

    def finish(now: float) -> None:
        nonlocal current
        if current is not None:
            result["ran"][current] = round(now - started, 2)
            logger.info("stage %s ran in %.1fs", current, now - started)
            current = None

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=workspace, env=_dvc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n").split("\r")[-1].rstrip()   # progress bars: keep their last state
        if not line:
            continue
        tail.append(line)
        logger.info("%s", line)
        now = time.perf_counter()
        if m := _RUNNING.match(line):
            finish(now)
            current, started = m.group(1), now
            result["order"].append(current)
        elif m := _UNCHANGED.match(line):
            finish(now)
            result["skipped"].append(m.group(1))
            result["order"].append(m.group(1))
        elif m := _CACHED.match(line):
            finish(now)
            result["cached"].append(m.group(1))
            result["order"].append(m.group(1))
        elif _LOCK_WRITTEN.match(line):
            finish(now)
        elif m := _EXPERIMENT.match(line):
            result["experiment"] = m.group(1)
    rc = proc.wait()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if rc != 0:
        output = "\n".join(tail)
        if _DVC_LOCKED in output:
            why = ("DVC's own lock is held by another DVC process in this workspace (one not started by "
                   "these flows, e.g. a `dvc repro` in a shell); wait for it and rerun")
        else:
            why = f"stage {current!r} failed" if current else f"`dvc {' '.join(args)}` failed"
        logger.error("dvc %s failed (exit %d): %s\n%s", " ".join(args), rc, why, output)
        raise StageError(f"{why}: `dvc {' '.join(args)}` exited with {rc} in {workspace}; its last output:\n{output}")
    finish(time.perf_counter())
    for name in result["skipped"]:
        logger.info("stage %s unchanged: skipped by DVC", name)
    for name in result["cached"]:
        logger.info("stage %s restored from DVC's run cache", name)
    return result


@task(name="read-metrics", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def read_metrics(workspace: Path) -> dict:
    """The workspace's metrics against the last commit, as `dvc metrics diff --all --json` (through
    DVC's Python API: it reads git), and the retrieval metrics file. I/O only, so it is retried."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        result = repo.metrics.diff(a_rev="HEAD", all=True)
    for rev, errors in result.get("errors", {}).items():
        # a metrics file not written yet (or not committed) is expected; anything else is worth a look
        for name, err in (errors.items() if isinstance(errors, dict) else [("", errors)]):
            if not isinstance(err, FileNotFoundError):
                get_run_logger().warning("dvc metrics diff: cannot read %s at %s: %s", name or "metrics", rev, err)
    path = workspace / RETRIEVAL_METRICS
    retrieval = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return {"retrieval": retrieval, "diff": result.get("diff", {})}


# ---------------------------------------------------------------- the report


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _change(entry: dict | None) -> str:
    if not entry or entry.get("old") is None:
        return "new"
    d = entry.get("diff")
    if d is None or d == 0:
        return "="
    return f"{d:+.4f}" if isinstance(d, float) else f"{d:+d}" if isinstance(d, int) else str(d)


def render_report(flow_name: str, workspace: Path, results: list[dict], metrics: dict,
                  overrides: list[str]) -> str:
    """The markdown of a run's artifact: stage timings, retrieval metrics and their change vs HEAD."""
    lines = [f"# {flow_name}: retrieval metrics", "",
             f"Workspace `{workspace}`; flow run `{flow_run.name or '-'}`.",
             f"Overrides: {', '.join(f'`{o}`' for o in overrides) if overrides else 'none'} "
             f"(`dvc {'exp run -S' if overrides else 'repro'}`).", "",
             "## Stages", "", "| stage | DVC | seconds |", "| --- | --- | --- |"]
    done = summary(results)
    for name in done["order"]:
        if name in done["ran"]:
            lines.append(f"| {name} | **ran** | {done['ran'][name]:.1f} |")
        elif name in done["cached"]:
            lines.append(f"| {name} | restored from run cache | |")
        else:
            lines.append(f"| {name} | unchanged, skipped | |")
    if done["experiments"]:
        lines += ["", "Saved as DVC experiments: " + ", ".join(f"`{e}`" for e in done["experiments"])
                  + " (`dvc exp show`)."]
    retrieval, diff = metrics["retrieval"], metrics["diff"]
    rdiff = diff.get(RETRIEVAL_METRICS, {})
    lines += ["", f"## Retrieval ({RETRIEVAL_METRICS}), change against HEAD (`dvc metrics diff`)", ""]
    if not retrieval:
        lines.append("No retrieval metrics yet: the evaluate stage has not run in this workspace.")
    else:
        names = list(dict.fromkeys(k for m in retrieval.values() for k in m))
        lines += ["| system | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
        for system, m in retrieval.items():
            cells = [f"{_fmt(m.get(k))} ({_change(rdiff.get(f'{system}.{k}'))})" for k in names]
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    other = {f: d for f, d in diff.items() if f != RETRIEVAL_METRICS and d}
    if other:
        lines += ["", "## Other metrics", "", "| file | metric | HEAD | now | change |", "| --- " * 5 + "|"]
        for f, entries in sorted(other.items()):
            for k, e in sorted(entries.items()):
                lines.append(f"| {f} | {k} | {_fmt(e.get('old'))} | {_fmt(e.get('new'))} | {_change(e)} |")
    return "\n".join(lines) + "\n"


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish(flow_name: str, workspace: Path, results: list[dict], metrics: dict, overrides: list[str]) -> str:
    """Log the stage timings and publish the run's metrics as a markdown artifact `<flow>-metrics`."""
    logger = get_run_logger()
    done = summary(results)
    timings = [f"{n} {s:.1f}s" for n, s in done["ran"].items()]
    untouched = done["skipped"] + done["cached"]
    logger.info("stage timings: %s; not rerun: %s", ", ".join(timings) or "none ran",
                ", ".join(untouched) or "none")
    markdown = render_report(flow_name, workspace, results, metrics, overrides)
    create_markdown_artifact(key=f"{flow_name}-metrics", markdown=markdown,
                             description=f"Retrieval metrics after the {flow_name} run, vs the last commit")
    return markdown


def run_stages(flow_name: str, stages: tuple[str, ...], workspace: str, params: str | None, dataset: str | None,
               overrides: list[str] | None, lock_timeout: float):
    """The body every stage flow shares: take the workspace, run the stages in order, publish."""
    ws = resolve_workspace(workspace)
    sets = build_overrides(ws, params, dataset, overrides)
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        results = [dvc_repro(ws, list(stages), sets)]
        publish(flow_name, ws, results, read_metrics(ws), sets)
    return summary(results)


def summary(results: list[dict]) -> dict:
    """What a flow returns, over its DVC tasks (or subflows): the stages DVC ran (with seconds),
    restored from its run cache, or skipped as unchanged, in the order DVC met them; a stage
    that ran in one task and was up to date in a later one counts as ran.

    >>> done = summary([{"order": ["prepare"], "ran": {"prepare": 1.0}, "skipped": [], "cached": []},
    ...                 {"order": ["prepare", "mine"], "ran": {"mine": 2.0}, "skipped": ["prepare"], "cached": []}])
    >>> done["order"], done["skipped"]
    (['prepare', 'mine'], [])
    """
    ran = {n: s for r in results for n, s in r["ran"].items()}
    cached = list(dict.fromkeys(n for r in results for n in r["cached"] if n not in ran))
    unchanged = list(dict.fromkeys(n for r in results for n in r["skipped"] if n not in ran and n not in cached))
    order = list(dict.fromkeys(n for r in results for n in r.get("order", [*r["skipped"], *r["cached"], *r["ran"]])))
    return {"order": order, "ran": ran, "skipped": unchanged, "cached": cached,
            "experiments": [e for r in results for e in r.get("experiments", [r.get("experiment")]) if e]}
