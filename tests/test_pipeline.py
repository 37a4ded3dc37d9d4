"""End to end: `dvc repro` in a temporary copy of the project, and stage scripts on bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "datasets" / "scifact"   # params.yaml's default dataset


def _env() -> dict:
    env = dict(os.environ)
    # `python` and `dvc` in dvc.yaml's commands must be the venv's
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def _run(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- a tiny BEIR slice


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_qrels(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8") if line.strip()]
    return [r for r in rows if r[0] != "query-id"]


def write_tiny_beir(folder: Path, n_docs=60, n_train=20, n_test=10) -> dict:
    """A slice of SciFact: the first queries of each split, every document they judge, and
    unjudged documents up to `n_docs`. Falls back to a synthetic corpus without the dataset."""
    folder.mkdir(parents=True)
    (folder / "qrels").mkdir()
    if not SCIFACT.is_dir():
        return _write_synthetic(folder, n_docs, n_train, n_test)
    qrels = {s: _read_qrels(SCIFACT / "qrels" / f"{s}.tsv") for s in ("train", "test")}
    wanted = {"train": n_train, "test": n_test}
    chosen, docs = {}, []
    for split, rows in qrels.items():
        qids = list(dict.fromkeys(r[0] for r in rows))[: wanted[split]]
        chosen[split] = [r for r in rows if r[0] in qids]
        docs = list(dict.fromkeys(docs + [r[1] for r in chosen[split]]))
    corpus = _read_jsonl(SCIFACT / "corpus.jsonl")
    by_id = {d["_id"]: d for d in corpus}
    keep = [by_id[d] for d in docs] + [d for d in corpus if d["_id"] not in docs][: n_docs - len(docs)]
    assert len(keep) == n_docs
    qids = {r[0] for rows in chosen.values() for r in rows}
    queries = [q for q in _read_jsonl(SCIFACT / "queries.jsonl") if q["_id"] in qids]
    _write(folder, keep, queries, chosen)
    return {"docs": len(keep), "queries": {s: len({r[0] for r in rows}) for s, rows in chosen.items()}}


def _write_synthetic(folder, n_docs, n_train, n_test):
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    corpus = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choices(words, k=40))}
              for i in range(n_docs)]
    queries, chosen = [], {"train": [], "test": []}
    for n in range(n_train + n_test):
        d = corpus[n]
        queries.append({"_id": f"q{n}", "text": " ".join(d["text"].split()[:6])})
        chosen["train" if n < n_train else "test"].append([f"q{n}", d["_id"], "1"])
    _write(folder, corpus, queries, chosen)
    return {"docs": n_docs, "queries": {"train": n_train, "test": n_test}}


def _write(folder, corpus, queries, qrels):
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    for split, rows in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------- the project copy


def copy_project(dest: Path) -> None:
    """The git-tracked files of the working tree, without DVC's lock and the generated metrics/plots."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if not name or name == "dvc.lock" or name.startswith(("metrics/", "plots/")):
            continue
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def edit_params(repo: Path, changes: dict) -> None:
    """Set `section.key` values in params.yaml (only keys the file already has, so the file stays valid)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        if dotted == "prepare.dataset" or key in params.get(section, {}):
            params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_graph(repo: Path) -> dict[str, set[str]]:
    """Stage -> the stages that depend on its outputs, from dvc.yaml."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    def paths(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    outs = {name: paths(s.get("outs")) + paths(s.get("metrics")) + paths(s.get("plots"))
            for name, s in stages.items()}
    return {name: {other for other, s in stages.items()
                   if any(d == o or d.startswith(o.rstrip("/") + "/") for d in paths(s.get("deps")) for o in outs[name])}
            for name in stages}


