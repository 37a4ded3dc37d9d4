"""dprpipe.train: batch sampling, the masked in-batch loss, a tiny training run and exact resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)
from dense_fixtures import TOPICS, tiny_encoder, toy_corpus, toy_negatives, toy_queries

import dprpipe.distributed as dist_mod
import dprpipe.loss as loss_mod
import dprpipe.train as train_mod
from dprpipe.checkpoint import fingerprint
from dprpipe.records import Passage, Query
from dprpipe.model import DualEncoder, compute_loss, compute_similarity, passage_texts
from dprpipe.loss import batch_loss
from dprpipe.train import TrainConfig, TrainData, epoch_batches, train

# ---------------------------------------------------------------- sampling (no model)


def _sampling_data(n_passages=30, n_queries=12, mined=8):
    corpus = [Passage(f"p{i}", "", f"passage {i}") for i in range(n_passages)]
    queries = [Query(f"q{i}", f"question {i}", relevant={f"p{i}": 1, f"p{i + n_queries}": 2})
               for i in range(n_queries)]
    queries.append(Query("unjudged", "no positive", relevant={"p0": 0}))  # grade 0: never trained on
    negatives = {q.id: [f"p{(int(q.id[1:]) + 1 + k) % n_passages}" for k in range(mined)]
                 for q in queries if q.id != "unjudged"}
    for q in queries:  # mining never returns gold; keep the fixture honest about that
        negatives[q.id] = [d for d in negatives.get(q.id, []) if d not in q.relevant]
    return TrainData(corpus, queries, [], negatives)


def _pid(data):
    return {p.id: i for i, p in enumerate(data.corpus)}


def _flat(batches):
    return [(q.id, pos, tuple(negs)) for b in batches for q, pos, negs in b]


def test_epoch_batches_deterministic_and_cover_each_question_once():
    data = _sampling_data()
    cfg = TrainConfig(batch_size=5, hard_negatives=2, negative_pool=4, seed=3)
    a = epoch_batches(data, cfg, 0, _pid(data))
    assert _flat(a) == _flat(epoch_batches(data, cfg, 0, _pid(data)))
    assert [len(b) for b in a] == [5, 5, 2]
    assert sorted(q for q, _, _ in _flat(a)) == sorted(f"q{i}" for i in range(12))  # "unjudged" left out
    # a different epoch or seed reshuffles
    assert _flat(epoch_batches(data, cfg, 1, _pid(data))) != _flat(a)
    assert _flat(epoch_batches(data, replace(cfg, seed=4), 0, _pid(data))) != _flat(a)


def test_epoch_batches_sample_positives_and_hard_negatives_from_the_pool():
    data = _sampling_data()
    pid = _pid(data)
    cfg = TrainConfig(batch_size=4, hard_negatives=2, negative_pool=4, seed=1)
    by_id = {q.id: q for q in data.train}
    chosen_pos, chosen_neg = Counter(), Counter()
    for epoch in range(20):
        for qid, pos, negs in _flat(epoch_batches(data, cfg, epoch, pid)):
            gold = {pid[d] for d in by_id[qid].positives}
            pool = [pid[d] for d in data.negatives[qid][:cfg.negative_pool]]
            assert pos in gold
            assert len(negs) == 2 and len(set(negs)) == 2
            assert set(negs) <= set(pool)          # only the top `negative_pool` mined negatives
            assert not set(negs) & gold            # never a positive
            chosen_pos[qid, pos] += 1
            chosen_neg.update((qid, n) for n in negs)
    # both judged positives and the whole pool get used over epochs (sampling, not always the first)
    assert len(chosen_pos) == 2 * 12
    assert len(chosen_neg) == 4 * 12


def test_epoch_batches_fall_back_to_random_negatives():
    data = _sampling_data()
    data.negatives = {"q0": [], "q1": ["p20"], "q2": ["not-in-corpus"]}  # q3.. have no entry at all
    pid = _pid(data)
    cfg = TrainConfig(batch_size=4, hard_negatives=3, negative_pool=4, seed=5)
    by_id = {q.id: q for q in data.train}
    seen = set()
    for epoch in range(5):
        for qid, pos, negs in _flat(epoch_batches(data, cfg, epoch, pid)):
            gold = {pid[d] for d in by_id[qid].positives}
            assert len(negs) == 3 and len(set(negs)) == 3
            assert not set(negs) & gold
            assert all(0 <= n < len(data.corpus) for n in negs)
            if qid == "q1":
                assert pid["p20"] in negs  # the one mined negative is kept, the rest are random
            seen.update(negs)
    assert len(seen) > 10  # random, not a fixed few


def test_epoch_batches_fallback_on_a_tiny_corpus_stops():
    corpus = [Passage("a", "", "x"), Passage("b", "", "y")]
    data = TrainData(corpus, [Query("q", "x", relevant={"a": 1})], [], {})
    cfg = TrainConfig(batch_size=1, hard_negatives=3)
    (batch,) = epoch_batches(data, cfg, 0, _pid(data))
    assert batch[0][1:] == (0, [1])  # only one non-gold passage exists


def test_batch_loss_masks_other_copies_of_own_positives():
    model = tiny_encoder(pooling="mean", normalize=True)
    model.eval()  # no dropout: the two computations must see the same network
    corpus = toy_corpus()
    pid = _pid(TrainData(corpus, [], [], {}))
    q0 = Query("q0", "tell me about the apple", relevant={"p0": 1})
    q1 = Query("q1", "apple or river ?", relevant={"p0": 1, "p1": 1})
    q2 = Query("q2", "an apple question", relevant={"p0": 1})
    # q0 and q2 both bring p0; q2's hard negative p1 is a positive of q1
    batch = [(q0, 0, [5]), (q1, 1, [6]), (q2, 0, [1])]
    cols = [0, 1, 0, 5, 6, 1]
    expected_mask = torch.zeros(3, 6, dtype=torch.bool)
    expected_mask[0, 2] = True                      # q0: the other copy of p0
    expected_mask[1, [0, 2, 5]] = True              # q1: both copies of p0 and the extra p1
    expected_mask[2, 0] = True                      # q2: the other copy of p0
    with torch.no_grad():
        got = batch_loss(model, batch, corpus, pid, temperature=0.1)
        q = model.encode_query(model.tokenize_queries([q0.text, q1.text, q2.text]))
        p = model.encode_passage(model.tokenize_passages(passage_texts([corpus[c] for c in cols], True)))
        scores = compute_similarity(q, p)
        targets = torch.arange(3)
        want = compute_loss(scores, targets, expected_mask, 0.1)
        unmasked = compute_loss(scores, targets, None, 0.1)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(got.item() - unmasked.item()) > 1e-3  # the mask matters here


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="'mrr'"):
        TrainConfig(validation="mrr")
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="nproc"):
        TrainConfig(nproc=0)
    with pytest.raises(ValueError, match="unknown negatives 'bm25\\+ance'"):
        TrainConfig(negatives="bm25+ance")
    assert TrainConfig(negatives="dense+bm25").negative_sources() == ["dense", "bm25"]
    # validation's dev pool is BM25's; the refit validates nothing, so needs no BM25 negatives
    assert TrainConfig(negatives="dense", include_dev=False).negatives_read() == ["dense", "bm25"]
    assert TrainConfig(negatives="dense", include_dev=True).negatives_read() == ["dense"]
    assert TrainConfig(negatives="bm25+dense", include_dev=False).negatives_read() == ["bm25", "dense"]
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="attention_dropout"):
            TrainConfig(attention_dropout=bad)
    assert TrainConfig(attention_dropout=0.0).attention_dropout == 0.0


def test_validation_ranks_the_dev_pool_of_val_negatives_not_training_negatives():
    """Candidates trained on other negatives are validated on the same pool (BM25's)."""
    corpus = [Passage(f"p{i}", "", f"passage {i}") for i in range(6)]
    dev = [Query("d", "question", relevant={"p0": 1})]
    cfg = TrainConfig(val_negatives=2)
    model = tiny_encoder(seed=0, **ENCODER)
    pid = {p.id: i for i, p in enumerate(corpus)}
    bm25_pool = train_mod.validate(model, TrainData(corpus, [], dev, {"d": ["p1", "p2", "p3"]}), cfg, pid)
    same = train_mod.validate(model, TrainData(corpus, [], dev, {"d": ["p4"]}, val_negatives={"d": ["p1", "p2"]}),
                              cfg, pid)
    assert bm25_pool["pool"] == same["pool"] == 3
    assert same == bm25_pool
    assert train_mod.validate(model, TrainData(corpus, [], dev, {"d": ["p4"]}), cfg, pid)["pool"] == 2


# ---------------------------------------------------------------- training runs

# every layer trains: the toy encoder has two (the frozen ones have their own tests)
CFG = TrainConfig(epochs=3, batch_size=4, hard_negatives=1, negative_pool=3, lr=3e-3, warmup_ratio=0.0,
                  include_dev=False, temperature=0.1, checkpoint_every=3, seed=7, val_negatives=3, frozen_layers=0)
ENCODER = {"pooling": "mean", "normalize": True}
STEPS_PER_EPOCH = len(TOPICS) // CFG.batch_size  # 4


def _data():
    train_q, dev_q = toy_queries()
    return TrainData(toy_corpus(), train_q, dev_q, toy_negatives())


def _weights(folder):
    model, meta = DualEncoder.load(str(folder))
    return model.state_dict(), meta


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def _comparable(history):
    """History without the wall-clock fields."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "questions_per_s")} for h in history]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The reference: an uninterrupted run."""
    root = tmp_path_factory.mktemp("run_a")
    model = tiny_encoder(seed=0, **ENCODER)
    history = train(model, _data(), CFG, root / "out", root / "state", progress=False)
    return root, history, {k: v.clone() for k, v in model.state_dict().items()}


def test_training_lowers_the_loss_and_validates(run_a):
    root, history, _ = run_a
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[0]["loss"] is None  # epoch 0 is the untrained model
    losses = [h["loss"] for h in history[1:]]
    print("epoch losses", losses, "val ndcg@10", [h["val_ndcg@10"] for h in history])
    assert losses[-1] < 0.8 * losses[0]
    for h in history:
        assert 0.0 <= h["val_ndcg@10"] <= 1.0 and h["val_avg_rank"] >= 0
    assert history[-1]["val_ndcg@10"] > history[0]["val_ndcg@10"]

    # out_dir is the best epoch by validation, with its config and scores; the history marks it
    meta = json.loads((root / "out" / "dpr_config.json").read_text())
    scores = [h["val_ndcg@10"] for h in history]
    assert meta["epoch"] == scores.index(max(scores))
    assert [h["epoch"] for h in history if h["kept"]][-1] == meta["epoch"]
    assert meta["validation"]["ndcg@10"] == pytest.approx(max(scores))
    assert meta["train"]["lr"] == CFG.lr and meta["encoder"]["normalize"] is True
    assert (root / "out" / "model.safetensors").is_file()
    # the resumable state is scratch: a finished run leaves none behind
    assert list((root / "state").iterdir()) == []


def test_include_dev_trains_on_the_dev_questions_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    seen = []
    real = train_mod.epoch_batches

    def spy(data, cfg, epoch, pid_index):
        batches = real(data, cfg, epoch, pid_index)
        seen.append({q.id for b in batches for q, _, _ in b})
        return batches

    monkeypatch.setattr(train_mod, "epoch_batches", spy)
    written, real_dir = [], train_mod.atomic_dir

    def dir_spy(path):
        written.append(Path(path).name)
        return real_dir(path)

    monkeypatch.setattr(train_mod, "atomic_dir", dir_spy)
    data = _data()
    cfg = replace(CFG, epochs=2, include_dev=True)
    history = train(tiny_encoder(seed=0, **ENCODER), data, cfg, tmp_path / "out", tmp_path / "state", progress=False)
    dev_ids = {q.id for q in data.dev if q.positives}
    train_ids = {q.id for q in data.train if q.positives}
    assert dev_ids and seen == [train_ids | dev_ids] * 2
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(h["kept"] for h in history)
    assert not any(k.startswith("val_") for h in history for k in h)
    assert json.loads((tmp_path / "out" / "dpr_config.json").read_text())["epoch"] == 2
    assert written.count("best") == 1   # nothing to choose between: only the last epoch's model is written


def test_include_dev_resumed_in_its_last_epoch_writes_what_an_uninterrupted_run_does(tmp_path, monkeypatch):
    cfg = replace(CFG, epochs=2, include_dev=True)
    train(tiny_encoder(seed=0, **ENCODER), _data(), cfg, tmp_path / "ref", tmp_path / "ref_state", progress=False)
    data = _data()
    steps = -(-sum(1 for q in [*data.train, *data.dev] if q.positives) // cfg.batch_size)
    real_batch_loss, calls = loss_mod.batch_loss, []

    def dying_batch_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps + 2:   # the 2nd step of the last epoch
            raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "batch_loss", dying_batch_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_encoder(seed=0, **ENCODER), data, cfg, tmp_path / "out", tmp_path / "state", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and not (_only_state(tmp_path / "state") / "best").exists()
    train(tiny_encoder(seed=0, **ENCODER), _data(), cfg, tmp_path / "out", tmp_path / "state", progress=False)
    _assert_same_weights(_weights(tmp_path / "out")[0], _weights(tmp_path / "ref")[0])
    assert json.loads((tmp_path / "out" / "dpr_config.json").read_text())["epoch"] == 2


def test_include_dev_with_no_epochs_writes_the_starting_model(tmp_path):
    model = tiny_encoder(seed=0, **ENCODER)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, _data(), replace(CFG, epochs=0, include_dev=True), tmp_path / "out", tmp_path / "state",
          progress=False)
    assert json.loads((tmp_path / "out" / "dpr_config.json").read_text())["epoch"] == 0
    _assert_same_weights(_weights(tmp_path / "out")[0], start)


def _only_state(root: Path) -> Path:
    """The one resumable state under a state root (a folder named by the run's fingerprint)."""
    (folder,) = list(root.iterdir())
    return folder


def test_resume_after_interrupt_matches_uninterrupted_run(run_a, tmp_path, monkeypatch, capsys):
    root_a, history_a, final_a = run_a
    out, state = tmp_path / "out", tmp_path / "state"

    # run B: killed during the 4th step of epoch 1, after the checkpoint taken at step 3
    real_batch_loss, calls = loss_mod.batch_loss, []

    def dying_batch_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "batch_loss", dying_batch_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_encoder(seed=0, **ENCODER), _data(), CFG, out, state, progress=False)
    monkeypatch.undo()
    assert _only_state(state) == train_mod.state_folder(state, tiny_encoder(seed=0, **ENCODER), _data(), CFG)
    prog = json.loads((_only_state(state) / "last" / "progress.json").read_text())
    assert (prog["epoch"], prog["step_in_epoch"], prog["global_step"]) == (0, 3, 3)
    assert not out.exists()

    # resume into a model with other weights: everything must come from the saved state
    capsys.readouterr()
    model = tiny_encoder(seed=123, **ENCODER)
    history_b = train(model, _data(), CFG, out, state, progress=False)
    assert "resuming" in capsys.readouterr().out

    assert _comparable(history_b) == _comparable(history_a)
    _assert_same_weights(model.state_dict(), final_a)
    weights_a, meta_a = _weights(root_a / "out")
    weights_b, meta_b = _weights(out)
    _assert_same_weights(weights_b, weights_a)
    assert meta_b == meta_a
    assert list(state.iterdir()) == []


