"""Property-based bad input for every reader: each failure is one DataError naming the file and the line.

A valid tiny dataset is written, then one line (or one byte range) of one input file is
damaged: truncated (a gzipped file too), cut into invalid UTF-8, given wrongly typed or missing
fields, unusable ids, lone surrogates, huge numbers, deep nesting, NUL bytes, huge lines,
garbage, QA CSV rows without an answer list or with one that is no list of strings, passage ids
that the passages file lacks. The
prepare stage runs in this process on the result and must either succeed (where the damage
leaves valid data) or stop with exactly one `error: <file>:<line>: <problem>` line for the
damaged line, having written nothing. params.yaml (through stages/stage_cli.py load_params) and
the prepared layout the later stages read get the same treatment.

`CASES` counts the examples tried per reader; `test_zz_cases_tried` prints the totals (run
with -s to see them, or --hypothesis-show-statistics for hypothesis's own counts).
"""

import contextlib
import io
import json
import re
import runpy
import sys
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dprpipe.io
from dprpipe.io import DataError
from dprpipe.prepare import PrepareConfig
from dprpipe.records import read_corpus, read_queries

ROOT = Path(__file__).resolve().parents[1]
PREPARE = str(ROOT / "stages" / "prepare.py")
sys.path.insert(0, str(ROOT / "stages"))
from dataset_fixtures import write_dpr_release  # noqa: E402
from stage_cli import load_params  # noqa: E402  (the stages' own params reader)

CASES: Counter = Counter()
MAX_LINE = 8192          # dprpipe.io.MAX_LINE during these tests, so "huge" lines stay cheap
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
            b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80"]
NOT_IDS = ["", " ", "\t", "a\tb", "a\nb", "a\rb", "x\r"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=6)


# ---------------------------------------------------------------- running the stage in this process

def run_prepare(work: Path, dataset: Path) -> tuple[str | None, list[str], str]:
    """stages/prepare.py on `dataset`: (its error line or None, the files it wrote, its stderr)."""
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"dataset": str(dataset)}}))
    out = work / "out"
    argv = ["prepare.py", "--params", str(params), "--out", str(out / "prepared"), "--report", str(out / "data.json")]
    err = io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(PREPARE, run_name="__main__")
            code = None
        except SystemExit as e:
            code = e.code
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.exists() else []
    return code, written, err.getvalue()


def check_outcome(work: Path, dataset: Path, damaged: Path, line: int | None, ok: bool | None, problem: str = ""):
    """Run the stage; `ok` True: it must succeed, False: fail on `damaged`:`line`, None: either."""
    # fsync makes the outputs durable, which is not what is tested here, and costs most of the time
    with mock.patch.object(dprpipe.io, "MAX_LINE", MAX_LINE), mock.patch.object(dprpipe.io.os, "fsync"):
        code, written, stderr = run_prepare(work, dataset)
    assert all(x.startswith("warning: ") for x in stderr.splitlines()), stderr
    if code is None:
        assert ok is not False, f"accepted a damaged {damaged.name}:{line}"
        assert {"prepared/corpus.jsonl", "data.json"} <= set(written)
        # what was written reads back (a late failure, e.g. encoding a surrogate, would show here)
        read_corpus(work / "out" / "prepared" / "corpus.jsonl")
        return
    assert ok is not True, f"rejected valid input: {code}"
    assert isinstance(code, str) and "\n" not in code and len(code) < 700, code
    where = f"error: {damaged}:{line}: " if line is not None else f"error: {damaged}: "
    assert code.startswith(where), (where, code)
    assert re.search(problem, code), (problem, code)
    assert written == [], written                       # nothing written, not even a temporary file


# ---------------------------------------------------------------- damaging one JSONL line

