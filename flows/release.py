"""The release flow: gate a pipeline run against the promoted release, promote it, push it.

After the pipeline has run in the workspace (the scheduled `pipeline` deployment calls this flow
as a subflow with `promote=True`; it can also be run alone), the `release` flow:

1. checks the run is what git + DVC can reproduce: `dvc status` of the pipeline stages is clean
   and the files they depend on are committed (otherwise the run cannot be promoted);
2. compares metrics/retrieval.json with the metrics the promoted release (`<promoted>/current.json`)
   was promoted with, under params.yaml `gate:` (`dprpipe.promote.compare`), and publishes the
   verdicts as the markdown artifact `release-gate`. A metric that dropped too far fails the
   flow run and leaves the promoted release as it was. The first run (no release yet) is
   promoted without comparison; a run whose outputs and metrics are the promoted ones is not
   promoted again;
3. records a passing run the DVC way: a git commit of dvc.lock, params.yaml, the metrics and
   plots (and DVC's .gitignore files); the release folder `<promoted>/releases/vN/` (model,
   index, corpus, release.json), built atomically; a GTO registration `dpr@vN.0.0` and stage
   assignment `dpr#prod#K` (git tags); then `current.json` switches to vN;
4. pushes the outputs to the DVC remote (`dvc push`) and the branch and GTO tags to the git
   remote, each retried (I/O). Without a DVC remote or git remote the push is skipped with a
   warning in the log and the artifact.

An earlier release stays recoverable: its folder stays (point current.json back with
`dprpipe.release.set_current`), and its git tag restores the run (`git checkout dpr@vN.0.0 &&
dvc pull`). See docs/production.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed

if __package__ in (None, ""):   # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dprpipe.config import from_mapping  # noqa: E402
from dprpipe.evaluate import EvaluateConfig  # noqa: E402
from dprpipe.mine import MineConfig  # noqa: E402
from dprpipe.promote import (ARTIFACT, GateConfig, Verdict, build_release, compare, failures,  # noqa: E402
                             gto_version, next_version, release_record, release_versions)
from dprpipe.release import Release, read_current, set_current  # noqa: E402
from flows.experiments import PIPELINE, _run, changed, dvc, git, pipeline_files, untracked  # noqa: E402
from flows.stage_runner import RETRIEVAL_METRICS, StageError, resolve_workspace, skipped, workspace_lock  # noqa: E402

# what a release copies: the outputs of dvc.yaml's train, index and prepare stages
MODEL, INDEX, CORPUS = "models/dpr", "data/index/dpr", "data/prepared/corpus.jsonl"
RELEASED_OUTS = {"train": MODEL, "index": INDEX, "prepare": "data/prepared"}
STAGE = "prod"                  # the GTO stage a promoted release is assigned
GATE_ARTIFACT = "release-gate"  # the markdown artifact of every release run


# ---------------------------------------------------------------- reading the workspace


def read_params(ws: Path) -> dict[str, Any]:
    return yaml.safe_load((ws / "params.yaml").read_text(encoding="utf-8")) or {}


def run_files(ws: Path) -> list[str]:
    """The files a run changes that git keeps: dvc.lock, params.yaml (overrides are applied to it),
    the pipeline stages' uncached outputs (metrics, plots) and the .gitignore files DVC writes
    beside their cached outputs."""
    stages = (yaml.safe_load((ws / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
    files = {"dvc.lock", "params.yaml"}
    for name in PIPELINE:
        for kind in ("outs", "metrics", "plots"):
            for entry in stages.get(name, {}).get(kind) or []:
                path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (str(entry), {})
                cached = (opts or {}).get("cache", True)
                files.add(path if not cached else str(Path(path).parent / ".gitignore"))
    return sorted(f for f in files if (ws / f).is_file())


def output_hashes(ws: Path) -> dict[str, str]:
    """The DVC hashes (dvc.lock) of the outputs a release copies: {path: md5}."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text(encoding="utf-8")) or {}
    out = {}
    for stage, path in RELEASED_OUTS.items():
        for entry in (lock.get("stages", {}).get(stage) or {}).get("outs") or []:
            if entry.get("path") == path:
                out[path] = entry.get("md5", "")
    return out


@task(name="check-workspace", cache_policy=NO_CACHE)
def check_workspace(ws: Path) -> None:
    """Refuse a run git + DVC could not reproduce: stale stages, or pipeline code not committed."""
    status = json.loads(dvc(ws, "status", "--json", *PIPELINE) or "{}")
    if status:
        raise StageError(f"the workspace's outputs are not those of dvc.lock ({', '.join(sorted(status))} "
                         f"changed): run the pipeline (`dvc repro`) before promoting; `dvc status` says {status}")
    files = pipeline_files(ws)
    dirty = [f for f in changed(ws, files) + untracked(ws, files) if f not in ("params.yaml", "dvc.lock")]
    if dirty:
        raise StageError(f"the pipeline's files differ from git ({', '.join(dirty)}): commit them first, so the "
                         f"release's git tag reproduces it")


