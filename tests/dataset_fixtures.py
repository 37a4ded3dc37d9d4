"""Writers of tiny BEIR and DPR dataset folders for the reader and prepare tests, and a DataError check."""

import json
from pathlib import Path


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_beir(folder: Path, corpus, queries, qrels, header=True) -> Path:
    """corpus/queries: lists of dicts; qrels: {split: [(qid, docid, grade), ...]}."""
    write_lines(folder / "corpus.jsonl", [json.dumps(d) for d in corpus])
    write_lines(folder / "queries.jsonl", [json.dumps(q) for q in queries])
    for split, rows in qrels.items():
        lines = (["query-id\tcorpus-id\tscore"] if header else []) + [f"{q}\t{d}\t{g}" for q, d, g in rows]
        write_lines(folder / "qrels" / f"{split}.tsv", lines)
    return folder


BEIR_CORPUS = [
    {"_id": "d1", "title": "Aspirin", "text": "Aspirin reduces fever."},
    {"_id": "d2", "title": "", "text": "Ibuprofen is an NSAID."},
    {"_id": 3, "text": "An integer id and no title."},
    {"_id": "d4", "title": "Long", "text": "one two three four five six seven"},
]


BEIR_QUERIES = [{"_id": "q1", "text": "what reduces fever"}, {"_id": "q2", "text": "nsaid"},
                {"_id": 7, "text": "integer query id"}]


def beir_dataset(folder: Path) -> Path:
    return write_beir(folder, BEIR_CORPUS, BEIR_QUERIES,
                      {"train": [("q1", "d1", 1), ("q1", "d2", 0), ("7", "3", 2)], "test": [("q2", "d2", 1)]})


def assert_data_error(excinfo, path, line):
    err = excinfo.value
    assert Path(err.path) == Path(path)
    assert err.line == line
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(prefix), str(err)


def dpr_item(question, answers, positives=(), negatives=(), hard=()):
    return {"dataset": "toy", "question": question, "answers": list(answers), "positive_ctxs": list(positives),
            "negative_ctxs": list(negatives), "hard_negative_ctxs": list(hard)}


def write_dpr(folder: Path, splits, passages=None, indent=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        (folder / f"{split}.json").write_text(json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
    if passages is not None:
        write_lines(folder / "passages.tsv", passages)
    return folder