@st.composite
def jsonl_damage(draw, record: dict, id_key: str, optional=("title",)):
    """(kind, damaged line as bytes, ok: True/False/None for 'either', problem regex) for one record."""
    kind = draw(st.sampled_from(["truncate", "bad_utf8", "wrong_type", "missing", "extra", "bad_id", "surrogate",
                                 "surrogate_pair", "big_int", "deep", "huge", "long_ok", "not_object", "nul",
                                 "cr_whitespace", "garbage"]))
    event(kind)
    line = json.dumps(record).encode()
    if kind == "truncate":
        return kind, line[:draw(st.integers(1, len(line) - 1))], False, "malformed JSON"
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], False, "not valid UTF-8"
    if kind == "wrong_type":
        key = draw(st.sampled_from(sorted(record)))
        value = draw(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                               st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                          st.integers(), max_size=2)))
        kind_of = type(record[key])       # str fields get no str here; list and dict fields may get theirs
        ok = (value is None and key in optional) or (key == id_key and type(value) is int) or \
            (kind_of in (list, dict) and type(value) is kind_of)
        return kind, json.dumps({**record, key: value}).encode(), ok, "missing field|must be str"
    if kind == "missing":
        key = draw(st.sampled_from(sorted(record)))
        rest = {k: v for k, v in record.items() if k != key}
        return kind, json.dumps(rest).encode(), key in optional, "missing field"
    if kind == "extra":
        return kind, json.dumps({**record, "extra": draw(json_values)}).encode(), True, ""
    if kind == "bad_id":
        return kind, json.dumps({**record, id_key: draw(st.sampled_from(NOT_IDS))}).encode(), False, "usable id"
    if kind == "surrogate":
        bad = chr(draw(st.integers(0xD800, 0xDFFF)))
        return kind, json.dumps({**record, "text": f"a{bad}b"}).encode(), False, "surrogate"
    if kind == "surrogate_pair":   # an escaped astral character is text
        char = chr(draw(st.integers(0x10000, 0x10FFFF)))
        return kind, json.dumps({**record, "text": f"a{char}b"}).encode(), True, ""
    if kind == "big_int":
        digits = draw(st.integers(4301, 6000))
        return kind, json.dumps(record)[:-1].encode() + b', "n": ' + b"7" * digits + b"}", False, "malformed JSON"
    if kind == "deep":       # valid JSON; deeper than the recursion limit it is a clear error, not a crash
        depth = draw(st.sampled_from([500, 3_900]))
        return kind, json.dumps(record)[:-1].encode() + b', "n": ' + b"[" * depth + b"]" * depth + b"}", None, \
            "nested too deeply"
    if kind == "huge":
        n = draw(st.integers(MAX_LINE, 2 * MAX_LINE))
        return kind, json.dumps({**record, "text": "w" * n}).encode(), False, "line longer than"
    if kind == "long_ok":
        n = draw(st.integers(1, MAX_LINE - 200))
        return kind, json.dumps({**record, "text": "w " * (n // 2) + "w"}).encode(), True, ""
    if kind == "not_object":
        value = draw(st.one_of(st.lists(json_values, max_size=2), st.integers(), st.text(max_size=5),
                               st.booleans(), st.none()))
        return kind, json.dumps(value).encode(), False, "expected a JSON object"
    if kind == "nul":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + b"\x00" + line[at:], False, "malformed JSON"
    if kind == "cr_whitespace":   # a lone CR is JSON whitespace, not a line break
        at = line.index(b",") + 1
        return kind, line[:at] + b"\r" + line[at:], True, ""
    garbage = draw(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b))
    return kind, garbage, None, ""


def write_beir(folder: Path, files: dict[str, list[bytes]]) -> Path:
    for name, lines in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"".join(line + b"\n" for line in lines))
    return folder


def beir_lines() -> dict[str, list[bytes]]:
    """Five documents, five queries (q4 judged nowhere, so changing it disturbs nothing else)."""
    corpus = [json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"text of document {i}"}).encode()
              for i in range(5)]
    queries = [json.dumps({"_id": f"q{i}", "text": f"question {i}"}).encode() for i in range(5)]
    return {"corpus.jsonl": corpus, "queries.jsonl": queries,
            "qrels/train.tsv": [b"query-id\tcorpus-id\tscore", b"q0\td0\t1", b"q1\td1\t1"],
            "qrels/test.tsv": [b"q2\td2\t1", b"q3\td3\t1"]}


