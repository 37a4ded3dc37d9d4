"""dprpipe.model: the DPR loss and pooling against hand computations, configs, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from dense_fixtures import single_thread  # noqa: F401 (autouse: one thread)
from dense_fixtures import tiny_encoder
from transformers import AutoModel

from dprpipe.encode import encode_texts
from dprpipe.model import (CONFIG_NAME, DualEncoder, EncoderConfig, attention_kernel, autocast, compute_loss,
                           compute_similarity, pool)


def reference_nll(scores, targets, mask=None, temperature=1.0):
    """Plain-python DPR loss: mean over rows of -log softmax(scores[i] / T)[targets[i]], masked columns dropped."""
    total = 0.0
    for i, row in enumerate(scores):
        kept = [s / temperature for j, s in enumerate(row) if mask is None or not mask[i][j]]
        log_z = math.log(sum(math.exp(s) for s in kept))
        total += log_z - row[targets[i]] / temperature
    return total / len(scores)


# 3 questions x 5 passages: columns 0..2 are the questions' positives, 3..4 hard negatives.
SCORES = [[2.0, 0.5, -1.0, 1.5, 0.0],
          [0.3, 1.2, 0.8, -0.4, 2.5],
          [1.0, 1.0, 0.2, 0.7, -2.0]]
TARGETS = [0, 1, 2]
# question 1's other positive is column 4 (a hard negative of someone else); question 2's is column 0
MASK = [[False] * 5,
        [False, False, False, False, True],
        [True, False, False, False, False]]


@pytest.mark.parametrize("temperature", [1.0, 0.05, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_compute_loss_matches_hand_written_nll(masked, temperature):
    mask = MASK if masked else None
    got = compute_loss(torch.tensor(SCORES), torch.tensor(TARGETS),
                       torch.tensor(mask) if masked else None, temperature)
    assert got.item() == pytest.approx(reference_nll(SCORES, TARGETS, mask, temperature), rel=1e-5)


def test_compute_loss_hand_worked_value():
    # one question, positive score 1 vs a negative scored 0: -log(e / (e + 1)) = log(1 + 1/e)
    got = compute_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert got.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # masking the only negative leaves a certain positive: loss 0
    got = compute_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([[False, True]]))
    assert got.item() == pytest.approx(0.0, abs=1e-7)


def test_mask_changes_the_loss():
    plain = compute_loss(torch.tensor(SCORES), torch.tensor(TARGETS))
    masked = compute_loss(torch.tensor(SCORES), torch.tensor(TARGETS), torch.tensor(MASK))
    assert masked.item() < plain.item()  # removing competitors can only lower the NLL


def test_compute_loss_on_random_scores_against_numpy():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 14)).astype(np.float32)
    targets = rng.permutation(6)
    mask = rng.random((6, 14)) < 0.2
    mask[np.arange(6), targets] = False
    got = compute_loss(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(mask), 0.3)
    logits = np.where(mask, -np.inf, scores.astype(np.float64) / 0.3)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert got.item() == pytest.approx(-log_softmax[np.arange(6), targets].mean(), rel=1e-5)


def test_compute_similarity_is_inner_product():
    q = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    p = torch.tensor([[3.0, 1.0], [1.0, 1.0], [-2.0, 0.5]])
    assert compute_similarity(q, p).tolist() == [[5.0, 3.0, -1.0], [-1.0, -1.0, -0.5]]


class Bf16Output(torch.nn.Module):
    """An encoder whose last hidden states come out in bf16 (a tiny BERT's final LayerNorm runs in
    float32 under CPU autocast, other encoders' last op does not)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    @property
    def config(self):
        return self.bert.config

    def forward(self, **batch):
        out = self.bert(**batch)
        out.last_hidden_state = out.last_hidden_state.to(torch.bfloat16)
        return out


def _fp64_pool(hidden, mask, pooling):
    h = hidden.double()
    if pooling == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1).double()
    return (h * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pool_runs_in_fp32_under_autocast(pooling):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 32, generator=g).to(torch.bfloat16)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = mask[2, 2:] = mask[3, 7:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool(hidden, mask, pooling)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), _fp64_pool(hidden, mask, pooling), rtol=0, atol=1e-6)


