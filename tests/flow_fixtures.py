"""A tiny DVC workspace for the Prefect flow tests: the project's pipeline on a toy BEIR dataset.

`make_workspace(dest)` copies the project (git-tracked files plus dvc.yaml, params.yaml,
stages/ and dprpipe/, which may not be committed yet), writes a synthetic BEIR dataset of
40 passages about 20 topic words, sets the cheapest params, and makes it a git + DVC repo
with one commit. The default encoder (the bundled MiniLM, no download) is used at 16/32 tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `flows` is a folder of the project, not an installed package
    sys.path.insert(0, str(ROOT))

# the tiny test configuration (dotted params.yaml keys)
TINY_PARAMS = {
    "prepare.dataset": "datasets/tiny",
    "prepare.dev_fraction": 0.25,
    "mine.negatives": 3,
    "mine.run_depth": 100,
    "model.query_max_length": 16,
    "model.passage_max_length": 32,
    "model.precision": "fp32",
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.val_negatives": 2,
    "train.checkpoint_every": 0,
    "train.passage_max_length": 32,
    "encode.batch_size": 16,
}

# words that are single WordPiece tokens of the MiniLM vocabulary
TOPICS = ["apple", "river", "guitar", "planet", "castle", "tiger", "coffee", "winter", "doctor", "ocean",
          "pencil", "soccer", "violin", "desert", "rocket", "garden", "bridge", "island", "camera", "forest"]
FILLER = ["story", "history", "people", "small", "large", "old", "new", "city", "book", "light"]


def flow_env(extra: dict | None = None) -> dict:
    """The environment the flows (and the DVC stages they start) run in during tests."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    env.update(extra or {})
    return env


def run(args, cwd, timeout=300, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=flow_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def write_tiny_beir(folder: Path, n_train: int = 12, n_test: int = 6) -> dict:
    """40 passages (two per topic word), `n_train` + `n_test` queries, each judging its topic's first passage."""
    (folder / "qrels").mkdir(parents=True)
    corpus = []
    for t, word in enumerate(TOPICS):
        for k in range(2):
            filler = " ".join(FILLER[(t + k + j) % len(FILLER)] for j in range(6))
            corpus.append({"_id": f"d{t}-{k}", "title": word.title(),
                           "text": f"the {word} {filler} . {'facts about' if k == 0 else 'notes on'} the {word}"})
    queries, qrels = [], {"train": [], "test": []}
    for n in range(n_train + n_test):
        word = TOPICS[n % len(TOPICS)]
        split = "train" if n < n_train else "test"
        queries.append({"_id": f"q{n}", "text": f"{'tell me about' if split == 'train' else 'what is'} the {word}"})
        qrels[split].append((f"q{n}", f"d{n % len(TOPICS)}-0", "1"))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    for split, rows in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return {"docs": len(corpus), "train": n_train, "test": n_test}


def copy_project(dest: Path) -> None:
    """The git-tracked files and the pipeline's own files, without DVC's lock and generated metrics/plots."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    wanted = {n for n in names.split("\0") if n}
    wanted |= {"dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"}
    wanted |= {str(p.relative_to(ROOT)) for d in ("stages", "dprpipe") for p in (ROOT / d).glob("*.py")}
    for name in sorted(wanted):
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/", ".dvc/", ".ci/", "tests/", "bench/")):
            continue
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def set_params(repo: Path, changes: dict) -> None:
    """Set dotted `section.key` values in the workspace's params.yaml."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "--allow-empty", "-m", message], repo)


def make_workspace(dest: Path) -> Path:
    """A git + DVC repo of the project on the tiny dataset, committed; returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    copy_project(dest)
    write_tiny_beir(dest / "datasets" / "tiny")
    set_params(dest, TINY_PARAMS)
    run(["git", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    commit(dest, "tiny workspace")
    return dest


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory) -> Path:
    """A fresh tiny workspace shared by the tests of one module (the flows build on each other's outputs)."""
    return make_workspace(tmp_path_factory.mktemp("ws") / "repo")