@FUZZ
@given(data=st.data(), k=st.integers(0, 4))
def test_corpus_jsonl(data, k):
    # d4 is judged by no query: a new id or text for it leaves the rest valid
    record = {"_id": "d4", "title": "T4", "text": "text of document 4"}
    kind, line, ok, problem = data.draw(jsonl_damage(record, "_id"))
    files = beir_lines()
    files["corpus.jsonl"].insert(k, line)           # the damaged record is line k + 1
    del files["corpus.jsonl"][-1]                   # (its undamaged self was the last line)
    with tempfile.TemporaryDirectory() as d:
        folder = write_beir(Path(d) / "ds", files)
        check_outcome(Path(d), folder, folder / "corpus.jsonl", k + 1, ok, problem)
    CASES["BEIR corpus.jsonl"] += 1


@FUZZ
@given(data=st.data(), k=st.integers(0, 4))
def test_queries_jsonl(data, k):
    record = {"_id": "q4", "text": "question 4"}
    kind, line, ok, problem = data.draw(jsonl_damage(record, "_id", optional=()))
    files = beir_lines()
    files["queries.jsonl"].insert(k, line)
    del files["queries.jsonl"][-1]
    with tempfile.TemporaryDirectory() as d:
        folder = write_beir(Path(d) / "ds", files)
        check_outcome(Path(d), folder, folder / "queries.jsonl", k + 1, ok, problem)
    CASES["BEIR queries.jsonl"] += 1


# ---------------------------------------------------------------- damaging one TSV line

@st.composite
def tsv_damage(draw, row: list[str], id_columns: tuple[int, ...], avoid: frozenset = frozenset()):
    """(kind, damaged line, ok, problem) for one TSV row; ok None: either way, as long as it is that line."""
    kind = draw(st.sampled_from(["truncate", "bad_utf8", "columns", "bad_id", "huge", "nul", "crlf", "field",
                                 "garbage"]))
    event(kind)
    line = "\t".join(row).encode()
    if kind == "truncate":   # a TSV has no end marker: a cut inside the last field can still be valid
        return kind, line[:draw(st.integers(1, len(line) - 1))], None, ""
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], False, "not valid UTF-8"
    if kind == "columns":
        fields = list(row)
        if draw(st.booleans()):
            fields.insert(draw(st.integers(0, len(fields))),
                          draw(st.text(max_size=4).filter(lambda t: "\n" not in t and "\x00" not in t)))
        else:
            del fields[draw(st.integers(0, len(fields) - 1))]
        return kind, "\t".join(fields).encode(), False, "tab-separated columns"
    if kind == "bad_id":
        fields = list(row)
        fields[draw(st.sampled_from(id_columns))] = draw(st.sampled_from([x for x in NOT_IDS if "\t" not in x
                                                                          and "\n" not in x]))
        return kind, "\t".join(fields).encode(), False, "usable id"
    if kind == "huge":
        return kind, line + b"x" * draw(st.integers(MAX_LINE, 2 * MAX_LINE)), False, "line longer than"
    if kind == "nul":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + b"\x00" + line[at:], False, "NUL byte"
    if kind == "crlf":
        return kind, line + b"\r", True, ""
    if kind == "field":      # any text in one field: the reader decides, but never with a crash
        fields = list(row)
        fields[draw(st.integers(0, len(fields) - 1))] = draw(st.text(max_size=12).filter(
            lambda t: not any(c in t for c in "\t\n\r\x00")))
        # a key that repeats another row's would be reported at the later of the two rows
        if tuple(fields[c] for c in id_columns) in avoid:
            fields = list(row)
        return kind, "\t".join(fields).encode(), None, ""
    garbage = draw(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b))
    return kind, garbage, None, ""