def test_similarity_and_loss_run_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 32, generator=g, requires_grad=True)
    p = torch.randn(18, 32, generator=g, requires_grad=True)
    targets = torch.arange(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = compute_similarity(q, p)
        loss = compute_loss(scores, targets, temperature=0.05)
    assert scores.dtype == torch.float32 and loss.dtype == torch.float32
    want = q.detach().double() @ p.detach().double().T
    assert torch.allclose(scores.detach().double(), want, rtol=0, atol=1e-5)  # bf16 misses by ~0.05
    assert loss.item() == pytest.approx(reference_nll(want.tolist(), targets.tolist(), None, 0.05), rel=1e-5)
    loss.backward()  # the gradient still reaches the vectors, in their own dtype
    assert q.grad.dtype == p.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encode_pools_and_normalises_bf16_states_in_fp32(pooling):
    model = tiny_encoder(pooling=pooling, normalize=True, precision="bf16")
    model.query_model = model.passage_model = Bf16Output(model.query_model).eval()
    batch = model.tokenize_queries(TEXTS)
    with autocast(model.cfg, torch.device("cpu")):
        hidden = model.query_model(**batch).last_hidden_state
        got = model.encode_query(batch)
    assert hidden.dtype == torch.bfloat16 and got.dtype == torch.float32
    want = torch.nn.functional.normalize(_fp64_pool(hidden, batch["attention_mask"], pooling), dim=-1)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-6)


HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],     # third token is padding
                       [[-1.0, 0.0], [5.0, 6.0], [7.0, 8.0]]])
ATTN = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("pooling, expected", [
    ("cls", [[1.0, 2.0], [-1.0, 0.0]]),
    ("mean", [[2.0, 3.0], [11 / 3, 14 / 3]]),  # padding excluded: (1+3)/2, (2+4)/2
])
def test_pool_by_hand(pooling, expected):
    got = pool(HIDDEN, ATTN, pooling)
    assert torch.allclose(got, torch.tensor(expected))


def test_unknown_pooling_raises_naming_it():
    with pytest.raises(ValueError, match="'max'"):
        pool(HIDDEN, ATTN, "max")
    with pytest.raises(ValueError, match="'max'"):
        EncoderConfig(pooling="max")


@pytest.mark.parametrize("bad", [{"pooling": "CLS"}, {"precision": "fp16"}, {"query_max_length": 0},
                                 {"passage_max_length": -1}, {"attention": "flash"}])
def test_encoder_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        EncoderConfig(**bad)


def test_encoder_config_rejects_unknown_keys():
    with pytest.raises(TypeError):
        EncoderConfig(polling="mean")


TEXTS = ["what causes scurvy ?", "vitamin c deficiency leads to scurvy in sailors on long voyages", "x"]


def _embed(model):
    return encode_texts(model, TEXTS, "query"), encode_texts(model, TEXTS, "passage")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_normalize_gives_unit_vectors(pooling):
    model = tiny_encoder(pooling=pooling, normalize=True)
    q, p = _embed(model)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    raw = tiny_encoder(pooling=pooling, normalize=False)
    q_raw, _ = _embed(raw)
    assert np.allclose(q, q_raw / np.linalg.norm(q_raw, axis=1, keepdims=True), atol=1e-5)


def test_shared_checkpoint_round_trip(tmp_path):
    model = tiny_encoder(pooling="cls", normalize=True)
    assert model.query_model is model.passage_model
    model.save(tmp_path, {"epoch": 3})

    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["epoch"] == 3 and meta["encoder"]["pooling"] == "cls"

    loaded, meta = DualEncoder.load(str(tmp_path))
    assert meta["epoch"] == 3
    assert loaded.cfg == model.cfg  # the checkpoint's own config wins
    assert loaded.query_model is loaded.passage_model
    for a, b in zip(_embed(model), _embed(loaded)):
        assert np.array_equal(a, b)

    # the folder is a plain Hugging Face model
    hf = AutoModel.from_pretrained(tmp_path)
    state = model.query_model.state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_load_ignores_a_passed_config_for_a_checkpoint(tmp_path):
    tiny_encoder(pooling="cls").save(tmp_path)
    loaded, _ = DualEncoder.load(str(tmp_path), EncoderConfig(pooling="mean"))
    assert loaded.cfg.pooling == "cls"


def test_separate_encoders_checkpoint_round_trip(tmp_path):
    model = tiny_encoder(shared=False)
    assert model.query_model is not model.passage_model
    model.save(tmp_path)
    for sub in ("query_encoder", "passage_encoder"):
        assert (tmp_path / sub / "model.safetensors").is_file()
        assert not list((tmp_path / sub).glob("*.bin"))

    loaded, _ = DualEncoder.load(str(tmp_path))
    assert not loaded.cfg.shared and loaded.query_model is not loaded.passage_model
    q, p = _embed(model)
    q2, p2 = _embed(loaded)
    assert np.array_equal(q, q2) and np.array_equal(p, p2)
    assert not np.allclose(q, p)  # the two towers really differ, so a swap would show

    for sub, original in (("query_encoder", model.query_model), ("passage_encoder", model.passage_model)):
        hf = AutoModel.from_pretrained(tmp_path / sub)
        state = original.state_dict()
        for name, tensor in hf.state_dict().items():
            assert torch.equal(tensor, state[name]), (sub, name)


