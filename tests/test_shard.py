"""dprpipe.shard and the optional sharded_encode flow: shards reassemble into the single-process embeddings.

The core runs its shards through any `submit` (threads here; Dask worker processes in the slow
test, as the encode stage does). The flow tests run Prefect (under `prefect_test_harness`) with a DaskTaskRunner on a local
cluster bound to 127.0.0.1: worker processes for the equality test, worker threads for the retry
tests (so a patched encoder is seen by the workers).
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)
from dense_fixtures import tiny_encoder

import dprpipe.shard as shard_mod
from dprpipe.encode import encode_passages_to, load_embeddings, save_embeddings
from dprpipe.io import DataError
from dprpipe.model import DualEncoder
from dprpipe.records import Passage, read_corpus, write_corpus
from dprpipe.shard import merge_shards, read_corpus_range, shard_files, shard_ranges

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `flows` is a folder of the project, not an installed package
    sys.path.insert(0, str(ROOT))

# lengths deliberately unsorted, so the length-sorted batches differ from the file order
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
PASSAGES = [Passage(f"doc-{i}", f"Title {i}" if i % 3 else "", " ".join(WORDS[: (i * 7) % 13 + 1]))
            for i in range(21)]
BATCH, BLOCK = 4, 5   # 21 passages = 5 blocks; 2 shards: blocks 0-2 (15 passages) and 3-4 (6)

# ---------------------------------------------------------------- shard ranges


@pytest.mark.parametrize("n, shards, align, want", [
    (10, 2, 1, [(0, 5), (5, 10)]),
    (11, 2, 1, [(0, 6), (6, 11)]),
    (21, 2, 5, [(0, 15), (15, 21)]),
    (20, 2, 5, [(0, 10), (10, 20)]),
    (10, 3, 4, [(0, 4), (4, 8), (8, 10)]),
    (5, 4, 4, [(0, 4), (4, 5)]),        # 2 blocks: 2 shards, not 4
    (3, 1, 16384, [(0, 3)]),
    (0, 3, 1, []),
])
def test_shard_ranges(n, shards, align, want):
    assert shard_ranges(n, shards, align) == want


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 16385])
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
@pytest.mark.parametrize("align", [1, 5, 64])
def test_shard_ranges_cover_in_order_on_block_boundaries(n, shards, align):
    ranges = shard_ranges(n, shards, align)
    assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) <= shards
    assert all(a < b for a, b in ranges)
    assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))          # contiguous, in order
    assert all(b % align == 0 for _, b in ranges[:-1])                   # block boundaries
    sizes = [-(-(b - a) // align) for a, b in ranges]                    # blocks per shard
    assert max(sizes) - min(sizes) <= 1 or ranges[-1][1] - ranges[-1][0] < align


def test_shard_ranges_rejects_bad_counts():
    with pytest.raises(ValueError):
        shard_ranges(10, 0)
    with pytest.raises(ValueError):
        shard_ranges(10, 2, align=0)


def test_read_corpus_range_streams_a_slice(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", PASSAGES)
    full = read_corpus(tmp_path / "corpus.jsonl")
    for a, b in [(0, 5), (5, 21), (20, 21), (3, 3), (15, 40)]:
        assert list(read_corpus_range(tmp_path / "corpus.jsonl", a, b)) == full[a:b]


# ---------------------------------------------------------------- merging shard files


def _shards(tmp_path, sizes, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    parts, embs, ids = [], [], []
    for i, size in enumerate(sizes):
        emb = rng.normal(size=(size, dim)).astype(np.float32)
        names = [f"s{i}-{j}" for j in range(size)]
        files = shard_files(tmp_path / "shards", i, len(sizes))
        save_embeddings(*files, emb, names)
        parts.append(files)
        embs.append(emb)
        ids += names
    return parts, np.concatenate(embs), ids


@pytest.mark.parametrize("chunk_rows", [1, 3, 65536])
def test_merge_shards_concatenates_in_order(tmp_path, chunk_rows):
    parts, emb, ids = _shards(tmp_path, [7, 0, 5, 1])
    assert parts[1][0].name == "shard-00001-of-00004.npy"
    n = merge_shards(parts, tmp_path / "out" / "passages.npy", tmp_path / "out" / "passages.ids", chunk_rows)
    got, got_ids = load_embeddings(tmp_path / "out" / "passages.npy", tmp_path / "out" / "passages.ids")
    assert n == 13 and got_ids == ids and got.dtype == np.float32
    assert np.array_equal(got, emb)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["passages.ids", "passages.npy"]  # no temp


def test_merge_shards_rejects_mixed_sizes_and_keeps_old_outputs(tmp_path):
    parts, _, _ = _shards(tmp_path, [3, 2])
    save_embeddings(*parts[1], np.zeros((2, 4), np.float32), ["a", "b"])   # another encoder's width
    out = tmp_path / "out"
    save_embeddings(out / "p.npy", out / "p.ids", np.ones((1, 8), np.float32), ["old"])
    with pytest.raises(DataError, match="different embedding sizes"):
        merge_shards(parts, out / "p.npy", out / "p.ids")
    (parts[1][1]).write_text("a\n")                                       # ids no longer match rows
    with pytest.raises(DataError, match="rerun the encode stage"):
        merge_shards(parts, out / "p.npy", out / "p.ids")
    emb, ids = load_embeddings(out / "p.npy", out / "p.ids")
    assert ids == ["old"] and sorted(p.name for p in out.iterdir()) == ["p.ids", "p.npy"]


# ---------------------------------------------------------------- the reference, and the flow's Prefect harness


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny encoder, the corpus file, and the single-process embeddings (the reference)."""
    root = tmp_path_factory.mktemp("sharded")
    tiny_encoder(pooling="mean", use_title=True).save(root / "model")
    write_corpus(root / "corpus.jsonl", PASSAGES)
    model, _ = DualEncoder.load(str(root / "model"))
    encode_passages_to(model, iter(PASSAGES), len(PASSAGES), root / "ref.npy", root / "ref.ids", BATCH, BLOCK)
    return root


