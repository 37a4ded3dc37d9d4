"""SIGKILL each long stage midway, rerun it, and get what an uninterrupted run gets.

A tiny workspace (a synthetic BEIR dataset, a 1-layer 32-wide BERT with the bundled
tokenizer, cheap params) is prepared once; an uninterrupted run of mine, train, encode and
index gives the reference outputs. Then each stage runs again on a fresh copy of its inputs
and is killed with SIGKILL at a chosen point (the process kills itself there, so the point is
exact and the test is not a race): before one of its renames, or in the middle of a training
step. Right after the kill none of the stage's outputs may exist (outputs are renamed into
place only when complete). The rerun must then give byte-identical outputs (the models too:
training resumes from its last state) and identical training metrics, and leave no
temporary file behind.

Each stage runs as its own process, forked from this one after torch and transformers are
imported (a fresh interpreter would spend ~5-10 s importing them on a busy 2-core machine),
running the stage script as `python stages/<stage>.py` would; the kill is a real SIGKILL of
that process. One run of the prepare stage is a plain subprocess.
"""

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread in this process)

ROOT = Path(__file__).resolve().parents[1]

# stage -> (its script and arguments as in dvc.yaml, the inputs it reads, the outputs later stages read);
# encode and index as in dvc.yaml's `encode` and `index` stages (the fine-tuned model's branch)
STAGES = {
    "mine": (["mine.py", "--corpus", "data/prepared/corpus.jsonl", "--split", "data/prepared/train.jsonl",
              "--split", "data/prepared/dev.jsonl", "--eval", "data/prepared/test.jsonl",
              "--negatives", "data/negatives", "--run", "data/runs/bm25.tsv"],
             ["data/prepared"], ["data/negatives", "data/runs/bm25.tsv"]),
    "train": (["train.py", "--corpus", "data/prepared/corpus.jsonl", "--train", "data/prepared/train.jsonl",
               "--dev", "data/prepared/dev.jsonl", "--negatives", "data/negatives", "--out", "models/dpr",
               "--state", ".cache/train", "--metrics", "metrics/train.json", "--plot", "plots/train.csv"],
              ["data/prepared", "data/negatives"], ["models/dpr", "metrics/train.json",
                                                                    "plots/train.csv"]),
    "encode": (["encode.py", "--model", "models/dpr", "--corpus", "data/prepared/corpus.jsonl",
                "--queries", "data/prepared/test.jsonl", "--out", "data/embeddings/dpr"],
               ["data/prepared", "models/dpr"], ["data/embeddings/dpr"]),
    "index": (["index.py", "--embeddings", "data/embeddings/dpr", "--out", "data/index/dpr",
               "--run", "data/runs/dpr.tsv"],
              ["data/embeddings/dpr"], ["data/index/dpr", "data/runs/dpr.tsv"]),
}


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", **extra)
    return e


def run_stage(ws: Path, stage: str, kill_at: str | None = None) -> int:
    """Run a stage script in a forked process in `ws`; its exit status (-9 when killed).

    kill_at "replace:3" SIGKILLs the process just before its 3rd os.replace (a rename into
    place), "step:5" before its 5th optimiser step.
    """
    args, _, _ = STAGES[stage]
    script = str(ROOT / "stages" / args[0])
    log = ws / f"{stage}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 1
        try:
            import faiss
            import torch

            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)   # not pytest's capture
            os.chdir(ws)
            os.environ.update(env())
            torch.set_num_threads(1)
            faiss.omp_set_num_threads(1)
            if kill_at:
                point, n = kill_at.split(":")
                owner, name = (os, "replace") if point == "replace" else (torch.optim.AdamW, "step")
                original, calls = getattr(owner, name), [0]

                def counted(*a, **k):
                    calls[0] += 1
                    if calls[0] == int(n):
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original(*a, **k)

                setattr(owner, name, counted)
            sys.argv = [script, *args[1:], "--params", "params.yaml"]
            sys.path.insert(0, str(ROOT / "stages"))
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            print(e.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 300
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:    # a hung child must not hang the test run
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{stage} hung:\n{log_tail(ws, stage)}")
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(done[1])


def log_tail(ws: Path, stage: str) -> str:
    path = ws / f"{stage}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def snapshot(ws: Path, paths) -> dict[str, bytes]:
    """Every file under `paths` (relative to ws) with its bytes; a missing path contributes nothing."""
    out = {}
    for rel in paths:
        p = ws / rel
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        out.update({f.relative_to(ws).as_posix(): f.read_bytes() for f in files})
    return out


def leftovers(ws: Path) -> list[str]:
    """Temporary files or folders of atomic writes anywhere in the workspace."""
    return sorted(p.relative_to(ws).as_posix() for p in ws.rglob(".*") if p.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------- the tiny workspace

def write_dataset(folder: Path) -> None:
    """40 documents over a 120-word vocabulary; 16 train and 8 test queries, each judging one document."""
    import random

    rng = random.Random(7)
    words = [f"w{i}" for i in range(120)]
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(rng.choices(words, k=30))} for i in range(40)]
    queries = [{"_id": f"q{i}", "text": " ".join(docs[i]["text"].split()[:5])} for i in range(24)]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, ids in (("train", range(16)), ("test", range(16, 24))):
        (folder / "qrels" / f"{split}.tsv").write_text("".join(f"q{i}\td{i}\t1\n" for i in ids))


