"""The encoding flow: embed the corpus (base and fine-tuned encoder) and build the FAISS indexes.

As `dvc repro` does, stale upstream stages (e.g. train) run first.
"""

from __future__ import annotations

from prefect import flow

from flows.common import ENCODING, run_stages


@flow(name="encoding")
def encoding(workspace: str = ".", params: str | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    """Run the encoding stages (encode_zeroshot, encode, index_zeroshot, index) with DVC in `workspace`.

    Args:
        workspace: the DVC project folder (dvc.yaml, params.yaml); default the current directory.
        params: a YAML file in params.yaml's layout; its values that differ from the workspace's
            params.yaml are applied as `-S` overrides.
        dataset: a dataset folder for `prepare.dataset` (applied as an override).
        overrides: `key=value` overrides, as `dvc exp run -S key=value`.
        lock_timeout: seconds to wait for another run on this workspace before skipping
            (0: skip at once; negative: wait forever).
    """
    return run_stages("encoding", ENCODING, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    encoding()