@FUZZ
@given(data=st.data(), k=st.integers(0, 1))
def test_qrels_tsv(data, k):
    # the row of q2 is damaged and put first or second (a header is optional: without one, line 1 is data)
    kind, line, ok, problem = data.draw(tsv_damage(["q2", "d2", "1"], (0, 1), frozenset({("q3", "d3")})))
    files = beir_lines()
    rows = [b"q3\td3\t1"]
    rows.insert(k, line)
    files["qrels/test.tsv"] = rows
    with tempfile.TemporaryDirectory() as d:
        folder = write_beir(Path(d) / "ds", files)
        check_outcome(Path(d), folder, folder / "qrels" / "test.tsv", k + 1, ok, problem)
    CASES["BEIR qrels TSV"] += 1


def dpr_items(n=3):
    return [{"question": f"question {i}", "answers": [f"answer {i}"],
             "positive_ctxs": [{"title": f"T{i}", "text": f"passage {i} answer {i}", "passage_id": str(i)}],
             "negative_ctxs": [], "hard_negative_ctxs": [{"title": "", "text": f"other {i}"}]}
            for i in range(n)]


@FUZZ
@given(data=st.data(), k=st.integers(0, 3))
def test_passages_tsv(data, k):
    kind, line, ok, problem = data.draw(tsv_damage(["9", "a passage nobody judges", "Title"], (0,),
                                                   frozenset({("0",), ("1",), ("2",)})))
    rows = [b"id\ttext\ttitle"] + [f"{i}\tpassage {i} answer {i}\tT{i}".encode() for i in range(3)]
    rows.insert(k + 1, line)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ds"
        folder.mkdir()
        (folder / "train.json").write_text(json.dumps(dpr_items(), indent=1))
        (folder / "passages.tsv").write_bytes(b"\n".join(rows) + b"\n")
        check_outcome(Path(d), folder, folder / "passages.tsv", k + 2, ok, problem)
    CASES["DPR passages TSV"] += 1


# ---------------------------------------------------------------- damaging a DPR biencoder JSON file

@st.composite
def dpr_item_damage(draw, item: dict):
    """A wrongly typed or shaped question record: (kind, new item, problem)."""
    kind = draw(st.sampled_from(["not_object", "question", "answers", "answer_item", "ctxs", "ctx", "ctx_text",
                                 "passage_id", "surrogate"]))
    event(kind)
    if kind == "not_object":
        return kind, draw(st.one_of(st.lists(json_values, max_size=2), st.text(max_size=4), st.integers())), \
            "expected a JSON object"
    if kind == "question":
        return kind, {**item, "question": draw(st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=2),
                                                         st.booleans()))}, "question"
    if kind == "answers":
        return kind, {**item, "answers": draw(st.one_of(st.text(max_size=3), st.integers(), st.dictionaries(
            st.text(max_size=2), st.integers(), max_size=2)))}, "answers"
    if kind == "answer_item":
        return kind, {**item, "answers": ["ok", draw(st.one_of(st.integers(), st.none(), st.lists(st.text())))]}, \
            "list of strings"
    key = draw(st.sampled_from(["positive_ctxs", "negative_ctxs", "hard_negative_ctxs"]))
    ctx = {"title": "t", "text": "some text"}
    if kind == "ctxs":
        return kind, {**item, key: draw(st.one_of(st.text(max_size=3), st.integers(), st.dictionaries(
            st.text(max_size=2), st.integers(), min_size=1, max_size=2)))}, key
    if kind == "ctx":
        return kind, {**item, key: [draw(st.one_of(st.text(max_size=3), st.integers(), st.lists(st.integers(),
                                                                                                max_size=2)))]}, key
    if kind == "ctx_text":
        return kind, {**item, key: [{**ctx, "text": draw(st.one_of(st.none(), st.integers(), st.lists(st.text())))}]}, \
            "text"
    if kind == "passage_id":
        bad = draw(st.one_of(st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), min_size=1),
                             st.sampled_from(["a\tb", "a\nb", " "])))
        return kind, {**item, key: [{**ctx, "passage_id": bad}]}, "passage_id"
    bad = chr(draw(st.integers(0xD800, 0xDFFF)))
    return kind, {**item, "question": f"q{bad}"}, "surrogate"