def write_encoder(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dprpipe.model import DEFAULT_MODEL, resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_params(ws: Path) -> None:
    """The keys that differ from the configs' defaults (the project's params.yaml is not needed)."""
    params = {"prepare": {"dataset": str(ws / "dataset"), "dev_fraction": 0.25},
              "mine": {"run_depth": 20, "depth": 20, "negatives": 5},
              "model": {"model": str(ws / "tiny-encoder"), "precision": "fp32", "query_max_length": 16,
                        "shared": True, "passage_max_length": 48},
              # 12 train questions in batches of 4: 3 steps an epoch; states after steps 2, 3, 4 and 6
              "train": {"epochs": 2, "batch_size": 4, "negative_pool": 5, "val_negatives": 3, "negatives": "bm25",
                        "include_dev": False, "frozen_layers": 0,   # the shared toy encoder has one layer
                        "checkpoint_every": 2, "passage_max_length": 32, "lr": 1e-3, "warmup_ratio": 0.0},
              "encode": {"batch_size": 8, "block_size": 16},
              "index": {"kind": "flat"}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A workspace where prepare and then every stage under test ran once, uninterrupted."""
    from dprpipe.model import DualEncoder

    ws = tmp_path_factory.mktemp("reference")
    write_dataset(ws / "dataset")
    write_encoder(ws / "tiny-encoder")
    write_params(ws)
    DualEncoder.load(str(ws / "tiny-encoder"))   # transformers' lazy imports, once, before the forks
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", "params.yaml", "--out",
                        "data/prepared", "--report", "metrics/data.json"], cwd=ws, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for stage in STAGES:
        assert run_stage(ws, stage) == 0, f"{stage}:\n{log_tail(ws, stage)}"
    return ws


def fresh_copy(reference: Path, tmp_path: Path, stage: str) -> Path:
    """The stage's inputs (and params) from the reference workspace, none of its outputs.

    The params name the dataset and the encoder by absolute path, in the reference workspace.
    """
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(reference / "params.yaml", ws / "params.yaml")
    for rel in STAGES[stage][1]:
        src = reference / rel
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / rel)
    return ws


def kill_then_rerun(reference: Path, tmp_path: Path, stage: str, kill_at: str, compare, wrote) -> Path:
    """Kill the stage at `kill_at`, check nothing readable is left, rerun, `compare` with the reference.

    `wrote(ws)` tells that the killed run had written something (so the kill really was midway).
    """
    ws = fresh_copy(reference, tmp_path, stage)
    outputs = STAGES[stage][2]
    status = run_stage(ws, stage, kill_at=kill_at)
    assert status == -signal.SIGKILL, f"{stage} was not killed at {kill_at} ({status}):\n{log_tail(ws, stage)}"
    assert snapshot(ws, outputs) == {}, f"{stage} left outputs after a SIGKILL at {kill_at}"
    assert wrote(ws), "the kill came before the stage wrote anything: move the kill point later"

    assert run_stage(ws, stage) == 0, log_tail(ws, stage)
    compare(snapshot(ws, outputs), snapshot(reference, outputs))
    assert leftovers(ws) == []                            # the rerun removed the killed run's temporaries
    return ws


def same_bytes(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert differ == [], f"differ from the uninterrupted run: {differ}"


# ---------------------------------------------------------------- the kills

@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["replace:1", "replace:3"])
def test_mine_killed_midway(reference, tmp_path, kill_at):
    # renames: train.jsonl and dev.jsonl in the temporary folder, the folder, then the BM25 run
    kill_then_rerun(reference, tmp_path, "mine", kill_at, same_bytes, leftovers)


@pytest.mark.slow
def test_mine_killed_between_its_two_outputs(reference, tmp_path):
    # before the 4th rename the negatives are in place and the run is not: each output is whole or absent
    ws = fresh_copy(reference, tmp_path, "mine")
    assert run_stage(ws, "mine", kill_at="replace:4") == -signal.SIGKILL
    assert snapshot(ws, ["data/runs/bm25.tsv"]) == {}
    assert snapshot(ws, ["data/negatives"]) == snapshot(reference, ["data/negatives"])


@pytest.mark.slow
def test_train_killed_mid_step_resumes_to_the_same_model(reference, tmp_path):
    # 3 steps an epoch, 2 epochs, a state every 2 steps: killed in step 5, the rerun resumes from
    # the state after step 4 (epoch 2, step 1 of 3)
    def compare(got, want):
        same_bytes({k: v for k, v in got.items() if k != "metrics/train.json"},
                   {k: v for k, v in want.items() if k != "metrics/train.json"})
        got_m, want_m = (json.loads(x["metrics/train.json"]) for x in (got, want))
        del got_m["train_seconds"], want_m["train_seconds"]      # wall time is the one thing that differs
        assert got_m == want_m and "val_ndcg@10" in got_m

    def resumable_state(ws):
        progress = list(ws.glob(".cache/train/*/last/progress.json"))
        return len(progress) == 1 and json.loads(progress[0].read_text())["global_step"] == 4

    ws = kill_then_rerun(reference, tmp_path, "train", "step:5", compare, resumable_state)
    assert "epoch 2, step 1 of 3" in log_tail(ws, "train")   # it resumed, rather than starting over


@pytest.mark.slow
def test_encode_killed_midway(reference, tmp_path):
    # renames: passages.ids, passages.npy, queries.npy, queries.ids, then the folder: killed before queries.npy
    kill_then_rerun(reference, tmp_path, "encode", "replace:3", same_bytes, leftovers)


@pytest.mark.slow
def test_index_killed_midway(reference, tmp_path):
    # renames: ids.txt in the temporary folder, the folder, the run: killed before the folder
    kill_then_rerun(reference, tmp_path, "index", "replace:2", same_bytes, leftovers)


@pytest.mark.slow
def test_reference_outputs_are_complete(reference):
    # the comparisons above are only as good as the reference: check it is what the stages promise
    from dprpipe.encode import load_embeddings
    from dprpipe.index import Searcher
    from dprpipe.io import read_run
    from dprpipe.model import DualEncoder

    emb, ids = load_embeddings(reference / "data/embeddings/dpr/passages.npy",
                               reference / "data/embeddings/dpr/passages.ids")
    assert emb.shape == (40, 32) and ids[0] == "d0"
    assert len(Searcher.load(reference / "data/index/dpr").ids) == 40
    assert set(read_run(reference / "data/runs/dpr.tsv")) == {f"q{i}" for i in range(16, 24)}
    assert len(read_run(reference / "data/runs/bm25.tsv")) == 8
    _, meta = DualEncoder.load(str(reference / "models/dpr"))
    assert meta["epoch"] in (0, 1, 2)
    history = [line.split(",")[0] for line in (reference / "plots/train.csv").read_text().splitlines()[1:]]
    assert history == ["0", "1", "2"]


# ---------------------------------------------------------------- truncated or corrupted artifacts

def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from dense_fixtures import tiny_encoder

    folder = tmp_path_factory.mktemp("ckpt") / "model"
    tiny_encoder(seed=0).save(folder)
    return folder


def header_without_a_tensor(path: Path) -> None:
    """Rewrite a safetensors file with one tensor left out of its header (the config still wants it)."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__" and "pooler" not in k)
    start, end = header.pop(name)["data_offsets"]
    data = raw[8 + n:]
    for meta in header.values():
        if isinstance(meta, dict) and "data_offsets" in meta and meta["data_offsets"][0] >= end:
            meta["data_offsets"] = [meta["data_offsets"][0] - (end - start), meta["data_offsets"][1] - (end - start)]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[:start] + data[end:])