def downstream(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def write_tiny_encoder(folder: Path) -> None:
    """A one-layer, 32-wide BERT with the default model's tokenizer: the dense stages run the same
    code in a fraction of the time (this test checks the pipeline's wiring, not retrieval quality)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dprpipe.model import DEFAULT_MODEL, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


RUNNING = re.compile(r"^Running stage '([^']+)'", re.M)
CACHED = re.compile(r"^Stage '([^']+)' is cached - skipping run", re.M)


def repro(repo: Path) -> tuple[set[str], str]:
    r = _run(["dvc", "repro"], repo)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"dvc repro failed:\n{out[-6000:]}"
    return set(RUNNING.findall(r.stdout)), out


def make_tiny_repo(repo: Path) -> dict:
    """A git + DVC copy of the project on a tiny dataset and encoder, with the cheapest dense settings;
    returns the dataset's sizes."""
    repo.mkdir()
    copy_project(repo)
    assert (repo / "dvc.yaml").is_file() and not (repo / "dvc.lock").exists()
    info = write_tiny_beir(repo / "datasets" / "tiny")
    write_tiny_encoder(repo / "tiny-encoder")
    edit_params(repo, {"prepare.dataset": "datasets/tiny", "prepare.max_words": 0, "model.model": "tiny-encoder",
                       "train.epochs": 1, "train.batch_size": 8, "train.checkpoint_every": 2,
                       "train.include_dev": False,   # validated: the kill tests count its steps
                       "train.frozen_layers": 0,     # the toy encoder has one layer: both encoders train
                       "train.passage_max_length": 48, "model.passage_max_length": 48,
                       "model.query_max_length": 24, "encode.batch_size": 64, "mine.run_depth": 100})
    for args in (["git", "init", "-q"], ["dvc", "init", "-q", "--force"]):
        r = _run(args, repo)
        assert r.returncode == 0, r.stderr
    return info


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory) -> dict:
    """An untouched tiny repo ("template"), the dataset's sizes, and a copy ("ran") after one full
    `dvc repro`: the stages it ran, its log, and its outputs' texts as they were then (later tests
    change that copy)."""
    root = tmp_path_factory.mktemp("tiny")
    info = make_tiny_repo(root / "template")
    shutil.copytree(root / "template", root / "ran", symlinks=True)
    ran, out = repro(root / "ran")
    texts = {name: (root / "ran" / name).read_text()
             for name in ("dvc.lock", "metrics/retrieval.json", "metrics/train.json", "plots/train.csv")}
    return {"template": root / "template", "info": info, "repo": root / "ran", "ran": ran, "out": out,
            "texts": texts}


@pytest.mark.slow
def test_dvc_repro_end_to_end(tiny_repos):
    info, repo, ran, out = (tiny_repos[k] for k in ("info", "repo", "ran", "out"))
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    # 1. everything runs
    assert ran == stages, out[-4000:]
    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert data["documents"] == data["passages"] == info["docs"]
    assert data["test_queries"] == info["queries"]["test"]
    assert data["train_queries"] + data["dev_queries"] == info["queries"]["train"]
    metrics = json.loads((repo / "metrics" / "retrieval.json").read_text())
    assert 0.0 <= metrics["bm25"]["ndcg@10"] <= 1.0
    assert metrics["bm25"]["queries"] == info["queries"]["test"]
    for system, m in metrics.items():
        assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "queries"), (system, m)
    if SCIFACT.is_dir():
        assert metrics["bm25"]["ndcg@10"] > 0.3   # BM25 finds judged abstracts among 60
    assert (repo / "plots" / "recall.csv").read_text().startswith("k,bm25")
    lock = (repo / "dvc.lock").read_text()

    # 2. nothing changed: nothing runs
    ran, out = repro(repo)
    assert ran == set(), out[-4000:]
    for stage in stages:
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert (repo / "dvc.lock").read_text() == lock

    # 3. a BM25 parameter: mine reruns and, of the rest, only stages downstream of it whose inputs
    # changed. evaluate always does (the BM25 run's scores change); train depends on the mined
    # negatives too, so it and what follows may rerun; prepare and the zero-shot branch never do.
    edit_params(repo, {"mine.k1": 1.2})
    ran, out = repro(repo)
    after_mine = downstream(stage_graph(repo), "mine")
    assert {"mine", "evaluate"} <= ran, out[-4000:]
    assert ran <= {"mine"} | after_mine, out[-4000:]
    assert "prepare" not in ran
    assert not ran & {s for s in stages if s not in after_mine and s != "mine"}
    new_metrics = json.loads((repo / "metrics" / "retrieval.json").read_text())
    assert 0.0 <= new_metrics["bm25"]["ndcg@10"] <= 1.0
    assert "k1: 1.2" in (repo / "dvc.lock").read_text()
    assert "train" in ran, out[-4000:]   # the mined negatives changed

    # 4. back to the first params: every stage that ran comes back from DVC's run cache, train
    # included (its resumable state is scratch, not an output), and the lock is the first one
    edit_params(repo, {"mine.k1": 0.9})
    rerun, out = repro(repo)
    assert rerun == set(), out[-4000:]
    assert set(CACHED.findall(out)) == ran, out[-4000:]
    assert (repo / "dvc.lock").read_text() == lock
    assert list((repo / ".cache" / "train").iterdir()) == []   # finished runs leave no state