def _interrupted_state(tmp_path, monkeypatch) -> Path:
    """The state folder of a run killed during the 4th step of epoch 1 (saved after step 3)."""
    real_batch_loss, calls = loss_mod.batch_loss, []

    def dying_batch_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_batch_loss(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "batch_loss", dying_batch_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_encoder(seed=0, **ENCODER), _data(), CFG, tmp_path / "killed_out", tmp_path / "state",
              progress=False)
    monkeypatch.undo()
    return _only_state(tmp_path / "state")


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# each damage a disk, a full volume or a careless hand can do to the saved state
DAMAGES = {
    "truncated optimizer state": lambda s: (s / "last/trainer.pt").write_bytes((s / "last/trainer.pt").read_bytes()[:100]),
    "garbage progress": lambda s: (s / "last/progress.json").write_text("{not json"),
    "flipped weight byte": lambda s: _flip_byte(s / "last/model/model.safetensors", 5000),
    "missing best model": lambda s: shutil.rmtree(s / "best"),
    "missing checksums": lambda s: (s / "last/checksums.sha256").unlink(),
    "half-written folder": lambda s: shutil.rmtree(s / "last/model"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_state_starts_over_and_matches_a_fresh_run(run_a, tmp_path, monkeypatch, capsys, damage):
    # a damaged resumable state is announced and ignored: the run starts over, no traceback, and
    # ends exactly where an uninterrupted run ends (the damage leaves nothing in the weights or RNG)
    root_a, history_a, final_a = run_a
    state = _interrupted_state(tmp_path, monkeypatch)
    DAMAGES[damage](state)
    capsys.readouterr()
    model = tiny_encoder(seed=0, **ENCODER)
    history = train(model, _data(), CFG, tmp_path / "out", state.parent, progress=False)
    out = capsys.readouterr().out
    assert "ignoring" in out and "damaged" in out and "training starts over" in out, out
    assert "resuming" not in out
    assert _comparable(history) == _comparable(history_a)
    _assert_same_weights(model.state_dict(), final_a)
    _assert_same_weights(_weights(tmp_path / "out")[0], _weights(root_a / "out")[0])


def test_saved_state_is_checksummed(tmp_path, monkeypatch):
    state = _interrupted_state(tmp_path, monkeypatch)
    listed = {line.split("  ", 1)[1] for line in (state / "last/checksums.sha256").read_text().splitlines()}
    assert {"trainer.pt", "progress.json", "model/model.safetensors"} <= listed


def test_state_of_a_different_config_is_left_alone(run_a, tmp_path, monkeypatch, capsys):
    root_a, history_a, final_a = run_a
    other = replace(CFG, epochs=1, lr=1e-3)
    # fresh reference for the other config
    fresh = train(tiny_encoder(seed=0, **ENCODER), _data(), other, tmp_path / "fresh_out", tmp_path / "fresh_state",
                  progress=False)
    # the other config, run where CFG's interrupted state waits: it starts fresh beside it
    killed = _interrupted_state(tmp_path, monkeypatch)
    capsys.readouterr()
    history = train(tiny_encoder(seed=0, **ENCODER), _data(), other, tmp_path / "out", tmp_path / "state",
                    progress=False)
    assert "resuming" not in capsys.readouterr().out
    assert [h["epoch"] for h in history] == [0, 1]
    assert _comparable(history) == _comparable(fresh)
    _assert_same_weights(_weights(tmp_path / "out")[0], _weights(tmp_path / "fresh_out")[0])
    # and CFG's state is still there to resume from, to the uninterrupted run's weights
    assert list((tmp_path / "state").iterdir()) == [killed]
    model = tiny_encoder(seed=0, **ENCODER)
    train(model, _data(), CFG, tmp_path / "out_a", tmp_path / "state", progress=False)
    assert "resuming" in capsys.readouterr().out
    _assert_same_weights(model.state_dict(), final_a)


def test_resume_fingerprint_counts_the_world_size_not_the_nproc_setting():
    model, data = tiny_encoder(seed=0), TrainData(toy_corpus(), *toy_queries(), toy_negatives())
    one = fingerprint(CFG, model, data)
    # the setting alone changes nothing (a single process saved the state the same way before it existed)
    assert fingerprint(replace(CFG, nproc=4), model, data) == one
    # a state saved by 2 ranks (global batch 2 * batch_size) is another run
    assert fingerprint(CFG, model, data, world_size=2) != one
    assert fingerprint(replace(CFG, epochs=4), model, data) != one
    # a set attention-dropout rate is another run; None (the model's own) is the run it was before
    rates = {fingerprint(replace(CFG, attention_dropout=r), model, data) for r in (None, 0.0, 0.1)}
    assert len(rates) == 3


def test_resume_fingerprint_counts_the_attention_kernel_auto_resolves_to(monkeypatch):
    data = TrainData(toy_corpus(), *toy_queries(), toy_negatives())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto_cpu = fingerprint(CFG, tiny_encoder(seed=0), data)
    assert fingerprint(CFG, tiny_encoder(seed=0, attention="eager"), data) == auto_cpu
    assert fingerprint(CFG, tiny_encoder(seed=0, attention="sdpa"), data) != auto_cpu
    # the same setting on a machine with a GPU runs another kernel: its state is another run's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fingerprint(CFG, tiny_encoder(seed=0), data) != auto_cpu


# ---------------------------------------------------------------- gradient caching


def test_grad_cache_steps_cover_every_row_once_in_chunks():
    assert loss_mod.grad_cache_steps(5, 7, 3) == [(range(0, 3), None), (range(3, 5), None), (None, range(0, 3)),
                                                   (None, range(3, 6)), (None, range(6, 7))]
    for nq, np_, chunk in [(1, 1, 1), (4, 12, 4), (7, 21, 5), (3, 3, 100)]:
        steps = loss_mod.grad_cache_steps(nq, np_, chunk)
        assert [i for q, _ in steps if q for i in q] == list(range(nq))
        assert [i for _, p in steps if p for i in p] == list(range(np_))
        assert all(len(r) <= chunk for step in steps for r in step if r)
        assert all((q is None) != (p is None) for q, p in steps)   # one encoder per call: one chunk's memory
    with pytest.raises(ValueError):
        TrainConfig(grad_cache_chunk=-1)


def _cache_batch(corpus):
    """7 questions with 2 hard negatives each, plus an eighth that shares the first one's positive (masked)."""
    data = _data()
    pid = _pid(data)
    batch = epoch_batches(data, replace(CFG, batch_size=7, hard_negatives=2), 0, pid)[0]
    q0, pos0, _ = batch[0]
    twin = Query("twin", q0.text + " please", relevant=dict(q0.relevant))
    batch.append((twin, pos0, [(pos0 + 5) % len(corpus)]))
    return batch, pid


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _uncached_grads(model, batch, corpus, pid, cfg):
    model.zero_grad(set_to_none=True)
    with loss_mod.autocast(model.cfg, torch.device("cpu")):
        loss = batch_loss(model, batch, corpus, pid, cfg.temperature, cfg.passage_max_length)
    loss.backward()
    return _grads(model), loss.item()


def _cached_grads(model, batch, corpus, pid, cfg):
    model.zero_grad(set_to_none=True)
    loss = loss_mod.cached_batch_gradients(model, None, batch, corpus, pid, cfg)
    return _grads(model), loss


def _worst(a, b):
    """Largest difference over all tensors, relative to each tensor's largest entry.

    The floor, 2e-5, is for a tensor whose gradient is all rounding noise (the attention key bias:
    softmax ignores a shift), as in test_distributed.
    """
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 2e-5) for k in b)


