"""The Prefect flows over the DVC pipeline, on a tiny workspace (tests/flow_fixtures.py).

The flow tests share one workspace and run in file order, like a user would: the four stage
flows one after the other, then the pipeline with nothing changed (DVC skips every stage) and
with a params override (only the affected stages rerun, each subflow saves an experiment), a
run with `-S` overrides and a params file, a failing stage, and a busy workspace. They run
under `prefect_test_harness`. The end-to-end test (slow) starts a real Prefect server on
127.0.0.1, serves the deployments as the README does, triggers the pipeline through the REST API
and waits for it to complete.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from flow_fixtures import ROOT, commit, flow_env, run, set_params, tiny_workspace  # noqa: F401

from flows.stage_runner import (ENCODING, EVALUATION, LOCK_FILE, MINING, TRAINING, build_overrides, hydra_value,
                                summary)

ALL_STAGES = [*MINING, *TRAINING, *ENCODING, *EVALUATION]


@pytest.fixture(scope="module", autouse=True)
def flow_test_env():
    """Offline model loading, one thread per stage, and a git identity for `dvc exp run`."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in flow_env().items():
            if key not in ("PATH",) and os.environ.get(key) != value:
                mp.setenv(key, value)
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")   # no telemetry from the harness server
        yield


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_flow(flow, ws: Path, **kwargs):
    """Run a flow on the workspace; returns (final state, result or None)."""
    state = flow(workspace=str(ws), return_state=True, **kwargs)
    return state, (state.result() if state.is_completed() and state.name != "Skipped" else None)