# Loaded by every Python process of a `dvc repro` (via PYTHONPATH): the one stage process whose
# command line contains KILL_ARGV SIGKILLs its whole process group (dvc, its shell and itself, as
# a scheduler or the OOM killer would) at the KILL_WHEN-th optimiser step or os.replace.
KILLER = """
import os, signal, sys
_when, _argv = os.environ.get("KILL_WHEN", ""), os.environ.get("KILL_ARGV", "")
if _when and _argv and _argv in " ".join(sys.argv):
    _kind, _n = _when.split(":")
    _count = [0]

    def _die(*_):
        _count[0] += 1
        if _count[0] == int(_n):
            sys.stdout.flush()
            os.killpg(os.getpgrp(), signal.SIGKILL)

    if _kind == "replace":
        _real_replace = os.replace

        def _replace(*args, **kwargs):
            _die()
            return _real_replace(*args, **kwargs)

        os.replace = _replace
    else:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(_die)
"""


def killed_repro(repo: Path, argv: str, when: str) -> str:
    """`dvc repro` in its own process group, SIGKILLed as a whole at `when` in the stage running `argv`."""
    hooks = repo.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(KILLER)
    env = _env()
    env.update(PYTHONPATH=str(hooks), KILL_ARGV=argv, KILL_WHEN=when)
    r = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600,
                       start_new_session=True)
    out = r.stdout + r.stderr
    assert r.returncode == -9, f"dvc repro was not killed (exit {r.returncode}):\n{out[-4000:]}"
    return out


def _lock_outs(lock_text: str) -> dict[str, str]:
    """Every stage output in a dvc.lock -> its md5 (a folder's covers each file's bytes)."""
    stages = yaml.safe_load(lock_text)["stages"]
    return {o["path"]: o["md5"] for s in stages.values() for o in s.get("outs", [])}


TIMED = ("seconds", "questions_per_s", "train_seconds", "wall_seconds")


def _untimed(name: str, text: str):
    """A training record without its wall-clock fields (a resumed run times only its own part)."""
    import csv
    import io

    def keep(d):
        return {k: v for k, v in d.items() if not any(t in k for t in TIMED)}

    if name.endswith(".json"):
        return keep(json.loads(text))
    return [keep(row) for row in csv.DictReader(io.StringIO(text))]


