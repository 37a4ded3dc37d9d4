"""dprpipe.index: exact search against numpy, approximate recall against exact, saved indexes."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)

from dprpipe.index import IndexConfig, Searcher, build_index, save_index
from dprpipe.io import DataError


def random_data(n=300, nq=25, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(nq, dim)).astype(np.float32)


def clustered_data(n=2000, nq=200, dim=32, clusters=20, noise=0.3, seed=0):
    """Points and queries around shared centres: many close neighbours, as with real embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, dim))
    q = centres[rng.integers(clusters, size=nq)] + noise * rng.normal(size=(nq, dim))
    return x.astype(np.float32), q.astype(np.float32)


def exact_top(x, q, k):
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def recall_at(found, exact):
    k = exact.shape[1]
    return float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))


IDS = [f"id{i}" for i in range(300)]


@pytest.mark.parametrize("k", [1, 10, 50])
def test_flat_search_is_exact(k):
    x, q = random_data()
    searcher = Searcher(build_index(x, IndexConfig(kind="flat")), IDS)
    hits, scores = searcher.search(q, k)
    order, want = exact_top(x, q, k)
    assert hits == [[IDS[i] for i in row] for row in order]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


def test_search_clamps_k_and_run_gives_id_score_pairs():
    x, q = random_data(n=5, nq=2)
    searcher = Searcher(build_index(x, IndexConfig()), list("abcde"))
    hits, scores = searcher.search(q, 50)
    assert [len(h) for h in hits] == [5, 5] and scores.shape == (2, 5)
    run = searcher.run(["q1", "q2"], q, 3)
    order, want = exact_top(x, q, 3)
    assert list(run) == ["q1", "q2"]
    for qi, qid in enumerate(run):
        assert [d for d, _ in run[qid]] == ["abcde"[i] for i in order[qi]]
        assert [s for _, s in run[qid]] == pytest.approx(want[qi].tolist(), rel=1e-5)
        assert all(isinstance(s, float) for _, s in run[qid])


@pytest.mark.parametrize("cfg, bound", [
    (IndexConfig(kind="hnsw"), 0.95),    # measured 0.999-1.000 over five seeds
    (IndexConfig(kind="ivfpq"), 0.35),   # measured 0.46-0.48: 4-byte PQ codes of 32-d vectors are coarse
])
def test_approximate_recall_at_10(cfg, bound):
    x, q = clustered_data()
    exact, _ = exact_top(x, q, 10)
    _, found = build_index(x, cfg).search(q, 10)
    r = recall_at(found, exact)
    print(f"\n{cfg.kind} recall@10 vs exact on 2000 x 32 clustered vectors: {r:.3f}")
    assert r >= bound


def test_ivfpq_more_probes_and_codes_help():
    x, q = clustered_data(seed=1)
    exact, _ = exact_top(x, q, 10)
    few = recall_at(build_index(x, IndexConfig(kind="ivfpq", nprobe=1, pq_m=16)).search(q, 10)[1], exact)
    many = recall_at(build_index(x, IndexConfig(kind="ivfpq", nprobe=16, pq_m=16)).search(q, 10)[1], exact)
    print(f"\nivfpq pq_m=16 recall@10: nprobe=1 {few:.3f}, nprobe=16 {many:.3f}")
    assert many >= few and many > 0.5


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_and_load_round_trip(tmp_path, kind):
    x, q = clustered_data(n=1200, nq=20, dim=16)
    ids = [f"doc{i}" for i in range(len(x))]
    cfg = IndexConfig(kind=kind, ef_search=40, nprobe=4)
    index = build_index(x, cfg)
    before = Searcher(index, ids).search(q, 10)
    save_index(tmp_path / "idx", index, ids, cfg)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["checksums.sha256", "ids.txt", "index.faiss", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["kind"] == kind and meta["ntotal"] == len(ids) and meta["dim"] == 16
    loaded = Searcher.load(tmp_path / "idx")
    assert loaded.ids == ids
    after = loaded.search(q, 10)
    assert after[0] == before[0]
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6)


@pytest.mark.parametrize("kind, attr, value", [("hnsw", "ef_search", 7), ("ivfpq", "nprobe", 3)])
def test_load_applies_search_settings_from_index_json(tmp_path, kind, attr, value):
    x, _ = clustered_data(n=1200, nq=1, dim=16)
    cfg = IndexConfig(kind=kind)
    save_index(tmp_path / "idx", build_index(x, cfg), [str(i) for i in range(len(x))], cfg)
    meta_path = tmp_path / "idx" / "index.json"
    (tmp_path / "idx" / "checksums.sha256").unlink()  # hand-edited settings, as a user might
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), attr: value}))
    index = Searcher.load(tmp_path / "idx").index
    got = index.hnsw.efSearch if kind == "hnsw" else faiss.extract_index_ivf(index).nprobe
    assert got == value


@pytest.fixture
def saved(tmp_path):
    x, _ = random_data(n=50)
    ids = [f"d{i}" for i in range(50)]
    save_index(tmp_path / "idx", build_index(x, IndexConfig()), ids, IndexConfig())
    # without the checksums: the structural checks below must catch damage on their own
    (tmp_path / "idx" / "checksums.sha256").unlink()
    return tmp_path / "idx"


def test_checksums_name_a_damaged_file(tmp_path):
    x, _ = random_data(n=50)
    save_index(tmp_path / "idx", build_index(x, IndexConfig()), [f"d{i}" for i in range(50)], IndexConfig())
    (tmp_path / "idx" / "ids.txt").write_text("".join(f"d{i}\n" for i in range(50))[:-3])
    with pytest.raises(DataError, match="ids.txt: contents differ from checksums"):
        Searcher.load(tmp_path / "idx")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_index_file_is_a_data_error(saved, damage):
    path = saved / "index.faiss"
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "garbage": b"not an index" * 10}[damage])
    with pytest.raises(DataError, match="rerun the index stage") as err:
        Searcher.load(saved)
    assert err.value.path == str(saved)


@pytest.mark.parametrize("lines", [49, 51])
def test_mismatched_ids_file_is_a_data_error(saved, lines):
    (saved / "ids.txt").write_text("".join(f"d{i}\n" for i in range(lines)))
    with pytest.raises(DataError, match="ids.txt has"):
        Searcher.load(saved)


def test_stale_index_json_is_a_data_error(saved):
    meta = json.loads((saved / "index.json").read_text())
    (saved / "index.json").write_text(json.dumps({**meta, "ntotal": 49}))
    with pytest.raises(DataError):
        Searcher.load(saved)


def test_unknown_kind_and_bad_inputs_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="'lsh'"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="zero"):
        build_index(np.zeros((0, 8), np.float32), IndexConfig())
    x, _ = random_data(n=400, dim=16)
    with pytest.raises(ValueError, match="pq_m"):
        build_index(x, IndexConfig(kind="ivfpq", pq_m=5))
    with pytest.raises(ValueError, match="ids"):
        save_index(tmp_path / "idx", build_index(x, IndexConfig()), IDS[:10], IndexConfig())
    assert not (tmp_path / "idx").exists()