def _max_abs(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in b)


@pytest.mark.parametrize("shared", [True, False])
def test_cached_step_equals_the_uncached_step_without_dropout(shared):
    corpus = toy_corpus()
    batch, pid = _cache_batch(corpus)   # 8 questions, 23 passages, one masked column
    model = tiny_encoder(seed=0, shared=shared, **ENCODER)
    model.eval()   # dropout off: caching changes nothing but float rounding
    want, want_loss = _uncached_grads(model, batch, corpus, pid, CFG)
    for chunk in (1, 3, 8, 100):   # 3 divides neither 8 nor 23
        got, loss = _cached_grads(model, batch, corpus, pid, replace(CFG, grad_cache_chunk=chunk))
        print(f"shared={shared} chunk {chunk}: max abs gradient difference {_max_abs(got, want):.1e}, "
              f"relative {_worst(got, want):.1e}")
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert _worst(got, want) < 1e-4, chunk
    # and the comparison can tell: half the batch's gradient is another one
    half, _ = _uncached_grads(model, batch[:4], corpus, pid, CFG)
    assert _worst(half, want) > 1e-2


def _chunked_reference(model, batch, corpus, pid, cfg):
    """The gradient caching must reproduce: the whole loss backpropagated through one graph, the texts
    encoded in `grad_cache_steps`'s chunks (so dropout draws the masks of those calls), each call and the
    loss under the model's autocast."""
    model.zero_grad(set_to_none=True)
    cols = loss_mod.columns(batch)
    q_texts = [q.text for q, _, _ in batch]
    p_texts = passage_texts([corpus[c] for c in cols], model.cfg.use_title)
    qs, ps = [], []
    cast = lambda: loss_mod.autocast(model.cfg, torch.device("cpu"))  # noqa: E731
    for q_rows, p_rows in loss_mod.grad_cache_steps(len(q_texts), len(p_texts), cfg.grad_cache_chunk):
        with cast():
            if q_rows:
                qs.append(model.encode_query(model.tokenize_queries(q_texts[q_rows.start:q_rows.stop])))
            if p_rows:
                ps.append(model.encode_passage(model.tokenize_passages(p_texts[p_rows.start:p_rows.stop])))
    with cast():
        loss = loss_mod.masked_loss(torch.cat(qs), torch.cat(ps), batch, cols, pid, cfg.temperature)
    loss.backward()
    return _grads(model)