@pytest.mark.slow
def test_dvc_repro_killed_twice_then_completes_like_an_uninterrupted_run(tiny_repos, tmp_path):
    # the real thing under DVC: `dvc repro` SIGKILLed (dvc and the stage together) in the middle of
    # training, then again in the middle of encoding; the next plain `dvc repro` finishes, resumes
    # training from its saved state, and every output equals the uninterrupted run's byte for byte
    ref = tiny_repos["texts"]
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repos["template"], repo, symlinks=True)

    # 1. killed at the 3rd optimiser step of 3 (the state was saved after step 2)
    out = killed_repro(repo, "--out models/dpr", "step:3")
    assert "Running stage 'train'" in out, out[-4000:]
    assert not (repo / "models" / "dpr").exists() and not (repo / "metrics" / "train.json").exists()
    (state,) = repo.glob(".cache/train/*/last/progress.json")
    progress = json.loads(state.read_text())
    assert (progress["epoch"], progress["step_in_epoch"]) == (0, 2)

    # 2. killed while the fine-tuned encoder's embeddings are written (before its 2nd rename)
    out = killed_repro(repo, "--out data/embeddings/dpr", "replace:2")
    assert f"resuming from {state.parent.relative_to(repo)}: epoch 1, step 2 of 3" in out, out[-4000:]
    assert "Stage 'prepare' didn't change, skipping" in out and "Stage 'mine' didn't change, skipping" in out
    assert (repo / "models" / "dpr" / "dpr_config.json").is_file()   # the folder is written whole
    assert not (repo / "data" / "embeddings" / "dpr").exists()

    # 3. nothing special: it completes, and reruns only what did not finish
    ran, out = repro(repo)
    assert "train" not in ran and {"encode", "index", "evaluate"} <= ran, out[-4000:]
    timed = {"metrics/train.json", "plots/train.csv"}
    untimed = timed
    got, want = _lock_outs((repo / "dvc.lock").read_text()), _lock_outs(ref["dvc.lock"])
    assert got.keys() == want.keys()
    assert "models/dpr" in got
    assert {k: v for k, v in got.items() if k not in untimed} == {k: v for k, v in want.items() if k not in untimed}
    assert (repo / "metrics" / "retrieval.json").read_text() == ref["metrics/retrieval.json"]
    assert list((repo / ".cache" / "train").iterdir()) == []
    for name in timed:
        assert _untimed(name, (repo / name).read_text()) == _untimed(name, ref[name]), name
    leftovers = [p for p in repo.rglob("*.tmp") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert leftovers == []
    ran, out = repro(repo)
    assert ran == set(), out[-4000:]


@pytest.mark.slow
def test_round_two_runs_on_round_one_and_its_params_rerun_only_round_two(tiny_repos, tmp_path):
    repo = tmp_path / "round2"
    shutil.copytree(tiny_repos["repo"], repo, symlinks=True)
    ran, _ = repro(repo)                  # the copy as the earlier tests left it, reproduced
    lock = (repo / "dvc.lock").read_text()
    shutil.copy(repo / "round2" / "pipeline.yaml", repo / "round2" / "dvc.yaml")   # round two enabled

    def repro_round2() -> set[str]:
        r = _run(["dvc", "repro", "round2/dvc.yaml"], repo)
        assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
        return set(RUNNING.findall(r.stdout))

    round2 = {f"round2/dvc.yaml:{s}" for s in
              ("mine_round2", "train_round2", "encode_round2", "index_round2", "evaluate_round2")}
    assert repro_round2() == round2                               # round one is up to date: not rerun
    metrics = json.loads((repo / "metrics" / "retrieval_round2.json").read_text())
    assert {"bm25", "dpr", "dpr_round2", "hybrid", "hybrid_round2"} <= set(metrics)
    negs = [json.loads(line) for line in (repo / "data" / "negatives_round2" / "train.jsonl").read_text().splitlines()]
    train = {json.loads(line)["id"]: json.loads(line) for line in
             (repo / "data" / "prepared" / "train.jsonl").read_text().splitlines()}
    assert negs and all(not {d for d, _ in n["negatives"]} & set(train[n["id"]].get("relevant", {})) for n in negs)
    # a round-two param reruns round two's training and what follows, not the round-two mining or round one
    assert json.loads((repo / "metrics" / "train_round2.json").read_text())["epochs"] == 2   # round two's default
    edit_params(repo, {"train_round2.epochs": 1})
    # what follows train_round2 reruns only if its checkpoint changed (the tiny model may keep epoch 0)
    rerun = repro_round2()
    assert "round2/dvc.yaml:train_round2" in rerun and rerun <= round2 - {"round2/dvc.yaml:mine_round2"}
    assert json.loads((repo / "metrics" / "train_round2.json").read_text())["epochs"] == 1
    assert repro(repo)[0] == set() and (repo / "dvc.lock").read_text() == lock
    assert repro_round2() == set()


def test_stage_graph_reading():
    # the helper the end-to-end test relies on, on a dvc.yaml written here
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "dvc.yaml").write_text(yaml.safe_dump({"stages": {
            "a": {"cmd": "x", "outs": ["data/a"]},
            "b": {"cmd": "x", "deps": ["data/a/file.txt"], "outs": ["data/b"], "metrics": [{"m.json": {}}]},
            "c": {"cmd": "x", "deps": ["m.json", "data/ab"]},
        }}))
        graph = stage_graph(Path(d))
    assert graph == {"a": {"b"}, "b": {"c"}, "c": set()}
    assert downstream(graph, "a") == {"b", "c"}