def _base_folder(tmp_path, attention_dropout=0.5):
    """A plain Hugging Face folder: a tiny BERT whose only dropout is on attention weights."""
    from dense_fixtures import tiny_bert, tokenizer

    bert = tiny_bert(0)
    bert.config.attention_probs_dropout_prob = attention_dropout
    bert.config.hidden_dropout_prob = 0.0
    bert.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


def test_attention_auto_is_eager_without_a_gpu_and_the_models_own_with_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_kernel(EncoderConfig()) == "eager"
    assert attention_kernel(EncoderConfig(attention="sdpa")) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_kernel(EncoderConfig()) is None   # the model's own choice (sdpa where it has one)
    assert attention_kernel(EncoderConfig(attention="eager")) == "eager"


def _kernels(model):
    return {m.config._attn_implementation for m in (model.query_model, model.passage_model)}


@pytest.mark.parametrize("shared", [True, False])
def test_load_uses_the_attention_setting_and_both_kernels_agree(tmp_path, shared):
    base = _base_folder(tmp_path / "base", attention_dropout=0.0)
    texts = ["the apple is here", "a story of the river and more river facts", "river"]
    grads, vectors, models = {}, {}, {}
    for kernel in ("eager", "sdpa"):
        model, _ = DualEncoder.load(base, EncoderConfig(precision="fp32", shared=shared, attention=kernel))
        assert _kernels(model) == {kernel}
        models[kernel] = model
        model.train()
        v = model.encode_passage(model.tokenize_passages(texts))   # padded: the mask matters
        (v @ torch.arange(v.shape[1], dtype=v.dtype)).sum().backward()
        vectors[kernel] = v.detach().numpy()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.passage_model.parameters() if p.grad is not None])
    # the same function: outputs and gradients equal up to float rounding
    assert np.allclose(vectors["eager"], vectors["sdpa"], atol=1e-5)
    assert torch.allclose(grads["eager"], grads["sdpa"], atol=1e-4, rtol=1e-4)

    # a checkpoint's saved setting wins over the machine's default
    other = {"eager": "sdpa", "sdpa": "eager"}[attention_kernel(EncoderConfig()) or "sdpa"]
    models[other].save(tmp_path / "ckpt")
    again, _ = DualEncoder.load(str(tmp_path / "ckpt"))
    assert again.cfg.attention == other and _kernels(again) == {other}


def _train_mode_vectors(model, seed):
    model.train()
    torch.manual_seed(seed)
    batch = model.tokenize_passages(["the apple is here", "a story of the river and more river facts"])
    with torch.no_grad():
        return model.encode_passage(batch).numpy()


@pytest.mark.parametrize("shared", [True, False])
def test_attention_dropout_override(tmp_path, shared):
    cfg = EncoderConfig(precision="fp32", shared=shared)
    base = _base_folder(tmp_path / "base")
    kept, _ = DualEncoder.load(base, cfg)
    assert kept.passage_model.config.attention_probs_dropout_prob == 0.5
    # the model's own rate drops attention weights in training: two seeds, two outputs
    assert not np.allclose(_train_mode_vectors(kept, 1), _train_mode_vectors(kept, 2))

    off, _ = DualEncoder.load(base, cfg, attention_dropout=0.0)
    for m in (off.query_model, off.passage_model):
        assert m.config.attention_probs_dropout_prob == 0.0
    # no dropout left: training mode computes what evaluation mode does, whatever the seed
    train_v = _train_mode_vectors(off, 1)
    off.eval()
    with torch.no_grad():
        eval_v = off.encode_passage(off.tokenize_passages(["the apple is here",
                                                           "a story of the river and more river facts"])).numpy()
    assert np.allclose(train_v, eval_v, atol=1e-6)
    assert np.allclose(train_v, _train_mode_vectors(off, 2), atol=1e-6)

    # a checkpoint keeps the rate it was trained with, and a checkpoint can be overridden too
    off.save(tmp_path / "ckpt")
    again, _ = DualEncoder.load(str(tmp_path / "ckpt"))
    assert again.passage_model.config.attention_probs_dropout_prob == 0.0
    back, _ = DualEncoder.load(str(tmp_path / "ckpt"), attention_dropout=0.25)
    for m in (back.query_model, back.passage_model):
        assert m.config.attention_probs_dropout_prob == 0.25
    assert not np.allclose(_train_mode_vectors(back, 1), _train_mode_vectors(back, 2))