@pytest.mark.parametrize("shared", [True, False])
def test_cached_step_with_dropout_replays_the_first_pass_masks(shared, monkeypatch):
    corpus = toy_corpus()
    batch, pid = _cache_batch(corpus)
    model = tiny_encoder(seed=0, shared=shared, **ENCODER)
    model.train()   # dropout on (0.1): the second pass must draw the first pass's masks
    for chunk in (3, 5):
        cfg = replace(CFG, grad_cache_chunk=chunk)
        torch.manual_seed(11)
        want = _chunked_reference(model, batch, corpus, pid, cfg)
        rng_want = torch.get_rng_state()
        torch.manual_seed(11)
        got, _ = _cached_grads(model, batch, corpus, pid, cfg)
        print(f"dropout, shared={shared} chunk {chunk}: max abs gradient difference {_max_abs(got, want):.1e}, "
              f"relative {_worst(got, want):.1e}")
        assert _worst(got, want) < 1e-4, chunk
        assert torch.equal(torch.get_rng_state(), rng_want)   # the step leaves the RNG where one pass would

    # one chunk holding the whole batch draws as the uncached step does: the same gradient, dropout and all
    torch.manual_seed(11)
    want, _ = _uncached_grads(model, batch, corpus, pid, CFG)
    torch.manual_seed(11)
    got, _ = _cached_grads(model, batch, corpus, pid, replace(CFG, grad_cache_chunk=100))
    assert _worst(got, want) < 1e-4

    # the test can tell: second passes that draw fresh masks give another gradient
    cfg = replace(CFG, grad_cache_chunk=3)
    torch.manual_seed(11)
    want = _chunked_reference(model, batch, corpus, pid, cfg)
    monkeypatch.setattr(dist_mod, "set_rng_state", lambda cpu, cuda: None)
    torch.manual_seed(11)
    fresh, _ = _cached_grads(model, batch, corpus, pid, cfg)
    assert _worst(fresh, want) > 1e-2


