"""The release flow on a tiny workspace (tests/flow_fixtures.py) with real remotes.

The workspace gets a DVC folder remote and a bare git repository as `origin`, both in temporary
folders. The tests run in file order, like the weekly schedule: the first pipeline run with
`promote` becomes v1 and is pushed; a run made worse on purpose (a bad hybrid weight) is refused
by the gate and leaves v1 promoted; a workspace whose outputs differ from dvc.lock is refused; a
run that passes (a new HNSW index, no metric lower) becomes v2. Then a fresh clone of the bare
repository pulls the promoted outputs from the DVC remote, `dvc repro` there runs no stage, and
v1's git tag brings v1's outputs back.
"""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import pytest
from flow_fixtures import run, set_params, tiny_workspace  # noqa: F401
from test_flows import flow_test_env, harness  # noqa: F401  (offline models, a git identity; the Prefect harness)

from dprpipe.evaluate import EvaluateConfig
from dprpipe.release import read_current, read_release
from dprpipe.serve import Service
from flows.experiments import PIPELINE

DEFAULT_WEIGHT = EvaluateConfig().hybrid_weight   # params.yaml's, which test_config holds equal
QUERY = b"q=what+is+the+apple&mode=hybrid&k=5"   # a search request to the service core


@pytest.fixture(scope="module")
def remotes(tiny_workspace, tmp_path_factory):
    """A bare git repository as `origin` and a DVC folder remote as the default, committed."""
    base = tmp_path_factory.mktemp("remotes")
    bare, storage = base / "origin.git", base / "dvc-storage"
    run(["git", "init", "-q", "--bare", str(bare)], base)
    ws = tiny_workspace
    run(["git", "remote", "add", "origin", str(bare)], ws)
    dvc(ws, "remote", "add", "-d", "storage", str(storage))
    run(["git", "add", ".dvc/config"], ws)
    run(["git", "commit", "-q", "-m", "DVC remote"], ws)
    branch = run(["git", "branch", "--show-current"], ws).stdout.strip()
    run(["git", "push", "-q", "-u", "origin", branch], ws)
    return {"bare": bare, "storage": storage, "branch": branch, "clones": base}


def dvc(cwd: Path, *args: str, timeout: float = 600):
    return run([sys.executable, "-m", "dvc", *args], cwd, timeout=timeout)


def git(cwd: Path, *args: str) -> str:
    return run(["git", *args], cwd).stdout.strip()


def run_pipeline(ws: Path, **kwargs):
    from flows.pipeline import pipeline

    return pipeline(workspace=str(ws), promote=True, return_state=True, **kwargs)