@FUZZ
@given(data=st.data(), k=st.integers(0, 2), indent=st.sampled_from([None, 1, 2]))
def test_dpr_json_bad_item(data, k, indent):
    items = dpr_items()
    kind, items[k], problem = data.draw(dpr_item_damage(items[k]))
    # the file is built item by item, so the line where item k starts is known
    text, start = "[", 1
    for i, item in enumerate(items):
        sep = ("," if i else "") + ("\n" if indent is not None else " ")
        text += sep
        if i == k:
            start = text.count("\n") + 1
        text += json.dumps(item, indent=indent)
    text += "\n]"
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ds"
        folder.mkdir()
        (folder / "train.json").write_text(text)
        check_outcome(Path(d), folder, folder / "train.json", start, False, problem)
    CASES["DPR biencoder JSON (items)"] += 1


@FUZZ
@given(data=st.data(), indent=st.sampled_from([None, 2]))
def test_dpr_json_bytes(data, indent):
    raw = json.dumps(dpr_items(), indent=indent).encode()
    kind = data.draw(st.sampled_from(["truncate", "bad_utf8"]))
    event(kind)
    at = data.draw(st.integers(1, len(raw) - 1))
    if kind == "truncate":
        raw = raw[:at]
        with pytest.raises(json.JSONDecodeError) as ref:     # the reference: where json.loads gives up
            json.loads(raw)
        line, problem = ref.value.lineno, "malformed JSON|truncated|expected"
    else:
        raw = raw[:at] + data.draw(st.sampled_from(BAD_UTF8)) + raw[at:]
        line, problem = raw[:at].count(b"\n") + 1, "not valid UTF-8"
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ds"
        folder.mkdir()
        (folder / "train.json").write_bytes(raw)
        check_outcome(Path(d), folder, folder / "train.json", line, False, problem)
    CASES["DPR biencoder JSON (bytes)"] += 1


# ---------------------------------------------------------------- DPR's release as it ships: gzip, QA CSV, passage ids

@FUZZ
@given(data=st.data(), which=st.sampled_from(["passages", "train"]))
def test_truncated_gzip(data, which):
    # a download cut short: every cut of a .gz file is an error at the line where its text ends
    import zlib

    with tempfile.TemporaryDirectory() as d:
        files = write_dpr_release(Path(d) / "ds", n_passages=40, train=range(0, 30), dev=range(30, 34),
                                  test=range(34, 40))
        path = files[which]
        raw = path.read_bytes()
        at = data.draw(st.integers(1, len(raw) - 1))
        event(f"{which} cut at {'header' if at < 10 else 'trailer' if at > len(raw) - 8 else 'data'}")
        path.write_bytes(raw[:at])
        if at < 2:   # not even the two magic bytes: not recognisable as gzip
            line, problem = None, "not a gzip file"
        else:
            line, problem = zlib.decompressobj(31).decompress(raw[:at]).count(b"\n") + 1, "ends early"
        check_outcome(Path(d), files["passages"].parent, path, line, False, problem)
    CASES["gzip (truncated)"] += 1


