"""The training flow: train: fine-tune the dual encoder on the mined negatives.

Scheduled weekly. As `dvc repro train` does, stale upstream stages run first.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_runner import TRAINING, flow_doc, run_stages


@flow(name="training")
@flow_doc("Run the training stages (train) with DVC in `workspace`.")
def training(workspace: str = ".", params: str | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    return run_stages("training", TRAINING, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    training()