@pytest.mark.parametrize("shared", [True, False])
def test_cached_step_under_bf16_autocast(shared):
    corpus = toy_corpus()
    batch, pid = _cache_batch(corpus)
    model = tiny_encoder(seed=0, precision="bf16", shared=shared, **ENCODER)
    model.eval()
    cfg = replace(CFG, grad_cache_chunk=3)
    want = _chunked_reference(model, batch, corpus, pid, cfg)   # bf16 matmuls, the loss's included
    got, _ = _cached_grads(model, batch, corpus, pid, cfg)
    fp32 = tiny_encoder(seed=0, precision="fp32", shared=shared, **ENCODER)
    fp32.eval()
    in_fp32, _ = _cached_grads(fp32, batch, corpus, pid, cfg)
    print(f"bf16, shared={shared} chunk 3: relative gradient difference {_worst(got, want):.1e} "
          f"(the same step in fp32: {_worst(in_fp32, want):.1e})")
    assert _worst(got, want) < 1e-4
    assert _worst(in_fp32, want) > 1e-3   # the comparison tells bf16 from fp32
    if not shared:
        # one chunk is the uncached step's computation. (Not with a shared encoder: one autocast region
        # casts each shared weight to bf16 once and sums its two uses' gradients in bf16.)
        want, _ = _uncached_grads(model, batch, corpus, pid, CFG)
        got, _ = _cached_grads(model, batch, corpus, pid, replace(CFG, grad_cache_chunk=100))
        assert _worst(got, want) < 1e-5


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