@st.composite
def qa_row_damage(draw):
    """(kind, row bytes, ok: True/False/None, problem regex) for one row of a QA CSV test set."""
    kind = draw(st.sampled_from(["no_answers", "not_json", "json_value", "python", "csv_quoted", "empty_list",
                                 "columns", "question", "bad_utf8", "nul", "huge", "truncate", "garbage"]))
    event(kind)
    question = "what is the kw9a kw9b called"
    if kind == "no_answers":
        return kind, question.encode(), False, "no answer list"
    if kind == "not_json":          # bare words or numbers: neither JSON nor a Python literal list
        words = draw(st.text(alphabet="abcXYZ019 _", min_size=1, max_size=12).filter(lambda t: t.strip()))
        return kind, f"{question}\t{words}".encode(), False, "answer list"
    if kind == "json_value":
        value = draw(json_values)
        ok = isinstance(value, list) and bool(value) and all(isinstance(a, str) for a in value)
        return kind, f"{question}\t{json.dumps(value)}".encode(), ok, "answer list"
    texts = st.lists(st.text(max_size=6), min_size=1, max_size=3)
    if kind == "python":            # DPR's own form: str(list), quotes chosen by Python
        return kind, f"{question}\t{draw(texts)!r}".encode(), True, ""
    if kind == "csv_quoted":        # as the csv module writes a field holding a quote
        answers = draw(texts) + ['say "hi"']
        field = '"' + repr(answers).replace('"', '""') + '"'
        return kind, f"{question}\t{field}".encode(), True, ""
    if kind == "empty_list":
        return kind, f"{question}\t{draw(st.sampled_from(['[]', ' [ ] ']))}".encode(), False, "empty"
    if kind == "columns":
        return kind, f"{question}\t['a']\t{draw(st.text(max_size=4))}".encode("utf-8", "surrogatepass"), False, \
            "tab-separated columns"
    if kind == "question":          # any question text: the reader takes it (a blank one is a warning)
        text = draw(st.text(max_size=12).filter(lambda t: not any(c in t for c in "\t\n\r\x00")))
        return kind, f"{text}\t['a']".encode("utf-8", "surrogatepass"), None, ""
    line = f"{question}\t['ans9']".encode()
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], False, "not valid UTF-8"
    if kind == "nul":
        at = draw(st.integers(0, len(line)))
        return kind, line[:at] + b"\x00" + line[at:], False, "NUL byte"
    if kind == "huge":
        return kind, line + b"x" * draw(st.integers(MAX_LINE, 2 * MAX_LINE)), False, "line longer than"
    if kind == "truncate":          # a CSV has no end marker: a cut can still be a valid row
        return kind, line[:draw(st.integers(1, len(line) - 1))], None, ""
    garbage = draw(st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b.strip()))
    return kind, garbage, None, ""


@FUZZ
@given(data=st.data(), k=st.integers(0, 3))
def test_qa_csv(data, k):
    kind, row, ok, problem = data.draw(qa_row_damage())
    with tempfile.TemporaryDirectory() as d:
        files = write_dpr_release(Path(d) / "ds", compress=False)
        rows = files["test"].read_bytes().splitlines()
        rows.insert(k, row)                               # the damaged row is line k + 1
        files["test"].write_bytes(b"\n".join(rows) + b"\n")
        check_outcome(Path(d), files["test"].parent, files["test"], k + 1, ok, problem)
    CASES["QA CSV"] += 1


@FUZZ
@given(data=st.data(), k=st.integers(0, 5), key=st.sampled_from(["positive_ctxs", "negative_ctxs",
                                                                  "hard_negative_ctxs"]))
def test_passage_id_missing_from_passages_file(data, k, key):
    # a biencoder record naming a passage that psgs_w100.tsv lacks: the files are not from one release
    pid = data.draw(st.one_of(st.integers(13, 10**9), st.text(min_size=1, max_size=6).filter(
        lambda t: t.strip() and not any(c in t for c in "\t\n\r") and not t.strip().isdigit())))
    with tempfile.TemporaryDirectory() as d:
        files = write_dpr_release(Path(d) / "ds", compress=data.draw(st.booleans()))
        import gzip

        path = files["train"]
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            items = json.load(f)
        items[k][key][-1]["passage_id"] = pid
        text = json.dumps(items, indent=4)
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
        start = 2 + sum(len(json.dumps(it, indent=4).splitlines()) for it in items[:k])
        check_outcome(Path(d), path.parent, path, start, False, f"passage_id .* of '{key}' is not in psgs_w100")
    CASES["DPR passage ids"] += 1


