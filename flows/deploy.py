"""Serve the five flows as Prefect deployments on the cron schedules of flows/schedules.yaml.

    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deploy.py [--workspace DIR] [--background]

The serve process runs each scheduled (or hand-triggered) flow run in a subprocess and pauses
the schedules when it stops. Every deployment gets the absolute workspace path as its
`workspace` parameter, so runs do not depend on where the process was started. It first waits
for the server to answer, so it can follow `prefect server start --background` at once.
`--background` returns once the deployments are registered and leaves the serve process
running (pid and log in <workspace>/.dvc/tmp/prefect-serve.*); `--stop` stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

if __package__ in (None, ""):   # run as a script: make the project's `flows` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOCAL_HOST = "127.0.0.1"   # what every service this project starts listens on, unless told otherwise
# The serve process's optional webserver (PREFECT_RUNNER_SERVER_ENABLE=true) binds Prefect's
# default "localhost", whatever that resolves to; pin it to loopback unless the variable is set.
# It must be set before prefect is imported: the runner's server thread reads the settings of
# import time.
os.environ.setdefault("PREFECT_RUNNER_SERVER_HOST", LOCAL_HOST)

from prefect import serve  # noqa: E402
from prefect.client.schemas.schedules import CronSchedule  # noqa: E402

from flows.stage_runner import resolve_workspace  # noqa: E402
from flows.encoding import encoding  # noqa: E402
from flows.evaluation import evaluation  # noqa: E402
from flows.mining import mining  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402
from flows.training import training  # noqa: E402

FLOWS = {f.name: f for f in (mining, training, encoding, evaluation, pipeline)}
SCHEDULES = Path(__file__).with_name("schedules.yaml")
SERVE_STATE = ".dvc/tmp/prefect-serve"   # .pid and .log of a --background serve process


def load_schedules(path: str | Path = SCHEDULES) -> dict:
    """schedules.yaml, checked: every deployment names a known flow and has a cron string."""
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    deployments = config.get("deployments") or {}
    unknown = sorted(set(deployments) - set(FLOWS))
    if unknown:
        raise ValueError(f"{path}: unknown flow(s) {', '.join(unknown)}; known: {', '.join(FLOWS)}")
    for name, spec in deployments.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("cron"), str):
            raise ValueError(f"{path}: deployments.{name} needs a cron string, e.g. cron: \"0 1 * * *\"")
    return {"name": config.get("name", "dprpipe"), "timezone": config.get("timezone"), "deployments": deployments}


def build_deployments(workspace: str | Path = ".", schedules: str | Path = SCHEDULES, name: str | None = None,
                      paused: bool = False) -> list:
    """One RunnerDeployment per flow of schedules.yaml, bound to `workspace`."""
    ws = resolve_workspace(workspace)
    config = load_schedules(schedules)
    out = []
    for flow_name, spec in config["deployments"].items():
        parameters = {**(spec.get("parameters") or {}), "workspace": str(ws)}
        out.append(FLOWS[flow_name].to_deployment(
            name=name or config["name"],
            schedules=[CronSchedule(cron=spec["cron"], timezone=config["timezone"])],
            paused=paused,
            parameters=parameters,
            tags=["dprpipe", "dvc"],
            description=f"{flow_name} on {ws} (cron {spec['cron']})"))
    return out


def wait_for_server(timeout: float) -> None:
    """Block until the Prefect API answers; exit with a clear message if it is unset or down."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        sys.exit(f"error: PREFECT_API_URL is not set: start a server (prefect server start --host {LOCAL_HOST} "
                 f"--port 4200 --background) and run with PREFECT_API_URL=http://{LOCAL_HOST}:4200/api")
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while (error := client.api_healthcheck()) is not None:
            if time.monotonic() > deadline:
                sys.exit(f"error: no Prefect server answers at {url} after {timeout:.0f}s ({error})")
            time.sleep(1)


def _alive(pid: int) -> bool:
    """True if `pid` is a running serve process of this script (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path("/proc").is_dir() else b"deploy.py"
        os.kill(pid, 0)
    except (OSError, ProcessLookupError):
        return False
    return b"deploy.py" in cmdline


def start_background(args: argparse.Namespace, ws: Path, full_names: list[str]) -> None:
    """Start the serve process detached, wait until it has registered the deployments, return."""
    from prefect.client.orchestration import get_client

    pid_file, log_file = (ws / SERVE_STATE).with_suffix(".pid"), (ws / SERVE_STATE).with_suffix(".log")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    if pid_file.is_file() and _alive(int(pid_file.read_text())):
        sys.exit(f"error: a serve process (pid {pid_file.read_text().strip()}) already serves {ws}; "
                 f"stop it with `python flows/deploy.py --stop --workspace {ws}`")
    command = [sys.executable, str(Path(__file__).resolve()), "--workspace", str(ws), "--schedules", args.schedules]
    command += (["--name", args.name] if args.name else []) + (["--paused"] if args.paused else [])
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + args.server_timeout
    with get_client(sync_client=True) as client:
        for full_name in full_names:
            while True:
                if proc.poll() is not None:
                    pid_file.unlink(missing_ok=True)
                    sys.exit(f"error: the serve process exited ({proc.returncode}); its log {log_file}:\n"
                             + log_file.read_text()[-3000:])
                try:
                    client.read_deployment_by_name(full_name)
                    break
                except Exception:  # ObjectNotFound until the serve process has registered it
                    if time.monotonic() > deadline:
                        sys.exit(f"error: {full_name} not registered after {args.server_timeout:.0f}s; see {log_file}")
                    time.sleep(1)
    print(f"Serving {', '.join(full_names)} in the background (pid {proc.pid}, log {log_file}).\n"
          f"Stop it with: python flows/deploy.py --stop" + ("" if args.workspace == "." else f" --workspace {ws}"))


def stop_background(ws: Path) -> None:
    pid_file = (ws / SERVE_STATE).with_suffix(".pid")
    if not pid_file.is_file():
        sys.exit(f"no background serve process for {ws}")
    pid = int(pid_file.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)   # serve pauses the schedules on shutdown
        for _ in range(60):
            if not _alive(pid):
                break
            time.sleep(0.5)
    pid_file.unlink(missing_ok=True)
    print(f"Stopped the serve process {pid}.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--workspace", default=".", help="the DVC project the runs work in (default: current directory)")
    p.add_argument("--schedules", default=str(SCHEDULES), help="cron schedules file (default: flows/schedules.yaml)")
    p.add_argument("--name", default=None, help="deployment name (default: `name` in the schedules file)")
    p.add_argument("--paused", action="store_true", help="create the schedules paused (runs only when triggered)")
    p.add_argument("--background", action="store_true", help="serve in a detached process; return once registered")
    p.add_argument("--stop", action="store_true", help="stop the --background serve process of the workspace")
    p.add_argument("--server-timeout", type=float, default=120.0, help="seconds to wait for the server (default 120)")
    args = p.parse_args(argv)
    ws = resolve_workspace(args.workspace)
    if args.stop:
        return stop_background(ws)
    deployments = build_deployments(ws, args.schedules, args.name, args.paused)
    wait_for_server(args.server_timeout)
    if args.background:
        return start_background(args, ws, [f"{d.flow_name}/{d.name}" for d in deployments])
    serve(*deployments)


if __name__ == "__main__":
    main()