CACHED = replace(CFG, grad_cache_chunk=3, grad_accumulation=2)   # 4 questions, 4 passages per micro-batch


def test_cached_training_run_equals_the_uncached_run(tmp_path):
    # dropout off, so both runs compute the same function; 2 micro-batches per step
    model_a = _no_dropout(tiny_encoder(seed=0, **ENCODER))
    hist_a = train(model_a, _data(), replace(CACHED, grad_cache_chunk=0), tmp_path / "a", tmp_path / "sa",
                   progress=False)
    model_b = _no_dropout(tiny_encoder(seed=0, **ENCODER))
    hist_b = train(model_b, _data(), CACHED, tmp_path / "b", tmp_path / "sb", progress=False)
    print("max weight difference, cached vs uncached run:",
          _max_abs(model_b.state_dict(), model_a.state_dict()))
    for name, a in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[name], a, rtol=0, atol=1e-5, msg=name)
    assert [h["loss"] for h in hist_b[1:]] == pytest.approx([h["loss"] for h in hist_a[1:]], rel=1e-5)
    assert hist_b[-1]["loss"] < 0.8 * hist_b[1]["loss"]   # it trains
    # and the comparison can tell: without the second micro-batch's gradient the weights differ
    model_c = _no_dropout(tiny_encoder(seed=0, **ENCODER))
    train(model_c, _data(), replace(CACHED, grad_accumulation=1), tmp_path / "c", tmp_path / "sc", progress=False)
    assert _max_abs(model_c.state_dict(), model_a.state_dict()) > 1e-3