def artifact(state, key: str) -> str:
    """The markdown of the artifact `key` that the state's flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert len(found) == 1, f"artifact {key!r} of this flow run: {found}"
    assert found[0].type == "markdown"
    return found[0].data


def flow_logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


# ---------------------------------------------------------------- parameters and deployments (no server)


def test_overrides_from_flow_parameters(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"eval_split": "test", "prepare": {"dataset": "data/a"},
                                                    "train": {"epochs": 2, "lr": 2.0e-5}, "evaluate": {"ks": [1, 5]}}))
    variant = {"train": {"epochs": 3, "lr": 2.0e-5}, "evaluate": {"ks": [1, 10]}}
    (ws / "variant.yaml").write_text(yaml.safe_dump(variant, sort_keys=False))
    # only values that differ become overrides (an unchanged float is not rewritten by DVC)
    assert build_overrides(ws, params="variant.yaml") == ["train.epochs=3", "evaluate.ks=[1,10]"]
    assert build_overrides(ws, dataset="data/a") == []
    assert build_overrides(ws, dataset="../shared/it's") == [r"prepare.dataset='../shared/it\'s'"]
    assert build_overrides(ws, params=str(ws / "variant.yaml"), overrides=["train.epochs=4"])[-1] == "train.epochs=4"
    (ws / "bad.yaml").write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ValueError, match=r"bad.yaml: train.epoch is not in .*params.yaml"):
        build_overrides(ws, params="bad.yaml")
    with pytest.raises(ValueError, match="not key=value"):
        build_overrides(ws, overrides=["train.epochs"])
    with pytest.raises(ValueError, match="no dvc.yaml"):
        from flows.stage_runner import resolve_workspace
        resolve_workspace(ws)
    assert hydra_value(None) == "null" and hydra_value(False) == "false" and hydra_value(0.5) == "0.5"


def test_summary_counts_a_stage_once():
    results = [{"ran": {"prepare": 1.0}, "skipped": [], "cached": [], "experiment": None},
               {"ran": {"mine": 2.0}, "skipped": ["prepare"], "cached": [], "experiment": "exp-1"},
               {"ran": {}, "skipped": ["prepare", "mine"], "cached": ["train"], "experiment": None}]
    assert summary(results) == {"order": ["prepare", "mine", "train"], "ran": {"prepare": 1.0, "mine": 2.0},
                                "skipped": [], "cached": ["train"], "experiments": ["exp-1"]}


def test_deployments_follow_the_schedules_file():
    from flows.deploy import FLOWS, build_deployments, load_schedules

    schedules = load_schedules()
    assert set(schedules["deployments"]) == set(FLOWS) == {"mining", "training", "encoding", "evaluation", "pipeline"}
    deployments = build_deployments(ROOT)
    assert {d.flow_name for d in deployments} == set(FLOWS)
    for d in deployments:
        assert d.name == "dprpipe"
        assert d.parameters["workspace"] == str(ROOT)
        assert [s.schedule.cron for s in d.schedules] == [schedules["deployments"][d.flow_name]["cron"]]
    # prefect.yaml (for `prefect deploy --all`) has the same flows on the same crons
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    crons = {d["entrypoint"].rsplit(":", 1)[1]: [s["cron"] for s in d["schedules"]] for d in project["deployments"]}
    assert crons == {name: [spec["cron"]] for name, spec in schedules["deployments"].items()}
    for d in project["deployments"]:
        assert (ROOT / d["entrypoint"].split(":")[0]).is_file()


def test_schedules_file_errors(tmp_path):
    from flows.deploy import load_schedules

    (tmp_path / "s.yaml").write_text("deployments:\n  mine:\n    cron: '0 1 * * *'\n")
    with pytest.raises(ValueError, match="unknown flow.*mine"):
        load_schedules(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("deployments:\n  mining: {}\n")
    with pytest.raises(ValueError, match="mining needs a cron"):
        load_schedules(tmp_path / "s.yaml")


# ---------------------------------------------------------------- each flow on the tiny workspace


def test_mining_flow(tiny_workspace, harness):
    from flows.mining import mining

    state, result = run_flow(mining, tiny_workspace)
    assert state.is_completed(), state.message
    assert result["ran"].keys() == {"prepare", "mine", "encode_zeroshot", "mine_dense"}
    data = json.loads((tiny_workspace / "metrics" / "data.json").read_text())
    assert data["documents"] == 40 and data["test_queries"] == 6
    for out in ("data/prepared/corpus.jsonl", "data/prepared/train.jsonl", "data/negatives/train.jsonl",
                "data/runs/bm25.tsv", "data/negatives_dense/train.jsonl"):
        assert (tiny_workspace / out).is_file(), out
    report = artifact(state, "mining-metrics")
    assert "| prepare | **ran** |" in report and "| mine | **ran** |" in report
    assert "No retrieval metrics yet" in report
    assert "| metrics/data.json | documents | – | 40 | new |" in report


def test_training_flow(tiny_workspace, harness):
    from flows.training import training

    state, result = run_flow(training, tiny_workspace)
    assert state.is_completed(), state.message
    assert result["ran"].keys() == {"train"} and sorted(result["skipped"]) == sorted(MINING)   # in DVC's order
    assert (tiny_workspace / "models" / "dpr" / "dpr_config.json").is_file()
    assert json.loads((tiny_workspace / "metrics" / "train.json").read_text())["epochs"] >= 1
    assert "| train | **ran** |" in artifact(state, "training-metrics")


def test_encoding_flow(tiny_workspace, harness):
    from flows.encoding import encoding

    state, result = run_flow(encoding, tiny_workspace)
    assert state.is_completed(), state.message
    assert list(result["ran"]) == list(ENCODING)
    for system in ("zeroshot", "dpr"):   # the zero-shot embeddings come from the mining flow
        assert (tiny_workspace / "data" / "embeddings" / system / "passages.npy").is_file()
        assert (tiny_workspace / "data" / "index" / system / "index.faiss").is_file()
        assert (tiny_workspace / "data" / "runs" / f"{system}.tsv").is_file()
    assert "| index | **ran** |" in artifact(state, "encoding-metrics")


def test_evaluation_flow(tiny_workspace, harness):
    from flows.evaluation import evaluation

    state, result = run_flow(evaluation, tiny_workspace)
    assert state.is_completed(), state.message
    assert result["ran"].keys() == {"evaluate"}
    metrics = json.loads((tiny_workspace / "metrics" / "retrieval.json").read_text())
    assert set(metrics) == {"bm25", "zeroshot", "dpr", "hybrid"}
    report = artifact(state, "evaluation-metrics")
    # nothing committed yet: every metric is new against HEAD
    assert f"| dpr | {metrics['dpr']['ndcg@10']:.4f} (new) |" in report
    assert "| system | ndcg@10 | mrr@10 |" in report


# ---------------------------------------------------------------- the pipeline: DVC decides what reruns


def test_pipeline_with_nothing_changed_runs_no_stage(tiny_workspace, harness):
    from flows.pipeline import pipeline

    commit(tiny_workspace, "first run")           # the metrics are now HEAD's
    lock = (tiny_workspace / "dvc.lock").read_text()
    state, result = run_flow(pipeline, tiny_workspace)
    assert state.is_completed(), state.message
    assert result["ran"] == {} and sorted(result["skipped"]) == sorted(ALL_STAGES)  # in DVC's order
    assert (tiny_workspace / "dvc.lock").read_text() == lock
    report = artifact(state, "pipeline-metrics")
    assert "**ran**" not in report and "| evaluate | unchanged, skipped | |" in report
    metrics = json.loads((tiny_workspace / "metrics" / "retrieval.json").read_text())
    assert f"| dpr | {metrics['dpr']['ndcg@10']:.4f} (=) |" in report      # no change against HEAD


def test_pipeline_after_a_params_override_reruns_only_affected_stages(tiny_workspace, harness):
    from flows.pipeline import pipeline

    run_file = tiny_workspace / "data" / "runs" / "dpr.tsv"
    before = run_file.read_bytes()
    # read by `index` only (not index_zeroshot: --exact)
    state, result = run_flow(pipeline, tiny_workspace, overrides=["index.kind=hnsw"])
    assert state.is_completed(), state.message
    # every subflow got the override: each ran `dvc exp run -S` (a plain `dvc repro` saves no
    # experiment), DVC applied it to the workspace, and the artifact names it
    assert len(set(result["experiments"])) == 4, result["experiments"]
    listed = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], tiny_workspace).stdout.split()
    assert set(result["experiments"]) <= set(listed), listed
    assert yaml.safe_load((tiny_workspace / "params.yaml").read_text())["index"]["kind"] == "hnsw"
    # evaluate reads the run file, not the params: DVC reruns it only if HNSW ranked differently. On a
    # tiny corpus HNSW is exact, and where flat and HNSW share one SIMD kernel (AVX-512) the scores are
    # bit for bit the same, so the run file may not change at all
    rerun = {"index", "evaluate"} if run_file.read_bytes() != before else {"index"}
    assert result["ran"].keys() == rerun
    assert set(result["skipped"]) == set(ALL_STAGES) - rerun
    assert json.loads((tiny_workspace / "data" / "index" / "dpr" / "index.json").read_text())["kind"] == "hnsw"
    report = artifact(state, "pipeline-metrics")
    assert "| index | **ran** |" in report and "| train | unchanged, skipped | |" in report
    assert "Overrides: `index.kind=hnsw` (`dvc exp run -S`)" in report
    commit(tiny_workspace, "hnsw")


def test_overrides_and_a_params_file_run_a_dvc_experiment(tiny_workspace, harness):
    from flows.evaluation import evaluation

    (tiny_workspace / "variant.yaml").write_text("evaluate:\n  hybrid_weight: 0.5\n  hybrid_normalize: true\n")
    state, result = run_flow(evaluation, tiny_workspace, params="variant.yaml", overrides=["evaluate.ks=[1,10]"])
    assert state.is_completed(), state.message
    assert result["ran"].keys() == {"evaluate"}
    # DVC applied the changed values to the workspace and saved the run as an experiment
    params = yaml.safe_load((tiny_workspace / "params.yaml").read_text())["evaluate"]
    assert params["hybrid_weight"] == 0.5 and params["ks"] == [1, 10]
    [experiment] = result["experiments"]
    assert experiment in run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], tiny_workspace).stdout.split()
    assert "recall@10" in json.loads((tiny_workspace / "metrics" / "retrieval.json").read_text())["dpr"]
    report = artifact(state, "evaluation-metrics")
    assert "Overrides: `evaluate.hybrid_weight=0.5`, `evaluate.ks=[1,10]` (`dvc exp run -S`)" in report
    run(["git", "checkout", "params.yaml"], tiny_workspace)
    (tiny_workspace / "variant.yaml").unlink()


def test_a_failing_stage_fails_the_flow_with_its_error(tiny_workspace, harness):
    from flows.evaluation import evaluation

    set_params(tiny_workspace, {"evaluate.ks": "ten"})
    try:
        state, _ = run_flow(evaluation, tiny_workspace)
    finally:
        run(["git", "checkout", "params.yaml"], tiny_workspace)
    assert state.is_failed()
    # the stage's one-line error names the file and the key's line: error: params.yaml:<line>: ...
    error = re.compile(r"error: params\.yaml:\d+: evaluate\.ks: expected a list")
    assert error.search(state.message) and "stage 'evaluate' failed" in state.message
    assert error.search(flow_logs(state))


def _hold_lock(ws: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the workspace lock (as a concurrent flow run would) for `seconds`."""
    code = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws / LOCK_FILE), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_busy_workspace_is_skipped_or_waited_for(tiny_workspace, harness):
    from flows.evaluation import evaluation

    (tiny_workspace / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    holder = _hold_lock(tiny_workspace, 60)
    try:
        state, _ = run_flow(evaluation, tiny_workspace, lock_timeout=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert state.is_completed() and state.name == "Skipped"
    assert f"workspace {tiny_workspace} is busy" in state.message and "skipped" in state.message
    logs = flow_logs(state)
    assert "is busy" in logs and "$ dvc" not in logs            # DVC never started

    holder = _hold_lock(tiny_workspace, 2)
    try:
        t0 = time.perf_counter()
        state, result = run_flow(evaluation, tiny_workspace, lock_timeout=60)
        waited = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    assert state.is_completed() and state.name == "Completed"
    assert result["skipped"] and waited > 1.0


# ---------------------------------------------------------------- end to end: a real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str, procs=()):
    """Poll `check` until it returns something true; a connection error or timeout counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{what}: a process exited early ({p.args})"
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_served_pipeline_deployment_end_to_end(tiny_workspace, tmp_path):
    """docs/prefect.md's schedule commands 2 and 3 against a real server: serve in the background, trigger
    the pipeline deployment through the REST API, wait for Completed, read its artifact."""
    # the module's workspace: after the tests above only evaluate is stale; run alone, every stage is
    ws = tiny_workspace
    built = (ws / "dvc.lock").is_file()
    set_params(ws, {"evaluate.hybrid_weight": 0.7})
    t0 = time.monotonic()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in flow_env().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false")
    deploy = [sys.executable, "flows/deploy.py", "--workspace", str(ws)]
    pid_file, serve_log = ws / ".dvc/tmp/prefect-serve.pid", ws / ".dvc/tmp/prefect-serve.log"
    server = None
    try:
        with open(tmp_path / "server.log", "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120,
              "the Prefect server's health check", [server])
        print(f"server up after {time.monotonic() - t0:.1f}s")
        # returns once the five deployments are registered; the serve process keeps running
        r = subprocess.run([*deploy, "--background"], cwd=ROOT, env={**env, "PREFECT_API_URL": api},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"deployments served after {time.monotonic() - t0:.1f}s")
        dep = httpx.get(f"{api}/deployments/name/pipeline/dprpipe", timeout=10).json()
        assert dep["parameters"]["workspace"] == str(ws)
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * 6"]
        names = {d["name"] for d in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
        assert {"mining", "training", "encoding", "evaluation", "pipeline"} <= names

        def trigger():   # retried on a busy server; the idempotency key makes a retry create no second run
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run",
                           json={"idempotency_key": f"e2e-{port}"}, timeout=30)
            assert r.status_code < 400 or r.status_code >= 500, r.text
            return r.json()["id"] if r.status_code < 400 else None

        run_id = _wait(trigger, 60, "the pipeline deployment's flow run to be created", [server])

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, 400, "the pipeline flow run", [server])
        assert state["type"] == "COMPLETED", f"{state}\n{serve_log.read_text()[-4000:]}"
        print(f"pipeline run completed after {time.monotonic() - t0:.1f}s")

        found = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
                           timeout=10).json()
        [report] = [a for a in found if a["key"] == "pipeline-metrics"]
        assert report["type"] == "markdown" and "| dpr |" in report["data"] and "ndcg@10" in report["data"]
        # a params.yaml edit: evaluate reruns; on the workspace the tests above built, nothing else
        assert "| evaluate | **ran** |" in report["data"]
        if built:
            assert report["data"].count("**ran**") == 1, report["data"]
        assert json.loads((ws / "metrics" / "retrieval.json").read_text())["dpr"]["queries"] == 6
    finally:
        pid = int(pid_file.read_text()) if pid_file.is_file() else None
        subprocess.run([*deploy, "--stop"], cwd=ROOT, env=env, capture_output=True, timeout=60)
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
        _stop(server)
    assert server.returncode is not None and not (pid and _running(pid))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return not Path(f"/proc/{pid}/status").is_file() or "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
