"""dprpipe.encode: streamed passage embeddings equal one-shot encoding, in the original order."""

from __future__ import annotations

import numpy as np
import pytest
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)
from dense_fixtures import tiny_encoder

import dprpipe.encode as encode_mod
from dprpipe.encode import encode_passages_to, encode_texts, load_embeddings, read_ids, save_embeddings
from dprpipe.io import DataError
from dprpipe.model import passage_texts
from dprpipe.records import Passage

# lengths deliberately unsorted, so length-sorted batches must be put back in place
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()
PASSAGES = [Passage(f"doc-{i}", f"Title {i}" if i % 3 else "", " ".join(WORDS[: (i * 7) % 13 + 1]))
            for i in range(21)]


@pytest.fixture(scope="module")
def model():
    return tiny_encoder(pooling="mean", use_title=True)


@pytest.fixture(scope="module")
def reference(model):
    """Each passage encoded alone (batch of one: no padding, no sorting)."""
    texts = passage_texts(PASSAGES, True)
    return np.concatenate([encode_texts(model, [t], "passage", batch_size=1) for t in texts])


def test_encode_texts_rows_follow_the_input_order(model, reference):
    texts = passage_texts(PASSAGES, True)
    got = encode_texts(model, texts, "passage", batch_size=4)
    assert got.shape == (len(texts), model.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    # and order-equivariant: reversing the input reverses the rows
    np.testing.assert_allclose(encode_texts(model, texts[::-1], "passage", batch_size=4), got[::-1],
                               rtol=1e-4, atol=1e-5)


def test_encode_texts_rejects_unknown_kind(model):
    with pytest.raises(ValueError, match="'doc'"):
        encode_texts(model, ["x"], "doc")


@pytest.mark.parametrize("block_size, batch_size", [(5, 2), (8, 3), (100, 64)])
def test_encode_passages_to_streams_in_order(model, reference, tmp_path, block_size, batch_size):
    npy, ids = tmp_path / "emb" / "corpus.npy", tmp_path / "emb" / "corpus.ids"
    encode_passages_to(model, iter(PASSAGES), len(PASSAGES), npy, ids, batch_size=batch_size, block_size=block_size)
    whole = encode_texts(model, passage_texts(PASSAGES, True), "passage", batch_size=64)
    emb, got_ids = load_embeddings(npy, ids)
    assert got_ids == [p.id for p in PASSAGES] == read_ids(ids)
    assert emb.dtype == np.float32 and emb.shape == (len(PASSAGES), model.dim)
    np.testing.assert_allclose(emb, whole, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb, reference, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in npy.parent.iterdir()) == ["corpus.ids", "corpus.npy"]  # no temp left


@pytest.mark.parametrize("n", [len(PASSAGES) - 1, len(PASSAGES) + 1])
def test_encode_passages_to_checks_the_count(model, tmp_path, n):
    npy, ids = tmp_path / "c.npy", tmp_path / "c.ids"
    with pytest.raises(DataError, match="expected"):
        encode_passages_to(model, iter(PASSAGES), n, npy, ids, batch_size=4, block_size=5)
    assert list(tmp_path.iterdir()) == []


def test_no_temp_file_left_when_encoding_fails_midway(model, tmp_path, monkeypatch):
    npy, ids = tmp_path / "c.npy", tmp_path / "c.ids"
    real, calls = encode_mod.encode_texts, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_mod, "encode_texts", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        encode_passages_to(model, iter(PASSAGES), len(PASSAGES), npy, ids, batch_size=2, block_size=5)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_failed_encoding_keeps_the_previous_outputs(model, tmp_path, monkeypatch):
    npy, ids = tmp_path / "c.npy", tmp_path / "c.ids"
    save_embeddings(npy, ids, np.ones((2, model.dim), np.float32), ["a", "b"])
    monkeypatch.setattr(encode_mod, "encode_texts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        encode_passages_to(model, iter(PASSAGES), len(PASSAGES), npy, ids, batch_size=2, block_size=5)
    emb, got_ids = load_embeddings(npy, ids)
    assert got_ids == ["a", "b"] and np.array_equal(emb, np.ones((2, model.dim)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ids", "c.npy"]


def test_newline_in_a_passage_id_is_rejected(model, tmp_path):
    bad = [*PASSAGES[:3], Passage("bad\nid", "", "text")]
    with pytest.raises(DataError, match="newline"):
        encode_passages_to(model, iter(bad), len(bad), tmp_path / "c.npy", tmp_path / "c.ids", block_size=2)
    assert list(tmp_path.iterdir()) == []


def test_save_and_load_embeddings_round_trip(tmp_path):
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    save_embeddings(tmp_path / "e.npy", tmp_path / "e.ids", emb, list("abcde"))
    got, ids = load_embeddings(tmp_path / "e.npy", tmp_path / "e.ids")
    assert ids == list("abcde") and np.array_equal(got, emb)


@pytest.mark.parametrize("n_ids", [4, 6])
def test_load_embeddings_rejects_mismatched_ids(tmp_path, n_ids):
    np.save(tmp_path / "e.npy", np.zeros((5, 8), np.float32))
    (tmp_path / "e.ids").write_text("".join(f"{i}\n" for i in range(n_ids)))
    with pytest.raises(DataError, match="rerun the encode stage") as err:
        load_embeddings(tmp_path / "e.npy", tmp_path / "e.ids")
    assert err.value.path == str(tmp_path / "e.npy")


@pytest.mark.parametrize("keep", [0, 5, 40, -4], ids=["empty", "in-magic", "in-header", "in-data"])
def test_load_embeddings_rejects_a_truncated_npy(tmp_path, keep):
    path = tmp_path / "e.npy"
    np.save(path, np.zeros((5, 8), np.float32))
    path.write_bytes(path.read_bytes()[:keep])
    (tmp_path / "e.ids").write_text("".join(f"{i}\n" for i in range(5)))
    with pytest.raises(DataError, match="rerun the encode stage"):
        load_embeddings(path, tmp_path / "e.ids")


def test_load_embeddings_rejects_garbage_and_wrong_rank(tmp_path):
    (tmp_path / "e.ids").write_text("a\nb\n")
    (tmp_path / "e.npy").write_bytes(b"this is not a numpy file at all" * 4)
    with pytest.raises(DataError):
        load_embeddings(tmp_path / "e.npy", tmp_path / "e.ids")
    np.save(tmp_path / "e.npy", np.zeros(2, np.float32))  # 1-d, though its length matches the ids
    with pytest.raises(DataError):
        load_embeddings(tmp_path / "e.npy", tmp_path / "e.ids")
