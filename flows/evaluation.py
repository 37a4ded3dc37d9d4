"""The evaluation flow: evaluate: score the BM25, zero-shot, fine-tuned and hybrid runs.

Its artifact `evaluation-metrics` holds the retrieval metrics and their change against HEAD.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_runner import EVALUATION, flow_doc, run_stages


@flow(name="evaluation")
@flow_doc("Run the evaluation stages (evaluate) with DVC in `workspace`.")
def evaluation(workspace: str = ".", params: str | None = None, dataset: str | None = None,
               overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    return run_stages("evaluation", EVALUATION, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    evaluation()