CHECKPOINT_DAMAGE = {
    "weights truncated": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-1]),
    "weights half": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:5000]),
    "weights empty": lambda c: (c / "model.safetensors").write_bytes(b""),
    "weights garbage": lambda c: (c / "model.safetensors").write_bytes(b"\x00garbage" * 100),
    "weights missing": lambda c: (c / "model.safetensors").unlink(),
    "a tensor missing": lambda c: header_without_a_tensor(c / "model.safetensors"),
    "config.json garbage": lambda c: (c / "config.json").write_text("{not json"),
    "config.json wrong shape": lambda c: (c / "config.json").write_text(
        (c / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64')),
    "dpr_config.json truncated": lambda c: (c / "dpr_config.json").write_text(
        (c / "dpr_config.json").read_text()[:40]),
    "dpr_config.json unknown key": lambda c: (c / "dpr_config.json").write_text(json.dumps(
        {"encoder": {"model": "x", "poolnig": "cls"}})),
    "tokenizer garbage": lambda c: (c / "tokenizer.json").write_text("[1, 2"),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_a_data_error(checkpoint, tmp_path, damage):
    from dprpipe.io import DataError
    from dprpipe.model import DualEncoder

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    DualEncoder.load(str(folder))                                  # intact: loads
    CHECKPOINT_DAMAGE[damage](folder)
    with pytest.raises(DataError) as e:
        DualEncoder.load(str(folder))
    assert e.value.path.startswith(str(folder)) and "\n" not in str(e.value)


def test_pickled_weights_are_never_loaded(checkpoint, tmp_path):
    # a folder with only pytorch_model.bin (a pickle) is refused, and its pickle never runs
    import torch

    from dprpipe.io import DataError
    from dprpipe.model import DualEncoder

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weights": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(DataError, match="safetensors"):
        DualEncoder.load(str(folder))
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    # nothing in the package or the stages unpickles a file: torch.load only with weights_only=True
    import ast

    calls = []
    for path in [*(ROOT / "dprpipe").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name in ("load", "loads") and isinstance(node.func.value, ast.Name) and \
                        node.func.value.id in ("pickle", "torch", "dill", "joblib"):
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = node.func.value.id == "torch" and isinstance(kw.get("weights_only"), ast.Constant) \
                        and kw["weights_only"].value is True
                    calls.append((path.name, node.lineno, safe))
                if name == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "np":
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value)
                    calls.append((path.name, node.lineno, safe))
    assert calls and all(safe for _, _, safe in calls), calls


def test_checksums_catch_a_flipped_weight(checkpoint, tmp_path):
    # a flipped bit inside the weights still parses: only the checksums tell it from the real model
    from dprpipe.io import DataError, write_checksums
    from dprpipe.model import DualEncoder

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder)
    write_checksums(folder)
    DualEncoder.load(str(folder))
    flip_byte(folder / "model.safetensors")
    with pytest.raises(DataError, match="model.safetensors: contents differ from checksums.sha256"):
        DualEncoder.load(str(folder))


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    import numpy as np

    from dprpipe.index import IndexConfig, build_index, save_index

    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    folder = tmp_path_factory.mktemp("idx") / "index"
    save_index(folder, build_index(x, IndexConfig()), [f"d{i}" for i in range(50)], IndexConfig())
    return folder


INDEX_DAMAGE = {
    "index.faiss truncated": lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes()[:-7]),
    "index.faiss missing": lambda f: (f / "index.faiss").unlink(),
    "index.faiss header garbage": lambda f: (f / "index.faiss").write_bytes(
        b"IxFx" + bytes(60) + (f / "index.faiss").read_bytes()[64:]),
    "index.json garbage": lambda f: (f / "index.json").write_text("[]"),
    "index.json not utf-8": lambda f: (f / "index.json").write_bytes(b"\xff\xfe{}"),
    "index.json wrong kind": lambda f: (f / "index.json").write_text(json.dumps(
        {**json.loads((f / "index.json").read_text()), "kind": "hnsw"})),
    "index.json wrong dim": lambda f: (f / "index.json").write_text(json.dumps(
        {**json.loads((f / "index.json").read_text()), "dim": 16})),
    "ids.txt short": lambda f: (f / "ids.txt").write_text("".join(f"d{i}\n" for i in range(49))),
    "ids.txt missing": lambda f: (f / "ids.txt").unlink(),
}


