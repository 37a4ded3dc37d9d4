"""A second training round (ANCE, Xiong et al. 2021): what it changes in round one's training config.

Round two trains on negatives mined with round one's own model (`dense_mine` over round one's
embeddings), from round one's checkpoint or from the base model. Its config holds only what
differs from round one's `TrainConfig`, so everything else stays in one place.

Inputs: round one's `TrainConfig`. Output: round two's `TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .train import TrainConfig


@dataclass(frozen=True)
class RoundTwoConfig:
    init: str = "round1"       # round1: continue from round one's checkpoint | base: start from the base model
    negatives: str = "dense"   # dense = mined with round one's model; or bm25+dense (see TrainConfig.negatives)
    hard_negatives: int = 1
    epochs: int = 2
    lr: float = 2.0e-5

    def __post_init__(self):
        if self.init not in ("round1", "base"):
            raise ValueError(f"unknown init {self.init!r}; expected 'round1' or 'base'")

    def apply(self, cfg: TrainConfig) -> TrainConfig:
        """Round one's config with this round's changes (checked as any TrainConfig).

        >>> cfg = RoundTwoConfig(epochs=1).apply(TrainConfig(lr=5e-5, batch_size=64))
        >>> cfg.epochs, cfg.lr, cfg.negatives, cfg.batch_size
        (1, 2e-05, 'dense', 64)
        """
        return replace(cfg, negatives=self.negatives, hard_negatives=self.hard_negatives, epochs=self.epochs,
                       lr=self.lr)
