"""The pipeline flow: mining, training, encoding and evaluation, in order, as subflows.

It takes the workspace lock once for the whole run (the subflows re-enter it), works out the
overrides once (so every subflow applies the same ones), and publishes `pipeline-metrics`
with every stage's timing and the retrieval metrics against HEAD. With `promote` (the scheduled
deployment's setting, flows/schedules.yaml), the `release` flow (flows/release.py) then gates
the run against the promoted release and promotes and pushes it, or fails the run.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from flows.stage_runner import (build_overrides, flow_doc, publish, read_metrics, resolve_workspace, skipped, summary,
                                workspace_lock)
from flows.encoding import encoding
from flows.evaluation import evaluation
from flows.mining import mining
from flows.release import release
from flows.training import training


@flow(name="pipeline")
@flow_doc("Run the whole DVC pipeline through the four stage flows; DVC skips what is up to date.\n\n"
          "With `promote`, the run then goes through the quality gate of the `release` flow into a "
          "release under `promoted_root` (relative to the workspace), or fails.")
def pipeline(workspace: str = ".", params: str | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, lock_timeout: float = 3600.0, promote: bool = False,
             promoted_root: str = "promoted"):
    ws = resolve_workspace(workspace)
    sets = build_overrides(ws, params, dataset, overrides)
    with workspace_lock(ws, lock_timeout) as busy:
        if busy:
            return skipped(busy)
        results = [sub(workspace=str(ws), overrides=sets, lock_timeout=lock_timeout)
                   for sub in (mining, training, encoding, evaluation)]
        publish("pipeline", ws, results, read_metrics(ws), sets)
        if promote:
            state = release(workspace=str(ws), promoted_root=promoted_root, lock_timeout=lock_timeout,
                            return_state=True)
            if not state.is_completed():   # the gate's refusal (or a failed push) is the run's outcome
                return Failed(message=f"release: {state.message}")
    return summary(results)


if __name__ == "__main__":
    pipeline()