# ---------------------------------------------------------------- the gate report


def render_gate(verdicts: list[Verdict], current: Release | None, decision: str, notes: list[str]) -> str:
    """The markdown of the `release-gate` artifact."""
    lines = ["# Quality gate", "", f"**{decision}**", ""]
    if current is None:
        lines.append("No promoted release yet: this run is promoted without comparison.")
    else:
        promoted = current.record
        lines += [f"The run's metrics (`{RETRIEVAL_METRICS}`, flow run `{flow_run.name or '-'}`) against release "
                  f"**{current.version}** (promoted {promoted.get('time', '?')}, `{promoted.get('git_tag', '?')}`), "
                  f"under params.yaml `gate.max_drop`:", "",
                  f"| system | metric | promoted ({current.version}) | this run | drop | max drop | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for v in verdicts:
            drop = "-" if v.drop is None else f"{v.drop:.4f}"
            figures = ["-" if x is None else f"{x:.4f}" for x in (v.promoted, v.new)]
            lines.append(f"| {v.system} | {v.metric} | {figures[0]} | {figures[1]} | {drop} | {v.max_drop:g} | "
                         f"{'pass' if v.passed else '**FAIL**'} |")
        failed = failures(verdicts)
        if failed:
            lines += ["", "Failing metrics:", ""] + [f"- {v.describe()}" for v in failed]
    return "\n".join(lines + [""] + notes) + "\n"


def publish_gate(verdicts: list[Verdict], current: Release | None, decision: str, notes: list[str]) -> str:
    markdown = render_gate(verdicts, current, decision, notes)
    create_markdown_artifact(key=GATE_ARTIFACT, markdown=markdown,
                             description="The release flow's quality gate: this run against the promoted release")
    return markdown


# ---------------------------------------------------------------- promotion (local: no retries)


@task(name="commit-run", cache_policy=NO_CACHE)
def commit_run(ws: Path, message: str) -> str:
    """Commit the run's files (`run_files`) if they changed; the commit (or HEAD) as a full hash."""
    files = run_files(ws)
    git(ws, "add", "--", *files)
    if git(ws, "status", "--porcelain", "--", *files).strip():
        git(ws, "commit", "-q", "-m", message, "--", *files)
    return git(ws, "rev-parse", "HEAD").strip()


@task(name="gto-register", cache_policy=NO_CACHE)
def gto_register(ws: Path, version: str, revision: str, message: str) -> list[str]:
    """`gto register dpr <rev> --version vN.0.0` and `gto assign dpr --version vN.0.0 --stage prod`
    (annotated git tags); returns the tags made."""
    before = set(gto_tags(ws))
    semver = gto_version(version)
    _gto(ws, "register", ARTIFACT, revision, "--version", semver, "--message", message)
    _gto(ws, "assign", ARTIFACT, "--version", semver, "--stage", STAGE, "--message", f"{message}: {STAGE}")
    return [t for t in gto_tags(ws) if t not in before]


def _gto(ws: Path, *args: str) -> str:
    gto = Path(sys.executable).with_name("gto")
    return _run(ws, [str(gto) if gto.is_file() else "gto", *args], "gto " + " ".join(args))


def gto_tags(ws: Path) -> list[str]:
    """The git tags of the GTO artifact: registrations `dpr@...` and stage assignments `dpr#...`."""
    return git(ws, "tag", "--list", f"{ARTIFACT}@*", f"{ARTIFACT}#*").split()


# ---------------------------------------------------------------- pushes (I/O: retried)


def dvc_remote_name(ws: Path, remote: str | None) -> str | None:
    """`remote`, or the project's default DVC remote; None when there is none."""
    if remote:
        return remote
    try:
        return dvc(ws, "remote", "default").strip() or None
    except StageError:   # "No default remote set"
        return None


def git_remote_url(ws: Path, remote: str | None) -> str | None:
    if not remote:
        return None
    try:
        return git(ws, "remote", "get-url", remote).strip() or None
    except StageError:   # no such remote
        return None


@task(name="dvc-push", retries=3, retry_delay_seconds=[10, 30, 90], cache_policy=NO_CACHE)
def dvc_push(ws: Path, remote: str) -> str:
    """`dvc push -r <remote>`: every output dvc.lock names (already-pushed files are skipped)."""
    out = dvc(ws, "push", "-r", remote)
    get_run_logger().info("dvc push -r %s: %s", remote, out.strip().splitlines()[-1] if out.strip() else "done")
    return out


@task(name="git-push", retries=3, retry_delay_seconds=[10, 30, 90], cache_policy=NO_CACHE)
def git_push(ws: Path, remote: str, tags: list[str]) -> list[str]:
    """Push the current branch and the GTO tags to the git remote; returns what was pushed."""
    refs = []
    branch = git(ws, "branch", "--show-current").strip()
    if branch:
        refs.append(f"refs/heads/{branch}:refs/heads/{branch}")
    else:
        get_run_logger().warning("HEAD is detached: pushing the tags only")
    refs += [f"refs/tags/{t}:refs/tags/{t}" for t in tags]
    if refs:
        git(ws, "push", "-q", remote, *refs)
    return refs


# ---------------------------------------------------------------- the flow


@flow(name="release")
def release(workspace: str = ".", promoted_root: str = "promoted", dvc_remote: str | None = None,
            git_remote: str | None = "origin", push: bool = True, lock_timeout: float = 3600.0):
    """Gate the workspace's pipeline run against the promoted release; promote and push it if it passes.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml, a git repository).
        promoted_root: the folder of the promoted releases (relative to the workspace, or absolute).
        dvc_remote: the DVC remote to push the outputs to (default: the project's default remote;
            none configured: not pushed).
        git_remote: the git remote to push the commit and GTO tags to (not configured: not pushed).
        push: push to the remotes at all.
        lock_timeout: seconds to wait for another flow run on this workspace before skipping.
    """
    logger = get_run_logger()
    ws = resolve_workspace(workspace)
    root = Path(promoted_root).expanduser()
    root = root if root.is_absolute() else ws / root
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        check_workspace(ws)
        params = read_params(ws)
        gate = from_mapping(GateConfig, params.get("gate"), "gate")
        metrics = json.loads((ws / RETRIEVAL_METRICS).read_text(encoding="utf-8"))
        current = read_current(root)
        verdicts = [] if current is None else compare(metrics, current.record.get("metrics") or {}, gate)
        failed = failures(verdicts)
        if failed:
            decision = f"Refused: {len(failed)} metric(s) dropped beyond gate.max_drop; release {current.version} " \
                       f"stays promoted"
            publish_gate(verdicts, current, decision, [f"`{root / 'current.json'}` still names {current.version}; "
                                                       "nothing was committed, tagged or pushed."])
            message = f"quality gate: {'; '.join(v.describe() for v in failed)}; {current.version} stays promoted"
            logger.error(message)
            return Failed(message=message)

        outputs = output_hashes(ws)
        unchanged = current is not None and current.record.get("outputs") == outputs \
            and current.record.get("metrics") == metrics
        notes: list[str] = []
        if unchanged:
            version, revision = current.version, current.record.get("git_revision")
            decision = f"Passed; outputs and metrics are those of release {version}: nothing new to promote"
            logger.info(decision)
        else:
            taken = release_versions(root) + [t.split("@", 1)[1] for t in gto_tags(ws) if "@" in t]
            version = next_version(taken)
            headline = ", ".join(f"{s} {m} {metrics.get(s, {}).get(m, '-')}"
                                 for s, row in gate.max_drop.items() for m in row)
            revision = commit_run(ws, f"Promote {ARTIFACT} {version}: {headline}")
            record = release_record(version, revision, metrics, from_mapping(MineConfig, params.get("mine"), "mine"),
                                    from_mapping(EvaluateConfig, params.get("evaluate"), "evaluate"), outputs)
            built = build_release(root, record, ws / MODEL, ws / INDEX, ws / CORPUS)
            tags = gto_register(ws, version, revision, f"Promote {ARTIFACT} {version}")
            set_current(root, version)
            decision = f"Passed: promoted as {version} ({record['git_tag']}, commit {revision[:10]})"
            logger.info("%s; release folder %s; tags %s", decision, built.path, ", ".join(tags))
            notes.append(f"Release folder `{built.path}`; `{root / 'current.json'}` names {version}.")

        pushed: dict[str, Any] = {"dvc": None, "git": None}
        if push:
            if (name := dvc_remote_name(ws, dvc_remote)) is None:
                notes.append("**Not pushed to DVC storage**: no DVC remote is configured (`dvc remote add -d`).")
                logger.warning("no DVC remote configured: the outputs were not pushed")
            else:
                dvc_push(ws, name)
                pushed["dvc"] = name
                notes.append(f"Outputs pushed to the DVC remote `{name}`.")
            if git_remote_url(ws, git_remote) is None:
                notes.append(f"**Not pushed to git**: no git remote `{git_remote}`.")
                logger.warning("no git remote %r: the commit and tags were not pushed", git_remote)
            else:
                git_push(ws, git_remote, gto_tags(ws))
                pushed["git"] = git_remote
                notes.append(f"Branch and GTO tags pushed to the git remote `{git_remote}`.")
        publish_gate(verdicts, current, decision, notes)
    result = {"version": version, "revision": revision, "promoted": not unchanged, "pushed": pushed,
              "verdicts": [v.describe() for v in verdicts]}
    return result


if __name__ == "__main__":
    release()
