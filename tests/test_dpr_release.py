"""End to end on DPR's release as it ships: `dvc repro` in a temporary copy of the project, on a
folder of gzipped biencoder files, a gzipped psgs_w100.tsv and a QA CSV test split, which the
evaluate stage scores by top-k answer accuracy (the project copy, the tiny encoder and the cheap
dense settings are those of tests/test_pipeline.py)."""

import json

import pytest
from dataset_fixtures import write_dpr_release
from test_pipeline import _run, copy_project, edit_params, repro, write_tiny_encoder

N_PASSAGES, TRAIN, DEV, TEST = 40, range(0, 24), range(24, 30), range(30, 40)


@pytest.mark.slow
def test_dvc_repro_on_a_dpr_release_with_a_qa_csv_test_split(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_project(repo)
    files = write_dpr_release(repo / "datasets" / "nq", n_passages=N_PASSAGES, train=TRAIN, dev=DEV, test=TEST)
    assert sorted(p.name for p in files.values()) == ["biencoder-toy-dev.json.gz", "biencoder-toy-train.json.gz",
                                                      "psgs_w100.tsv.gz", "toy-test.csv"]
    write_tiny_encoder(repo / "tiny-encoder")
    # prepare.files stays {}: every file is found by its release name
    edit_params(repo, {"prepare.dataset": "datasets/nq", "prepare.files": {}, "prepare.max_words": 0,
                       "model.model": "tiny-encoder", "train.epochs": 1, "train.batch_size": 8,
                       "train.checkpoint_every": 2, "train.frozen_layers": 0,   # a one-layer toy encoder
                       "train.passage_max_length": 48, "model.passage_max_length": 48,
                       "model.query_max_length": 24, "encode.batch_size": 64, "mine.run_depth": 100})
    for args in (["git", "init", "-q"], ["dvc", "init", "-q", "--force"]):
        r = _run(args, repo)
        assert r.returncode == 0, r.stderr
    ran, out = repro(repo)
    assert {"prepare", "mine", "train", "encode", "index", "evaluate"} <= ran, out[-4000:]

    data = json.loads((repo / "metrics" / "data.json").read_text())
    assert (data["documents"], data["passages"]) == (N_PASSAGES, N_PASSAGES)
    assert (data["train_queries"], data["dev_queries"], data["test_queries"]) == (len(TRAIN), len(DEV), len(TEST))
    assert data["test_judgements"] == 0 and data["checks"]["unjudged_queries"] == 0
    prepared = repo / "data" / "prepared"
    test = [json.loads(line) for line in (prepared / "test.jsonl").read_text().splitlines()]
    assert test[0] == {"id": "test-0", "text": "what is the kw30a kw30b called", "answers": ["ans30", "ANS30"],
                       "relevant": {}}
    # DPR's hard negatives, next to the prepared splits in the mine stage's format
    negatives = [json.loads(line) for line in (prepared / "negatives" / "train.jsonl").read_text().splitlines()]
    assert [n["id"] for n in negatives] == [f"train-{i}" for i in TRAIN]
    assert negatives[0]["negatives"] == [["2", 11.5], ["3", 10.5]]
    assert sorted(p.name for p in (prepared / "negatives").iterdir()) == ["dev.jsonl", "train.jsonl"]

    # the QA test split is scored by top-k answer accuracy, over every question, for every system
    metrics = json.loads((repo / "metrics" / "retrieval.json").read_text())
    ks = [1, 5, 10, 20, 100]
    assert set(metrics) == {"bm25", "zeroshot", "dpr", "hybrid"}
    for system, m in metrics.items():
        assert m["queries"] == len(TEST), (system, m)
        acc = [m[f"accuracy@{k}"] for k in ks]
        assert all(0.0 <= a <= 1.0 for a in acc) and acc == sorted(acc), (system, m)
        assert acc[-1] == 1.0, (system, m)      # 40 passages: every answer is within the top 100
        assert "ndcg@10" not in m                # no judgements, no judged metrics
    # each question's key words are in its own passage alone, which holds its answer: BM25 ranks it first
    assert metrics["bm25"]["accuracy@1"] == 1.0

    # the train stage takes DPR's hard negatives as they were written (train.negatives: provided)
    edit_params(repo, {"train.negatives": "provided"})
    ran, out = repro(repo)
    assert "train" in ran and "prepare" not in ran, out[-4000:]
