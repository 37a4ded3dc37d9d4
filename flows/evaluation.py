"""The evaluation flow: evaluate: score the BM25, zero-shot, fine-tuned and hybrid runs.

Its artifact `evaluation-metrics` holds the retrieval metrics and their change against HEAD.
"""

from __future__ import annotations

from prefect import flow

from flows.common import EVALUATION, run_stages


@flow(name="evaluation")
def evaluation(workspace: str = ".", params: str | None = None, dataset: str | None = None,
               overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    """Run the evaluation stages (evaluate) with DVC in `workspace`.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml); default the current directory.
        params: a YAML file in params.yaml's layout; its values that differ from the workspace's
            params.yaml are applied as `-S` overrides.
        dataset: a dataset folder for `prepare.dataset` (applied as an override).
        overrides: `key=value` overrides, as `dvc exp run -S key=value`.
        lock_timeout: seconds to wait for another run on this workspace before skipping
            (0: skip at once; negative: wait forever).
    """
    return run_stages("evaluation", EVALUATION, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    evaluation()