def _flow_args(ws: Path, out: Path) -> dict:
    return {"model": str(ws / "model"), "corpus": str(ws / "corpus.jsonl"), "npy": str(out / "passages.npy"),
            "ids": str(out / "passages.ids"), "shards": 2, "batch_size": BATCH, "block_size": BLOCK}


def _assert_same_as_single_process(ws: Path, out: Path) -> float:
    ref, ref_ids = load_embeddings(ws / "ref.npy", ws / "ref.ids")
    got, got_ids = load_embeddings(out / "passages.npy", out / "passages.ids")
    assert got_ids == ref_ids == [p.id for p in PASSAGES]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in out.iterdir()) == ["passages.ids", "passages.npy"]  # shard folder removed
    return float(np.abs(got - ref).max())


def _task_runs(state) -> dict[str, list]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])))
    return {r.name: [r.state.name, r.run_count] for r in runs}


# ---------------------------------------------------------------- encode_sharded (the encode stage's path)


def _failing_encoder(monkeypatch, failures: int) -> dict[int, int]:
    """Make the shard starting at 15 fail its first `failures` attempts; returns attempts per shard start."""
    real, attempts = shard_mod.encode_shard, {}

    def flaky(model, corpus, start, end, files, *args):
        attempts[start] = attempts.get(start, 0) + 1
        if start == 15 and attempts[start] <= failures:
            raise RuntimeError("worker lost (injected)")
        return real(model, corpus, start, end, files, *args)

    monkeypatch.setattr(shard_mod, "encode_shard", flaky)
    return attempts


def _threads_submit(pool: ThreadPoolExecutor):
    return lambda *args: pool.submit(shard_mod.encode_shard_file, *args)


def test_encode_sharded_equals_one_process(workspace, tmp_path):
    with ThreadPoolExecutor(2) as pool:
        result = shard_mod.encode_sharded(_threads_submit(pool), str(workspace / "model"), None,
                                          workspace / "corpus.jsonl", tmp_path / "passages.npy",
                                          tmp_path / "passages.ids", 2, BATCH, BLOCK)
    assert result == {"passages": 21, "shards": 2, "ranges": [[0, 15], [15, 21]]}
    _assert_same_as_single_process(workspace, tmp_path)