@pytest.mark.parametrize("damage", list(INDEX_DAMAGE))
def test_damaged_index_is_a_data_error(index_folder, tmp_path, damage):
    from dprpipe.index import Searcher
    from dprpipe.io import DataError

    folder = tmp_path / "index"
    shutil.copytree(index_folder, folder)
    Searcher.load(folder)
    INDEX_DAMAGE[damage](folder)
    with pytest.raises(DataError) as e:
        Searcher.load(folder)
    assert e.value.path.startswith(str(folder)) and "\n" not in str(e.value)


def test_checksums_catch_a_flipped_vector(index_folder, tmp_path):
    import numpy as np

    from dprpipe.index import Searcher
    from dprpipe.io import DataError

    folder = tmp_path / "index"
    shutil.copytree(index_folder, folder)
    (folder / "checksums.sha256").unlink()
    q = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    before = Searcher.load(folder).search(q, 5)[0]
    flip_byte(folder / "index.faiss", 40)      # inside the stored vectors: FAISS reads it without complaint
    assert Searcher.load(folder).ids            # (which is why the checksums are needed)
    shutil.rmtree(folder)
    shutil.copytree(index_folder, folder)       # as save_index wrote it, checksums included
    assert Searcher.load(folder).search(q, 5)[0] == before
    flip_byte(folder / "index.faiss", 40)
    with pytest.raises(DataError, match="index.faiss: contents differ"):
        Searcher.load(folder)


