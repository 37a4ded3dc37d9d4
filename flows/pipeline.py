"""The pipeline flow: mining, training, encoding and evaluation, in order, as subflows.

It takes the workspace lock once for the whole run (the subflows re-enter it), works out the
overrides once (so every subflow applies the same ones), and publishes `pipeline-metrics`
with every stage's timing and the retrieval metrics against HEAD.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_runner import (build_overrides, flow_doc, publish, read_metrics, resolve_workspace, skipped, summary,
                                workspace_lock)
from flows.encoding import encoding
from flows.evaluation import evaluation
from flows.mining import mining
from flows.training import training


@flow(name="pipeline")
@flow_doc("Run the whole DVC pipeline through the four stage flows; DVC skips what is up to date.")
def pipeline(workspace: str = ".", params: str | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    ws = resolve_workspace(workspace)
    sets = build_overrides(ws, params, dataset, overrides)
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        results = [sub(workspace=str(ws), overrides=sets, lock_timeout=lock_timeout)
                   for sub in (mining, training, encoding, evaluation)]
        publish("pipeline", ws, results, read_metrics(ws), sets)
    return summary(results)


if __name__ == "__main__":
    pipeline()