# ---------------------------------------------------------------- params.yaml

PARAMS_LINES = (ROOT / "params.yaml").read_text().splitlines()


def prepare_key_lines() -> dict[str, int]:
    """Line index (0-based) of each key of the prepare section of the project's params.yaml."""
    out, inside = {}, False
    for i, line in enumerate(PARAMS_LINES):
        if re.match(r"^prepare:", line):
            inside = True
        elif re.match(r"^\S", line):
            inside = False
        elif inside and (m := re.match(r"^  (\w+):", line)):
            out[m.group(1)] = i
    return out


PREPARE_KEYS = prepare_key_lines()


def load(text: bytes) -> tuple[str | None, PrepareConfig | None]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_bytes(text)
        try:
            return None, load_params(path, "prepare", PrepareConfig)
        except SystemExit as e:
            code = e.code
            assert isinstance(code, str) and "\n" not in code and len(code) < 700, code
            m = re.match(rf"error: {re.escape(str(path))}(?::(\d+))?: \S", code)
            assert m, code
            return code[len(f"error: {path}"):], None


@FUZZ
@given(data=st.data())
def test_params_yaml(data):
    kind = data.draw(st.sampled_from(["value", "unknown_key", "duplicate", "tab", "bad_utf8", "truncate",
                                      "garbage_line", "huge_value"]))
    event(kind)
    lines = list(PARAMS_LINES)
    key = data.draw(st.sampled_from(sorted(PREPARE_KEYS)))
    i = PREPARE_KEYS[key]
    expect_line = i + 1
    if kind == "value":      # any YAML scalar or collection in place of one value
        value = data.draw(json_values)
        lines[i] = f"  {key}: {json.dumps(value)}"
        text = "\n".join(lines).encode()
        error, cfg = load(text)
        if error is None:    # accepted only if it is a valid value of the right type
            assert getattr(cfg, key) == (float(value) if isinstance(getattr(cfg, key), float) else value)
        else:
            assert error.startswith(f":{expect_line}: "), error
        CASES["params.yaml"] += 1
        return
    if kind == "unknown_key":
        lines.insert(i + 1, f"  {key}_x: 1")
        expect_line, problem = i + 2, "unknown key"
    elif kind == "duplicate":
        lines.insert(i + 1, lines[i])
        expect_line, problem = i + 2, "appears twice"
    elif kind == "tab":
        lines[i] = "\t" + lines[i].lstrip()
        problem = "not valid YAML"
    elif kind == "bad_utf8":
        raw = "\n".join(lines).encode()
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.sampled_from(BAD_UTF8)) + raw[at:]
        error, _ = load(raw)
        line = raw[:at].count(b"\n") + 1
        assert error.startswith(f":{line}: not valid UTF-8"), error
        CASES["params.yaml"] += 1
        return
    elif kind == "truncate":   # a cut anywhere: either still valid, or an error on a line of the file
        raw = "\n".join(lines).encode()
        raw = raw[:data.draw(st.integers(0, len(raw)))]
        error, _ = load(raw)
        if error is not None and error.startswith(":"):
            assert 1 <= int(error[1:].split(":")[0]) <= raw.count(b"\n") + 1, error
        CASES["params.yaml"] += 1
        return
    elif kind == "garbage_line":
        junk = data.draw(st.text(min_size=1, max_size=20).filter(lambda t: "\n" not in t))
        lines.insert(i + 1, junk)
        error, _ = load("\n".join(lines).encode("utf-8", "surrogatepass"))
        CASES["params.yaml"] += 1
        return
    else:                      # a 200 kB value: fine as a dataset path, else rejected (clipped in the message)
        lines[i] = f"  {key}: {'x' * 200_000}"
        error, cfg = load("\n".join(lines).encode())
        assert (error is None) == (key == "dataset"), error
        assert error is None or error.startswith(f":{expect_line}: ") and len(error) < 700, error
        CASES["params.yaml"] += 1
        return
    error, _ = load("\n".join(lines).encode())
    assert error is not None and error.startswith(f":{expect_line}: "), (kind, error)
    assert re.search(problem, error), error
    CASES["params.yaml"] += 1