# ---------------------------------------------------------------- stages on bad input


def _stage(script, tmp_path, *args, params=None):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params or {}))
    return _run([sys.executable, str(ROOT / "stages" / script), "--params", str(params_path), *args], tmp_path,
                timeout=300)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_prepare_stage_malformed_input(tmp_path):
    data = tmp_path / "ds"
    (data / "qrels").mkdir(parents=True)
    corpus = data / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "ok"}\n{"_id": "c", "text": "bro\n')
    (data / "queries.jsonl").write_text('{"_id": "q", "text": "?"}\n')
    (data / "qrels" / "test.tsv").write_text("q\ta\t1\n")
    r = _stage("prepare.py", tmp_path, "--out", "out/prepared", "--report", "out/data.json",
               params={"prepare": {"dataset": str(data)}})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == _error_lines(r.stderr)          # nothing else on stderr
    [line] = _error_lines(r.stderr)
    assert re.match(rf"error: {re.escape(str(corpus))}:3: malformed JSON", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "params.yaml"]  # no output, no temp files


def test_prepare_stage_unknown_param_key(tmp_path):
    r = _stage("prepare.py", tmp_path, "--out", "out", "--report", "r.json",
               params={"prepare": {"dataset": "x", "max_word": 3}})
    assert r.returncode == 1
    [line] = _error_lines(r.stderr)
    assert "unknown key(s) max_word" in line and str(tmp_path / "params.yaml") in line
    assert not (tmp_path / "out").exists()


def test_mine_stage_malformed_split_writes_nothing(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "title": "", "text": f"tower city {i}"}) + "\n" for i in range(5)))
    good = json.dumps({"id": "q1", "text": "tower", "answers": [], "relevant": {"p1": 1}})
    (prepared / "test.jsonl").write_text(good + "\n")
    (prepared / "dev.jsonl").write_text(good + "\n")
    (prepared / "train.jsonl").write_text(good + "\n" + '{"id": "q2", "text": "city", "relevant": {"p2": "yes"}}\n')
    out = tmp_path / "out"
    out.mkdir()
    r = _stage("mine.py", tmp_path, "--corpus", str(prepared / "corpus.jsonl"),
               "--split", str(prepared / "dev.jsonl"), "--split", str(prepared / "train.jsonl"),
               "--eval", str(prepared / "test.jsonl"), "--negatives", str(out / "negatives"),
               "--run", str(out / "bm25.tsv"), params={"mine": {"k1": 0.9}})
    assert r.returncode == 1, r.stderr
    errors = _error_lines(r.stderr)
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert re.match(rf"error: {re.escape(str(prepared / 'train.jsonl'))}:2: ", errors[0]), errors[0]
    # dev.jsonl's negatives were written into the temporary folder, which is gone with the rest
    assert list(out.iterdir()) == []


def test_mine_stage_succeeds_on_good_input(tmp_path):
    # the same stage on good input writes both outputs (so the test above can fail)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "title": "", "text": f"tower city {i}"}) + "\n" for i in range(5)))
    good = json.dumps({"id": "q1", "text": "tower 3", "answers": [], "relevant": {"p1": 1}})
    (prepared / "train.jsonl").write_text(good + "\n")
    out = tmp_path / "out"
    r = _stage("mine.py", tmp_path, "--corpus", str(prepared / "corpus.jsonl"),
               "--split", str(prepared / "train.jsonl"), "--eval", str(prepared / "train.jsonl"),
               "--negatives", str(out / "negatives"), "--run", str(out / "bm25.tsv"), params={})
    assert r.returncode == 0, r.stderr
    negs = [json.loads(line) for line in (out / "negatives" / "train.jsonl").read_text().splitlines()]
    assert negs[0]["id"] == "q1" and negs[0]["negatives"][0][0] == "p3"
    assert "p1" not in [d for d, _ in negs[0]["negatives"]]
    assert (out / "bm25.tsv").read_text().startswith("q1\tp3\t")