def test_a_pickle_planted_in_the_training_state_never_runs(tmp_path, capsys, monkeypatch):
    # resume reads trainer.pt (optimizer state) with torch.load(weights_only=True): a planted
    # pickle is refused, not executed, even when the checksums were forged to match; the state
    # is then ignored and training starts over
    import pickle

    from dense_fixtures import tiny_encoder, toy_corpus, toy_negatives, toy_queries

    import dprpipe.loss as loss_mod
    from dprpipe.io import write_checksums
    from dprpipe.train import TrainConfig, TrainData, state_folder, train

    cfg = TrainConfig(epochs=1, batch_size=8, hard_negatives=1, negative_pool=3, val_negatives=2, seed=1,
                      include_dev=False)
    train_q, dev_q = toy_queries()
    data = TrainData(toy_corpus(), train_q, dev_q, toy_negatives())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loss_mod, "batch_loss", interrupted)   # killed in its first step: a state is left
    with pytest.raises(KeyboardInterrupt):
        train(tiny_encoder(), data, cfg, tmp_path / "out", tmp_path / "state", progress=False)
    monkeypatch.undo()
    state = state_folder(tmp_path / "state", tiny_encoder(), data, cfg)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(state / "last" / "trainer.pt", "wb") as f:
        pickle.dump({"optimizer": Payload()}, f, protocol=2)
    write_checksums(state / "last")   # a planted file with matching checksums
    history = train(tiny_encoder(), data, cfg, tmp_path / "out2", tmp_path / "state", progress=False)
    out = capsys.readouterr().out
    assert "ignoring" in out and ("weights_only" in out or "Unpickl" in out), out
    assert not marker.exists()
    assert [h["epoch"] for h in history] == [0, 1]   # refused, then trained from the start