def test_encode_sharded_a_failing_shard_fails_it_and_writes_nothing(workspace, monkeypatch, tmp_path):
    attempts = _failing_encoder(monkeypatch, failures=99)
    with ThreadPoolExecutor(2) as pool, pytest.raises(RuntimeError, match="worker lost"):
        shard_mod.encode_sharded(_threads_submit(pool), str(workspace / "model"), None, workspace / "corpus.jsonl",
                                 tmp_path / "passages.npy", tmp_path / "passages.ids", 2, BATCH, BLOCK, passages=21)
    assert attempts == {0: 1, 15: 1}        # no retries here: DVC reruns the stage
    assert list(tmp_path.iterdir()) == []   # no outputs, and shard 0's files are gone with the shard folder


@pytest.mark.slow
def test_encode_sharded_on_a_local_dask_cluster_equals_one_process(workspace, tmp_path):
    # the encode stage's runner: 2 spawned worker processes on 127.0.0.1
    with shard_mod.dask_submit("", n_workers=2) as submit:
        shard_mod.encode_sharded(submit, str(workspace / "model"), None, workspace / "corpus.jsonl",
                                 tmp_path / "passages.npy", tmp_path / "passages.ids", 2, BATCH, BLOCK)
    _assert_same_as_single_process(workspace, tmp_path)


# ---------------------------------------------------------------- the sharded_encode flow (optional runner)


@pytest.mark.slow
def test_sharded_encode_on_a_local_dask_cluster_equals_one_process(workspace, harness, tmp_path):
    from flows.sharded_encode import run_sharded_encode

    # the flow's own local cluster: 2 worker processes (spawned: each imports torch and the encoder)
    state = run_sharded_encode(**_flow_args(workspace, tmp_path), n_workers=2, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"passages": 21, "shards": 2, "ranges": [[0, 15], [15, 21]]}
    diff = _assert_same_as_single_process(workspace, tmp_path)
    print(f"sharded vs single process: max |difference| {diff:.1e}")
    runs = _task_runs(state)
    assert runs["encode shard 0 of 2"] == runs["encode shard 1 of 2"] == ["Completed", 1]


@pytest.fixture
def threaded_runner(monkeypatch):
    """Dask workers as threads of this process (so they see patches), and no wait between retries."""
    import flows.sharded_encode as enc_flows
    from prefect_dask import DaskTaskRunner

    monkeypatch.setattr(enc_flows, "encode_shard", enc_flows.encode_shard.with_options(retry_delay_seconds=0))
    # in-process workers talk over inproc://, not a socket
    return enc_flows.sharded_encode.with_options(task_runner=DaskTaskRunner(cluster_kwargs={
        "n_workers": 2, "threads_per_worker": 1, "processes": False, "dashboard_address": None}))


@pytest.mark.slow
def test_a_failing_shard_is_retried_alone(workspace, harness, threaded_runner, monkeypatch, tmp_path):
    attempts = _failing_encoder(monkeypatch, failures=1)
    state = threaded_runner(**_flow_args(workspace, tmp_path), return_state=True)
    assert state.is_completed(), state.message
    assert attempts == {0: 1, 15: 2}   # the failed shard ran again; the other did not
    runs = _task_runs(state)
    assert runs["encode shard 0 of 2"] == ["Completed", 1] and runs["encode shard 1 of 2"] == ["Completed", 2]
    _assert_same_as_single_process(workspace, tmp_path)


@pytest.mark.slow
def test_a_shard_failing_every_retry_fails_the_flow_and_writes_nothing(workspace, harness, threaded_runner,
                                                                        monkeypatch, tmp_path):
    from flows.sharded_encode import SHARD_RETRIES

    attempts = _failing_encoder(monkeypatch, failures=99)
    state = threaded_runner(**_flow_args(workspace, tmp_path), return_state=True)
    assert state.is_failed()
    assert attempts == {0: 1, 15: 1 + SHARD_RETRIES}
    assert "worker lost" in state.message or "worker lost" in repr(state.result(raise_on_failure=False))
    assert list(tmp_path.iterdir()) == []   # no outputs, and shard 0's files are gone with the shard folder