def test_cached_run_resumes_after_interrupt_to_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    cfg = replace(CACHED, grad_accumulation=1)   # dropout on: resume must restore what the replays draw
    model_a = tiny_encoder(seed=0, **ENCODER)
    hist_a = train(model_a, _data(), cfg, tmp_path / "a", tmp_path / "sa", progress=False)

    real, calls = loss_mod.cached_batch_gradients, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:   # during step 4, after the checkpoint taken at step 3 (mid-epoch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "cached_batch_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_encoder(seed=0, **ENCODER), _data(), cfg, tmp_path / "b", tmp_path / "sb", progress=False)
    monkeypatch.undo()
    prog = json.loads((_only_state(tmp_path / "sb") / "last" / "progress.json").read_text())
    assert prog["global_step"] == 3
    capsys.readouterr()
    model_b = tiny_encoder(seed=123, **ENCODER)
    hist_b = train(model_b, _data(), cfg, tmp_path / "b", tmp_path / "sb", progress=False)
    assert "resuming" in capsys.readouterr().out
    assert _comparable(hist_b) == _comparable(hist_a)
    _assert_same_weights(model_b.state_dict(), model_a.state_dict())
    # a cached run is another run for resuming (its chunks draw other dropout masks); off, the key is left out
    model, data = tiny_encoder(seed=0), _data()
    assert fingerprint(cfg, model, data) != fingerprint(CFG, model, data)
    assert fingerprint(replace(cfg, grad_cache_chunk=4), model, data) != fingerprint(cfg, model, data)


def test_adamw_is_fused_on_cpu_and_steps_as_the_plain_one():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make([{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "weight_decay": 0.0}])
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return opt, params

    fused, got = run(lambda groups: train_mod.adamw(groups, lr=1e-2))
    assert fused.defaults["fused"] is True
    plain, want = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=False))
    assert not plain.defaults["fused"]
    for g, w, w0 in zip(got, want, weights):
        assert not torch.equal(w, w0)
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert train_mod.adamw((p for p in [torch.nn.Parameter(torch.ones(2))]), lr=0.1).defaults["fused"] is True


# ---------------------------------------------------------------- cheaper steps: detached negatives, frozen layers


def _detached_reference(model, batch, corpus, pid, cfg):
    """The loss with every passage encoded in one call and the hard negatives' rows cut from the graph."""
    cols = loss_mod.columns(batch)
    q = model.encode_query(model.tokenize_queries([qr.text for qr, _, _ in batch]))
    p = model.encode_passage(model.tokenize_passages(passage_texts([corpus[c] for c in cols], True)))
    p = torch.cat([p[:len(batch)], p[len(batch):].detach()])
    return loss_mod.masked_loss(q, p, batch, cols, pid, cfg.temperature)


