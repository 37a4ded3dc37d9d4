"""The encoding flow: embed the corpus (base and fine-tuned encoder) and build the FAISS indexes.

As `dvc repro` does, stale upstream stages (e.g. train) run first.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_runner import ENCODING, flow_doc, run_stages


@flow(name="encoding")
@flow_doc("Run the encoding stages (encode_zeroshot, encode, index_zeroshot, index) with DVC in `workspace`.")
def encoding(workspace: str = ".", params: str | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, lock_timeout: float = 3600.0):
    return run_stages("encoding", ENCODING, workspace, params, dataset, overrides, lock_timeout)


if __name__ == "__main__":
    encoding()