def test_attention_dropout_override_names_the_keys_a_config_lacks(tmp_path):
    from transformers import T5Config

    from dprpipe.io import DataError
    from dprpipe.model import attention_dropout_override

    assert attention_dropout_override(str(tmp_path), None) == {}  # None: nothing read, nothing changed
    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="attention_probs_dropout_prob, attention_dropout"):
        attention_dropout_override(str(tmp_path), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        attention_dropout_override(str(tmp_path), 1.0)
    # a bad rate is the caller's error, raised as such before any model is read
    with pytest.raises(ValueError, match=r"\[0, 1\)") as raised:
        DualEncoder.load(str(tmp_path / "nowhere"), EncoderConfig(), attention_dropout=-0.5)
    assert not isinstance(raised.value, DataError)


def _numpy_mask(words: np.ndarray, n: int, p: float) -> tuple[np.ndarray, float]:
    """The reference: 16-bit little-endian lanes of the 64-bit words, kept where lane >= drop - 2^15."""
    drop = round(p * 65536)
    lanes = words.astype("<i8").view("<i2")[:n]
    return lanes >= drop - 32768, 65536 / (65536 - drop)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.013])
def test_dropout_mask_reads_four_16_bit_lanes_of_each_word(p):
    from dprpipe.model import dropout_mask

    shape, n = (3, 7, 5), 105
    gen = torch.Generator().manual_seed(7)
    keep, scale = dropout_mask(shape, p, gen)
    assert keep.dtype == torch.bool and tuple(keep.shape) == shape
    # the same 27 words (105 lanes, rounded up to whole words), read by NumPy
    words = torch.empty(27, dtype=torch.int64).random_(-2**63, None, generator=torch.Generator().manual_seed(7))
    want, want_scale = _numpy_mask(words.numpy(), n, p)
    assert np.array_equal(keep.numpy().ravel(), want)
    assert scale == want_scale == pytest.approx(1 / (1 - p), rel=1e-4)


def test_dropout_mask_keeps_1_minus_p_in_every_lane():
    # 4M draws: the standard error of a rate is 3e-4. Each of a word's four lanes is uniform, the top
    # one included (a generator giving 63-bit words would keep every element of that lane).
    from dprpipe.model import dropout_mask

    keep, scale = dropout_mask((1 << 20, 4), 0.1, torch.Generator().manual_seed(0))
    rates = keep.float().mean(0).numpy()
    assert np.allclose(rates, 1 - 6554 / 65536, atol=2e-3), rates
    assert keep.float().mean().item() * scale == pytest.approx(1.0, abs=1e-3)   # the expectation is kept


def test_fast_dropout_forward_and_backward_by_hand():
    from dprpipe.model import FastDropout, dropout_mask

    x = torch.randn(4, 6, 8, requires_grad=True)
    layer = FastDropout(0.3)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    keep, scale = dropout_mask(x.shape, 0.3)
    assert not keep.all()
    assert torch.equal(y, torch.where(keep, x, 0) * scale)
    y.sum().backward()
    assert torch.equal(x.grad, keep.float() * scale)
    layer.eval()
    assert torch.equal(layer(x), x)   # evaluation: the identity, as nn.Dropout
    assert torch.equal(FastDropout(0.0).train()(x), x)


@pytest.mark.parametrize("shared", [True, False])
def test_use_fast_dropout_swaps_every_dropout_module_keeping_rates(shared):
    from dprpipe.model import FastDropout, use_fast_dropout

    model = tiny_encoder(shared=shared)
    before = [(name, m.p) for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert before and any(p > 0 for _, p in before)
    model.eval()
    texts = ["the apple is here", "a story of the river"]
    with torch.no_grad():
        eval_before = model.encode_passage(model.tokenize_passages(texts))
    assert use_fast_dropout(model) == len(before)
    after = [(name, m.p) for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert after == before   # same modules, same rates (attention passes its `p` to the kernel)
    assert all(type(m) is FastDropout for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout))
    assert use_fast_dropout(model) == 0
    with torch.no_grad():
        assert torch.equal(model.encode_passage(model.tokenize_passages(texts)), eval_before)
        model.train()
        torch.manual_seed(1)
        one = model.encode_passage(model.tokenize_passages(texts))
        torch.manual_seed(1)
        same = model.encode_passage(model.tokenize_passages(texts))
        torch.manual_seed(2)
        other = model.encode_passage(model.tokenize_passages(texts))
    assert torch.equal(one, same) and not torch.allclose(one, other)
