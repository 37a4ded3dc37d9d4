"""The mining flow: prepare + mine: normalise the dataset, BM25 hard negatives and the BM25 run.

Scheduled nightly: DVC reruns them only when the corpus or their params changed.
"""

from __future__ import annotations

from prefect import flow

from flows.common import MINING, run_stages


@flow(name="mining")
def mining(workspace: str = ".", params: str | None = None, dataset: str | None = None,
           overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    """Run the mining stages (prepare, mine) with DVC in `workspace`.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml); default the current directory.
        params: a YAML file in params.yaml's layout; its values that differ from the workspace's
            params.yaml are applied as `-S` overrides.
        dataset: a dataset folder for `prepare.dataset` (applied as an override).
        overrides: `key=value` overrides, as `dvc exp run -S key=value`.
        lock_timeout: seconds to wait for another run on this workspace before skipping
            (0: skip at once; negative: wait forever).
    """
    return run_stages("mining", MINING, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    mining()