# ---------------------------------------------------------------- the prepared layout (read by mine, train, ...)

@FUZZ
@given(data=st.data(), k=st.integers(0, 2), which=st.sampled_from(["corpus", "queries"]))
def test_prepared_files(data, k, which):
    if which == "corpus":
        record, reader, optional = {"id": "p9", "title": "T", "text": "text"}, read_corpus, ("title",)
    else:
        record, reader, optional = {"id": "q9", "text": "q", "answers": [], "relevant": {"p1": 1}}, read_queries, \
            ("answers", "relevant")
    kind, line, ok, problem = data.draw(jsonl_damage(record, "id", optional=optional))
    if kind == "bad_id":           # ids of the prepared layout were checked when prepare wrote them
        return
    rows = [json.dumps({**record, "id": f"x{i}"}).encode() for i in range(3)]
    rows.insert(k, line)
    with tempfile.TemporaryDirectory() as d, mock.patch.object(dprpipe.io, "MAX_LINE", MAX_LINE):
        path = Path(d) / f"{which}.jsonl"
        path.write_bytes(b"\n".join(rows) + b"\n")
        try:
            reader(path)
            assert ok is not False, (kind, line)
        except DataError as e:
            assert ok is not True, (kind, str(e))
            assert (e.path, e.line) == (str(path), k + 1), str(e)
            assert "\n" not in str(e) and len(str(e)) < 700
    CASES[f"prepared {which}.jsonl"] += 1


# ---------------------------------------------------------------- real processes, and the count

@pytest.mark.parametrize("damage", ["dpr_truncated", "gzip_truncated", "qrels_binary", "params_tab"])
def test_stage_process_prints_one_error_line_and_writes_nothing(tmp_path, damage):
    import subprocess

    folder = tmp_path / "ds"
    folder.mkdir()
    params = {"prepare": {"dataset": str(folder)}}
    if damage == "gzip_truncated":
        import zlib

        path = write_dpr_release(folder)["train"]
        cut = path.read_bytes()[:-9]                    # the last compressed byte and the trailer
        path.write_bytes(cut)
        line = zlib.decompressobj(31).decompress(cut).count(b"\n") + 1   # where the text still there ends
        expected = f"error: {path}:{line}: the compressed file ends early"
    elif damage == "dpr_truncated":
        text = json.dumps(dpr_items(), indent=2)
        (folder / "train.json").write_text(text[: len(text) // 2])
        expected = f"error: {folder / 'train.json'}:"
    else:
        write_beir(folder, beir_lines())
        if damage == "qrels_binary":
            (folder / "qrels" / "test.tsv").write_bytes(b"q2\td2\t1\n\x89PNG\r\n\x1a\n\x00\x00")
            expected = f"error: {folder / 'qrels' / 'test.tsv'}:2: "
        else:
            expected = f"error: {tmp_path / 'params.yaml'}:3: not valid YAML"
    params_text = yaml.safe_dump(params)
    if damage == "params_tab":
        params_text += "\tseed: 1\n"
    (tmp_path / "params.yaml").write_text(params_text)
    r = subprocess.run([sys.executable, PREPARE, "--params", str(tmp_path / "params.yaml"), "--out",
                        str(tmp_path / "out" / "prepared"), "--report", str(tmp_path / "out" / "data.json")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(expected), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_zz_cases_tried():
    # runs last in this file: every reader above was fed examples (skipped if run alone)
    if not CASES:
        pytest.skip("run with the fuzz tests above")
    print("\nbad-input cases tried: " + ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items()))
          + f"; total {sum(CASES.values())}")
    assert len(CASES) == 12 and min(CASES.values()) >= 20
