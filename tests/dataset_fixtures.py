"""Writers of tiny BEIR and DPR dataset folders for the reader and prepare tests (DPR's release in
its exact shape too: gzipped biencoder files, psgs_w100.tsv, a QA CSV test set), and a DataError check."""

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


# ---------------------------------------------------------------- DPR's release, in its exact shape

def write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    """Write `data` to `path`, gzip-compressed to `path`.gz when `compress` (as DPR ships its files)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def release_ctx(passage: list[str], score: float, title_score: int = 0) -> dict:
    """A context as DPR's biencoder files hold it: title, text, BM25 scores and the psgs_w100 id."""
    pid, text, title = passage
    return {"title": title, "text": text, "score": score, "title_score": title_score, "passage_id": pid}


def release_passages(n: int) -> list[list[str]]:
    """[id, text, title] rows like psgs_w100.tsv's (ids from 1): each passage has key words of its
    own (`kw<i>a`, `kw<i>b`, on which its question is asked) and an answer (`ans<i>`) no other has."""
    colours = ["red", "green", "blue", "grey", "amber", "white", "black", "violet"]
    # every fourth passage has quotes in its text and title, which psgs_w100.tsv holds CSV-quoted
    nick = ["", ' (the "old" one)', "", ""]
    return [[str(i + 1), f"The kw{i}a kw{i}b of the {colours[i % 8]} valley{nick[i % 4]} is known as ans{i} "
             f"since the year {1800 + i}, when settlers came.", f"Topic {i}{nick[i % 4]}"] for i in range(n)]


def release_item(i: int, passages: list[list[str]], n_hard: int = 2) -> dict:
    """The biencoder record of the question on passage i: one positive (DPR's gold ctx: score 1000,
    title_score 1), one random negative, `n_hard` hard negatives (the next passages) with BM25 scores."""
    n = len(passages)
    return {"dataset": "toy_train_psgs_w100", "question": f"what is the kw{i}a kw{i}b called",
            "answers": [f"ans{i}"], "positive_ctxs": [release_ctx(passages[i], 1000, 1)],
            "negative_ctxs": [release_ctx(passages[(i + n // 2) % n], 0)],
            "hard_negative_ctxs": [release_ctx(passages[(i + k) % n], round(12.5 - k, 4))
                                   for k in range(1, n_hard + 1)]}


def csv_quote(field: str) -> str:
    """A field as Python's csv module writes it: quoted, quotes doubled, if it holds a quote."""
    return '"' + field.replace('"', '""') + '"' if '"' in field else field


def release_tsv(passages: list[list[str]]) -> bytes:
    """psgs_w100.tsv's bytes: header `id\\ttext\\ttitle`, fields with quotes CSV-quoted."""
    return "".join("\t".join(csv_quote(x) for x in row) + "\n"
                   for row in [["id", "text", "title"]] + passages).encode()


def release_csv(rows: list[tuple[str, list[str]]]) -> bytes:
    """A QA CSV test set's bytes, as DPR writes nq-test.csv: `question\\t['answer', ...]`, no header
    (the answer list is a Python literal; fields with quotes CSV-quoted)."""
    return "".join(f"{csv_quote(q)}\t{csv_quote(repr(list(answers)))}\n" for q, answers in rows).encode()


def write_dpr_release(folder: Path, n_passages=12, train=range(0, 6), dev=range(6, 8), test=range(8, 12),
                      compress=True, name="toy") -> dict[str, Path]:
    """A folder laid out as DPR's release: biencoder-<name>-{train,dev}.json(.gz) (pretty-printed
    JSON lists, as DPR's are), psgs_w100.tsv(.gz) and <name>-test.csv (plain, as DPR ships it).
    Question i asks about passage i. Returns role -> file written."""
    passages = release_passages(n_passages)
    files = {"passages": write_bytes(folder / "psgs_w100.tsv", release_tsv(passages), compress)}
    for split, ids in (("train", train), ("dev", dev)):
        items = [release_item(i, passages) for i in ids]
        files[split] = write_bytes(folder / f"biencoder-{name}-{split}.json",
                                   json.dumps(items, indent=4, ensure_ascii=False).encode(), compress)
    rows = [(f"what is the kw{i}a kw{i}b called", [f"ans{i}", f"ANS{i}"]) for i in test]
    files["test"] = write_bytes(folder / f"{name}-test.csv", release_csv(rows), False)
    return files