@pytest.mark.parametrize("shared", [True, False])
def test_detached_negatives_keep_the_loss_and_drop_their_gradient(shared):
    corpus = toy_corpus()
    batch, pid = _cache_batch(corpus)   # 8 questions, 2 hard negatives each (one masked column)
    model = tiny_encoder(seed=0, shared=shared, **ENCODER)
    model.eval()
    plain, plain_loss = _uncached_grads(model, batch, corpus, pid, CFG)
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, corpus, pid, CFG.temperature, detach_negatives=True)
    loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    _detached_reference(model, batch, corpus, pid, CFG).backward()
    want = _grads(model)
    assert loss.item() == pytest.approx(plain_loss, rel=1e-5)   # the same scores
    assert _worst(got, want) < 1e-4
    assert _worst(got, plain) > 1e-2                             # the negatives' gradient is gone
    if not shared:   # the question encoder still learns from the negatives' scores
        query = [n for n in plain if n.startswith("query_model.")]
        assert max(float((got[n] - plain[n]).abs().max()) for n in query) < 1e-6


def test_detached_negatives_need_one_process_without_caching():
    TrainConfig(detach_negatives=True)
    for bad in ({"grad_cache_chunk": 4}, {"nproc": 2}):
        with pytest.raises(ValueError, match="detach_negatives"):
            TrainConfig(detach_negatives=True, **bad)
    with pytest.raises(ValueError, match="frozen_layers"):
        TrainConfig(frozen_layers=-1)


def test_freeze_bottom_stops_the_embeddings_and_the_first_layers():
    model = tiny_encoder(seed=0, shared=False, **ENCODER)
    enc = model.passage_model
    assert train_mod.freeze_bottom(enc, 0) == 0 and all(p.requires_grad for p in enc.parameters())
    n = train_mod.freeze_bottom(enc, 1)
    frozen = {name for name, p in enc.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in enc.named_parameters()
                      if name.startswith(("embeddings.", "encoder.layer.0."))}
    assert n == sum(p.numel() for name, p in enc.named_parameters() if name in frozen)
    assert all(p.requires_grad for p in model.query_model.parameters())
    with pytest.raises(ValueError, match="2 layers"):
        train_mod.freeze_bottom(tiny_encoder(seed=0, **ENCODER).passage_model, 3)
    with pytest.raises(ValueError, match="cannot find the layers"):
        train_mod.freeze_bottom(torch.nn.Linear(2, 2), 1)


def test_training_with_frozen_layers_leaves_them_as_they_were(tmp_path):
    model = tiny_encoder(seed=0, shared=False, **ENCODER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = replace(CFG, epochs=1, frozen_layers=1, detach_negatives=True)
    hist = train(model, _data(), cfg, tmp_path / "out", tmp_path / "state", progress=False)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    frozen = {k for k in after if k.startswith(("passage_model.embeddings.", "passage_model.encoder.layer.0."))}
    assert frozen and not changed & frozen
    assert any(k.startswith("passage_model.encoder.layer.1.") for k in changed)
    assert any(k.startswith("query_model.embeddings.") for k in changed)
    assert hist[-1]["loss"] is not None
    saved = DualEncoder.load(str(tmp_path / "out"))[0].state_dict()
    for k in frozen:
        torch.testing.assert_close(saved[k], before[k], rtol=0, atol=0, msg=k)


def test_training_refuses_to_freeze_every_layer_of_a_shared_encoder(tmp_path):
    cfg = replace(CFG, epochs=1, frozen_layers=2)
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train(tiny_encoder(seed=0, shared=True, **ENCODER), _data(), cfg, tmp_path / "out", tmp_path / "state",
              progress=False)
    # separate encoders: the question encoder still trains
    model = tiny_encoder(seed=0, shared=False, **ENCODER)
    before = {k: v.clone() for k, v in model.query_model.state_dict().items()}
    train(model, _data(), cfg, tmp_path / "out2", tmp_path / "state2", progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.query_model.state_dict().items())
    assert not any(p.requires_grad for name, p in model.passage_model.named_parameters()
                   if not name.startswith("pooler."))   # the pooler is never used
    # and so with gradient caching, whose replay has no passage graph to backpropagate
    model = tiny_encoder(seed=0, shared=False, **ENCODER)
    before = {k: v.clone() for k, v in model.query_model.state_dict().items()}
    train(model, _data(), replace(cfg, grad_cache_chunk=3), tmp_path / "out3", tmp_path / "state3", progress=False)
    assert any(not torch.equal(v, before[k]) for k, v in model.query_model.state_dict().items())