def gate_artifact() -> str:
    """The markdown of the latest `release-gate` artifact (the release subflow's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["release-gate"])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)
    assert latest.type == "markdown"
    return latest.data


def remote_tags(bare: Path) -> set[str]:
    return {line.split("refs/tags/")[1] for line in git(bare, "show-ref", "--tags").splitlines()} \
        if git(bare, "tag") else set()


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def retrieval(ws: Path) -> dict:
    return json.loads((ws / "metrics" / "retrieval.json").read_text())


# ---------------------------------------------------------------- the scheduled pipeline with promote


def test_first_run_is_promoted_and_pushed(tiny_workspace, remotes, harness):
    ws, root = tiny_workspace, tiny_workspace / "promoted"
    state = run_pipeline(ws)
    assert state.is_completed(), state.message
    current = read_current(root)
    assert current is not None and current.version == "v1"
    rec = current.record
    assert rec["metrics"] == retrieval(ws)
    assert rec["bm25"] == {"k1": 0.9, "b": 0.4, "epsilon": 0.25, "stemmer": "porter", "stopwords": True,
                           "use_title": True}
    assert rec["hybrid"] == {"weight": DEFAULT_WEIGHT, "normalize": True}
    # the release holds copies of the workspace's outputs
    assert same_tree(ws / "models" / "dpr", current.model) and same_tree(ws / "data" / "index" / "dpr", current.index)
    assert current.corpus.read_bytes() == (ws / "data" / "prepared" / "corpus.jsonl").read_bytes()
    # recorded the DVC way: dvc.lock and the metrics committed, the commit tagged by GTO
    head = git(ws, "rev-parse", "HEAD")
    assert rec["git_revision"] == head and rec["git_tag"] == "dpr@v1.0.0"
    assert git(ws, "status", "--porcelain", "--", "dvc.lock", "metrics", "plots", "params.yaml") == ""
    assert git(ws, "rev-parse", "dpr@v1.0.0^{commit}") == head
    assert set(git(ws, "tag", "--points-at", head).split()) == {"dpr@v1.0.0", "dpr#prod#1"}
    assert "prod" in git(ws, "show", "dpr#prod#1", "--no-patch")  # the stage assignment's annotation
    assert "promoted" not in git(ws, "ls-files")
    # pushed: the branch and tags to the bare repository, the outputs to the DVC remote
    assert git(remotes["bare"], "rev-parse", remotes["branch"]) == head
    assert remote_tags(remotes["bare"]) == {"dpr@v1.0.0", "dpr#prod#1"}
    assert "Cache and remote 'storage' are in sync" in dvc(ws, "status", "-c").stdout
    report = gate_artifact()
    assert "**Passed: promoted as v1 (dpr@v1.0.0" in report and "No promoted release yet" in report
    assert "Outputs pushed to the DVC remote `storage`" in report


def test_a_worse_run_is_refused(tiny_workspace, remotes, harness):
    ws, root = tiny_workspace, tiny_workspace / "promoted"
    v1 = read_current(root)
    head, tags = git(ws, "rev-parse", "HEAD"), remote_tags(remotes["bare"])
    service = Service(root, poll=3600)   # the search service's core, serving v1
    try:
        assert service.refresh() and service.current.version == "v1"
        before = service.search(QUERY)
        # a bad param: the hybrid ranks mostly by the dense score upside down
        set_params(ws, {"evaluate.hybrid_weight": -10.0})
        state = run_pipeline(ws)
        assert state.is_failed(), state
        assert not service.refresh()
        after = service.search(QUERY)
    finally:
        service.stop()
    assert after["version"] == "v1" and after["hits"] == before["hits"], "the service still answers from v1"
    old, new = v1.record["metrics"]["hybrid"]["ndcg@10"], retrieval(ws)["hybrid"]["ndcg@10"]
    assert old - new > 0.01, "the bad param did not lower hybrid nDCG@10 enough to test the gate"
    line = f"hybrid ndcg@10: {old:.4f} -> {new:.4f} (drop {old - new:.4f} > 0.01)"
    assert line in state.message and "v1 stays promoted" in state.message
    report = gate_artifact()
    print(report)
    assert "**Refused" in report
    assert f"| hybrid | ndcg@10 | {old:.4f} | {new:.4f} | {old - new:.4f} | 0.01 | **FAIL** |" in report
    assert f"- {line}" in report
    dpr = v1.record["metrics"]["dpr"]["ndcg@10"]
    assert f"| dpr | ndcg@10 | {dpr:.4f} | {dpr:.4f} | 0.0000 | 0.01 | pass |" in report
    # the promoted release is untouched: current.json, the release folders, git and the remotes
    assert read_current(root) == v1 and sorted(p.name for p in (root / "releases").iterdir()) == ["v1"]
    assert git(ws, "rev-parse", "HEAD") == head and remote_tags(remotes["bare"]) == tags
    assert same_tree(ws / "models" / "dpr", v1.model)


def test_outputs_that_are_not_dvc_locks_are_refused(tiny_workspace, remotes, harness):
    from flows.release import release

    ws, root = tiny_workspace, tiny_workspace / "promoted"
    path = ws / "metrics" / "retrieval.json"
    text = path.read_text()
    edited = json.loads(text)
    edited["hybrid"]["ndcg@10"] = 1.0   # a hand-edited figure is not the run's
    path.write_text(json.dumps(edited))
    try:
        state = release(workspace=str(ws), return_state=True)
    finally:
        path.write_text(text)
    assert state.is_failed() and "not those of dvc.lock (evaluate changed)" in state.message
    assert read_current(root).version == "v1"


def test_a_run_that_passes_is_promoted(tiny_workspace, remotes, harness):
    ws, root = tiny_workspace, tiny_workspace / "promoted"
    v1 = read_current(root)
    # the hybrid weight back, and an HNSW index: new outputs, no metric lower (HNSW is exact on 40 passages)
    set_params(ws, {"evaluate.hybrid_weight": DEFAULT_WEIGHT, "index.kind": "hnsw"})
    service = Service(root, poll=3600)
    try:
        assert service.refresh() and service.current.version == "v1"
        state = run_pipeline(ws)
        assert state.is_completed(), state.message
        assert service.refresh() and service.search(QUERY)["version"] == "v2", "the service swaps to v2"
    finally:
        service.stop()
    v2 = read_current(root)
    assert v2.version == "v2" and v2.record["git_tag"] == "dpr@v2.0.0"
    for system in ("dpr", "hybrid"):
        for metric in ("ndcg@10", "recall@100"):
            assert v2.record["metrics"][system][metric] >= v1.record["metrics"][system][metric] - 0.01
    assert json.loads((v2.index / "index.json").read_text())["kind"] == "hnsw"
    assert not same_tree(v1.index, v2.index)
    head = git(ws, "rev-parse", "HEAD")
    assert v2.record["git_revision"] == head != v1.record["git_revision"]
    assert set(git(ws, "tag", "--points-at", head).split()) == {"dpr@v2.0.0", "dpr#prod#2"}
    assert remote_tags(remotes["bare"]) == {"dpr@v1.0.0", "dpr#prod#1", "dpr@v2.0.0", "dpr#prod#2"}
    # GTO's registry: v2 is the latest version and in prod
    shown = json.loads(run(["gto", "show", "--json"], ws).stdout)
    assert shown["dpr"]["version"] == "v2.0.0" and shown["dpr"]["stage"]["prod"] == "v2.0.0"
    # the previous release is still there, as it was
    assert read_release(root, "v1") == v1
    report = gate_artifact()
    assert "**Passed: promoted as v2" in report and "against release **v1**" in report
    # the same outputs again: nothing new to promote (still pushed)
    state = run_pipeline(ws)
    assert state.is_completed(), state.message
    assert read_current(root).version == "v2" and not (root / "releases" / "v3").exists()
    assert "nothing new to promote" in gate_artifact()


def test_a_clone_pulls_the_promoted_run_and_reproduces_nothing(tiny_workspace, remotes, harness):
    ws, root = tiny_workspace, tiny_workspace / "promoted"
    clone = remotes["clones"] / "clone"
    run(["git", "clone", "-q", str(remotes["bare"]), str(clone)], remotes["clones"])
    dvc(clone, "pull")
    v2 = read_release(root, "v2")
    assert same_tree(clone / "models" / "dpr", v2.model)
    assert same_tree(clone / "data" / "index" / "dpr", v2.index)
    assert same_tree(clone / "data" / "negatives", ws / "data" / "negatives")
    assert (clone / "data" / "prepared" / "corpus.jsonl").read_bytes() == v2.corpus.read_bytes()
    # the pipeline stages the scheduled run reproduces: all up to date in the clone
    out = dvc(clone, "repro", *PIPELINE).stdout
    assert "Running stage" not in out, out
    assert all(f"Stage '{s}' didn't change, skipping" in out for s in PIPELINE), out
    # the previous promotion comes back from its git tag
    run(["git", "checkout", "-q", "dpr@v1.0.0"], clone)
    dvc(clone, "pull")
    v1 = read_release(root, "v1")
    assert same_tree(clone / "data" / "index" / "dpr", v1.index)
    assert same_tree(clone / "models" / "dpr", v1.model)
    assert json.loads((clone / "metrics" / "retrieval.json").read_text()) == v1.record["metrics"]


def test_experiments_are_pushed_to_the_git_remote(tiny_workspace, remotes, harness):
    from flows.experiments import push_experiments

    ws = tiny_workspace
    dvc(ws, "exp", "run", "--temp", "--name", "hw-half", "-S", "evaluate.hybrid_weight=0.5", "evaluate")
    assert "hw-half" not in dvc(ws, "exp", "list", "origin", "--name-only").stdout.split()
    push_experiments.fn(ws, ["hw-half"])   # what the experiments flow runs with push=True
    assert "hw-half" in dvc(ws, "exp", "list", "origin", "--name-only").stdout.split()
    assert git(remotes["bare"], "for-each-ref", "refs/exps"), "the experiment's git ref is in the remote"
