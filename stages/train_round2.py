"""train_round2: a second training round on negatives mined with round one's model (ANCE).

Reads the `train` params and applies `train_round2` on top of them (negatives, epochs, learning
rate), so a change to `train_round2` reruns round two and what follows, never round one.
`train_round2.init` picks the starting weights: `round1` continues from --round1 (round one's
checkpoint, whose own encoder config then wins), `base` starts over from the `model` params'
base model. --negatives names the sources as in train, `dense=` being the round-one miner's
output (mine_round2). The training itself is train's (stages/train.py).

Outputs: as train's: the best checkpoint (--out), its training record (--metrics) and the
per-epoch validation history (--plot).
"""

from dataclasses import replace
from pathlib import Path

from stage_cli import load_params, parser, run
from train import run_training

from dprpipe.model import EncoderConfig
from dprpipe.rounds import RoundTwoConfig
from dprpipe.train import TrainConfig


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--round1", required=True, help="round one's checkpoint folder")
    for name in ("corpus", "train", "dev", "out", "state", "metrics", "plot"):
        p.add_argument(f"--{name}", required=True, help="as train's")
    p.add_argument("--negatives", action="append", required=True, metavar="SOURCE=FOLDER", help="as train's")
    args = p.parse_args()
    enc = load_params(args.params, "model", EncoderConfig)
    round2 = load_params(args.params, "train_round2", RoundTwoConfig)
    cfg = round2.apply(load_params(args.params, "train", TrainConfig))
    if round2.init == "round1":
        enc = replace(enc, model=args.round1)
    # the resumable state's fingerprint knows the config and data, not the starting weights
    args.state = str(Path(args.state) / round2.init)
    run_training(args, enc, cfg, Path(__file__))


if __name__ == "__main__":
    run(main)
