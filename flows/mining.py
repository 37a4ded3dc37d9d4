"""The mining flow: prepare + mine: normalise the dataset, BM25 hard negatives and the BM25 run.

Scheduled nightly: DVC reruns them only when the corpus or their params changed.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_runner import MINING, flow_doc, run_stages


@flow(name="mining")
@flow_doc("Run the mining stages (prepare, mine) with DVC in `workspace`.")
def mining(workspace: str = ".", params: str | None = None, dataset: str | None = None,
           overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    return run_stages("mining", MINING, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    mining()
