"""dprpipe.dpr_format: reading DPR folders (DPR's release as it ships: gzipped biencoder files, psgs_w100,
QA CSV test sets) and the streaming JSON list parser, on tiny files written here."""

import hashlib
import json
from pathlib import Path

import pytest
from dataset_fixtures import (assert_data_error, dpr_item, release_passages, release_tsv, write_dpr,
                              write_dpr_release, write_lines)
from hypothesis import given, settings
from hypothesis import strategies as st

from dprpipe.dpr_format import content_id, iter_json_array
from dprpipe.io import DataError
from dprpipe.prepare import PrepareConfig, detect_format, prepare, read_dataset
from dprpipe.records import Passage, Query


def test_read_dpr_with_passages_tsv(tmp_path):
    passages = ["id\ttext\ttitle",
                "1\tParis is the capital of France.\tParis",
                '2\t"He said ""bonjour"" twice."\tGreeting',     # csv-quoted text
                '3\tA film.\t"The ""Best"" Film"']               # csv-quoted title
    no_id = {"title": "Lyon", "text": "Lyon is a city in France."}
    items = [
        dpr_item("capital of france?", ["Paris"],
                 positives=[{"title": "Paris", "text": "Paris is the capital of France.", "passage_id": "1"}],
                 negatives=[{"title": "Greeting", "text": "ignored: the TSV text wins", "passage_id": "2"}],
                 hard=[no_id]),
        dpr_item("a city in france", ["Lyon"], positives=[no_id],
                 hard=[{"title": "copy", "text": "the TSV's text wins", "passage_id": "3"}]),
    ]
    folder = write_dpr(tmp_path / "dpr", {"train": items, "dev": items[:1]}, passages)
    assert detect_format(folder) == "dpr"
    ds = read_dataset(folder)
    lyon_id = "h" + hashlib.sha1("Lyon\nLyon is a city in France.".encode()).hexdigest()[:16]
    assert content_id("Lyon", "Lyon is a city in France.") == lyon_id
    assert ds.corpus == [
        Passage("1", "Paris", "Paris is the capital of France."),
        Passage("2", "Greeting", 'He said "bonjour" twice.'),
        Passage("3", 'The "Best" Film', "A film."),
        # a context without a passage_id joins the corpus (one with an id the TSV lacks is an error)
        Passage(lyon_id, "Lyon", "Lyon is a city in France."),
    ]
    train = ds.splits["train"]
    assert [q.id for q in train] == ["train-0", "train-1"]
    assert train[0] == Query("train-0", "capital of france?", ("Paris",), {"1": 1})
    assert train[1].relevant == {lyon_id: 1}                # positives only; negatives are not judged
    assert [q.id for q in ds.splits["dev"]] == ["dev-0"]
    # hard_negative_ctxs are the provided negatives, scored 1/rank without scores of their own
    assert ds.negatives == {"train-0": [(lyon_id, 1.0)], "train-1": [("3", 1.0)], "dev-0": [(lyon_id, 1.0)]}


def test_read_dpr_without_passages_tsv_uses_every_context(tmp_path):
    items = [dpr_item("q", ["a"], positives=[{"title": "T", "text": "pos", "passage_id": "7"}],
                      negatives=[{"title": "", "text": "neg"}],
                      hard=[{"title": "H", "text": "hard", "psg_id": 8}])]
    ds = read_dataset(write_dpr(tmp_path / "dpr", {"test": items}))
    assert [p.id for p in ds.corpus] == ["7", content_id("", "neg"), "8"]
    assert ds.splits["test"][0].relevant == {"7": 1}


def test_read_dpr_integer_passage_id_zero(tmp_path):
    items = [dpr_item("q", [], positives=[{"title": "T", "text": "zero", "passage_id": 0}])]
    ds = read_dataset(write_dpr(tmp_path / "dpr", {"train": items}, ["0\tzero\tT"]))
    assert ds.corpus == [Passage("0", "T", "zero")]
    assert ds.splits["train"][0].relevant == {"0": 1}


def test_empty_dpr_corpus(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]})
    with pytest.raises(DataError, match="corpus is empty"):
        prepare(PrepareConfig(dataset=str(folder)))


def test_non_utf8_in_dpr_json(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item(f"q{i}", ["a"]) for i in range(30)]})
    lines = (folder / "train.json").read_bytes().split(b"\n")
    bad = lines.index(b'    "question": "q20",')
    assert bad > 100
    lines[bad] = lines[bad].replace(b"q20", b"q\xff20")
    (folder / "train.json").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", bad + 1)


def test_non_utf8_in_passages_tsv(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]})
    (folder / "passages.tsv").write_bytes(b"id\ttext\ttitle\n1\tfine\tT\n2\tna\xefve\tT\n")
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "passages.tsv", 3)


@pytest.mark.parametrize("item,problem", [
    ({"answers": ["a"]}, "missing field 'question'"),
    ({"question": "q", "answers": "a"}, "field 'answers' must be list, got str"),
    ({"question": "q", "answers": ["a", 1]}, "'answers' must be a list of strings"),
    ({"question": "q", "positive_ctxs": [{"title": "t"}]}, "missing field 'text'"),
    ({"question": "q", "positive_ctxs": ["just text"]}, "each of 'positive_ctxs' must be an object"),
    ({"question": "q", "hard_negative_ctxs": {"text": "x"}}, "field 'hard_negative_ctxs' must be list"),
    (["not", "an", "object"], "expected a JSON object per question"),
])
def test_bad_dpr_item_names_the_line_where_it_starts(tmp_path, item, problem):
    items = [dpr_item("first", ["a"]), dpr_item("second", ["b"]), item, dpr_item("fourth", ["d"])]
    folder = write_dpr(tmp_path / "dpr", {"train": items})
    # "[" is line 1; each item before the bad one takes as many lines as it does pretty-printed alone
    start = 2 + sum(len(json.dumps(it, indent=2).splitlines()) for it in items[:2])
    assert (folder / "train.json").read_text().splitlines()[start - 1] in ("  {", "  [")
    with pytest.raises(DataError, match=problem) as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", start)


def test_bad_passages_tsv_row(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"])]},
                       ["id\ttext\ttitle", "1\ta\tT", "2\tb with\ttoo\tmany", "3\tc\tT"])
    with pytest.raises(DataError, match="expected 3 tab-separated columns, got 4") as e:
        read_dataset(folder)
    assert_data_error(e, folder / "passages.tsv", 3)


@pytest.mark.parametrize("ctx,problem", [
    ({"text": "t", "passage_id": 1.5}, "passage_id must be a string or an integer, got float"),
    ({"text": "t", "passage_id": ["1"]}, "passage_id must be a string or an integer, got list"),
    ({"text": "t", "passage_id": True}, "got bool"),
    ({"text": "t", "passage_id": "a\tb"}, "not a usable id"),
])
def test_bad_dpr_passage_ids(tmp_path, ctx, problem):
    folder = write_dpr(tmp_path / "dpr", {"train": [dpr_item("q", ["a"], positives=[ctx])]})
    with pytest.raises(DataError, match=problem) as e:
        read_dataset(folder)
    assert_data_error(e, folder / "train.json", 2)


def test_text_after_the_dpr_list_is_an_error(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": _pretty_list(2)})
    path = folder / "train.json"
    path.write_text(path.read_text() + "\n[]\n")                     # two lists in one file
    with pytest.raises(DataError, match="after the closing") as e:
        read_dataset(folder)
    assert e.value.line == path.read_text().count("\n")


def test_a_huge_dpr_item_reads_in_linear_time(tmp_path):
    # one 4 MB item with a 1 kB chunk: re-parsing from the item's start on every chunk would take minutes
    import time

    item = dpr_item("q", ["a"], positives=[{"title": "", "text": "word " * 800_000, "passage_id": "1"}])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([item, item]))
    t0 = time.perf_counter()
    assert [line for line, _ in iter_json_array(path, chunk_size=1024)] == [1, 1]
    assert time.perf_counter() - t0 < 5


CHUNK_SIZES = [1, 2, 7, 16, 64, 1 << 20]


def _pretty_list(n=6):
    return [dpr_item(f"question {i}", [f"answer {i}"],
                     positives=[{"title": f"T{i}", "text": f"passage {i}", "passage_id": str(i)}])
            for i in range(n)]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("breakage", [
    ('"answer 3"', '"answer 3" "oops"'),          # missing comma inside the 4th item
    ('"passage 3",', '"passage 3"'),               # missing comma before "passage_id"
    ('"question 3"', "question 3"),                # an unquoted string
    ('"T3"', '"T3\\x"'),                            # a bad escape
    ('"answer 3"\n', '"answer 3",\n'),             # trailing comma in the answers list
])
def test_malformed_item_in_pretty_printed_list_exact_line(tmp_path, chunk_size, breakage):
    text = json.dumps(_pretty_list(), indent=2)
    old, new = breakage
    assert text.count(old) == 1
    text = text.replace(old, new)
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    # reference: the line json.loads reports for the same text
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    items = []
    with pytest.raises(DataError, match="malformed JSON") as e:
        for line, item in iter_json_array(path, chunk_size=chunk_size):
            items.append(item)
    assert_data_error(e, path, ref.value.lineno)
    assert [it["question"] for it in items] == ["question 0", "question 1", "question 2"]


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_item_start_lines_in_pretty_printed_list(tmp_path, chunk_size):
    items = _pretty_list()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    # reference: each item occupies len(json.dumps(item, indent=2) lines); "[" is line 1
    expected, line = [], 2
    for item in items:
        expected.append(line)
        line += len(json.dumps(item, indent=2).splitlines())
    got = list(iter_json_array(path, chunk_size=chunk_size))
    assert [item for _, item in got] == items
    assert [line for line, _ in got] == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(alphabet="ab\n\"\\é,[]{} ", max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text("xyz", max_size=3), children,
                                                                      max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(json_values.map(lambda v: {"v": v}), max_size=6),
       indents=st.lists(st.sampled_from([None, 0, 1, 2]), min_size=6, max_size=6),
       gaps=st.lists(st.sampled_from(["", " ", "\n", "\n\n", "\t\n  "]), min_size=8, max_size=8),
       chunk_size=st.sampled_from(CHUNK_SIZES))
def test_iter_json_array_items_and_lines_on_random_layouts(tmp_path_factory, items, indents, gaps, chunk_size):
    # build the file piece by piece, so the start line of each item is known
    parts, expected, line = [gaps[0], "["], [], 1 + gaps[0].count("\n")
    for i, item in enumerate(items):
        if i:
            parts.append(",")
        gap = gaps[1 + i % 6]
        parts.append(gap)
        line += gap.count("\n")
        expected.append(line)
        body = json.dumps(item, indent=indents[i % 6], ensure_ascii=False)
        parts.append(body)
        line += body.count("\n")
    parts += [gaps[7], "]\n"]
    path = tmp_path_factory.mktemp("json") / "list.json"
    path.write_text("".join(parts), encoding="utf-8")
    got = list(iter_json_array(path, chunk_size=chunk_size))
    assert [item for _, item in got] == items
    assert [line for line, _ in got] == expected


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("cut", ["after_item", "mid_item", "after_comma", "only_bracket"])
def test_truncated_list(tmp_path, chunk_size, cut):
    full = json.dumps(_pretty_list(3), indent=2)
    first_end = full.index("\n  },") + len("\n  }")
    text = {"after_item": full[:first_end],
            "mid_item": full[:first_end - 40],
            "after_comma": full[:first_end + 1] + "\n",
            "only_bracket": "[\n"}[cut]
    path = tmp_path / "train.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="truncated|malformed JSON") as e:
        list(iter_json_array(path, chunk_size=chunk_size))
    assert Path(e.value.path) == path
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    # the reported line is where the text runs out (as json.loads reports it)
    assert e.value.line == ref.value.lineno


def test_truncated_dpr_file_in_prepare(tmp_path):
    folder = write_dpr(tmp_path / "dpr", {"train": _pretty_list(3)})
    path = folder / "train.json"
    text = path.read_text()
    truncated = text[: text.rindex("]")]
    path.write_text(truncated)
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(truncated)
    with pytest.raises(DataError, match="truncated") as e:
        prepare(PrepareConfig(dataset=str(folder)))
    assert_data_error(e, path, ref.value.lineno)
    assert ref.value.lineno == text.count("\n") + 1   # the empty line after the last item


@pytest.mark.parametrize("text,line,problem", [
    ('{"question": "not a list"}', 1, "expected a JSON list"),
    ("\n\n  null", 3, "expected a JSON list"),
    ("", 1, "expected a JSON list"),
    ('[{"a": 1}\n {"a": 2}]', 2, "expected ',' or ']'"),
])
def test_not_a_list(tmp_path, text, line, problem):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as e:
        list(iter_json_array(path))
    assert_data_error(e, path, line)


def test_empty_and_compact_lists(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[]")
    assert list(iter_json_array(path)) == []
    path.write_text('[{"a": 1},{"a": [2, 3]} , {"a": "]"}]')
    assert list(iter_json_array(path, chunk_size=3)) == [(1, {"a": 1}), (1, {"a": [2, 3]}), (1, {"a": "]"})]


# ---------------------------------------------------------------- DPR's release as it comes

def _release_dataset(folder, **kw):
    return prepare(PrepareConfig(dataset=str(folder), **kw), warn=lambda m: None)


def test_dpr_release_gzipped_reads_as_shipped(tmp_path):
    files = write_dpr_release(tmp_path / "nq")
    assert sorted(p.name for p in files.values()) == ["biencoder-toy-dev.json.gz", "biencoder-toy-train.json.gz",
                                                      "psgs_w100.tsv.gz", "toy-test.csv"]
    ds, report = _release_dataset(tmp_path / "nq")
    # the corpus is psgs_w100 exactly: ids from 1, texts and titles as written
    assert ds.corpus == [Passage(pid, title, text) for pid, text, title in release_passages(12)]
    train, dev, test = (ds.splits[s] for s in ("train", "dev", "test"))
    assert [q.id for q in train] == [f"train-{n}" for n in range(6)]
    assert train[0] == Query("train-0", "what is the kw0a kw0b called", ("ans0",), {"1": 1})
    assert dev[1] == Query("dev-1", "what is the kw7a kw7b called", ("ans7",), {"8": 1})
    # the QA CSV test set: questions with their answers, no judgements
    assert test[0] == Query("test-0", "what is the kw8a kw8b called", ("ans8", "ANS8"), {})
    assert len(test) == 4
    assert report["test_queries"] == 4 and report["test_judgements"] == 0
    # QA questions are judged by their answers: not "unjudged"
    assert report["checks"] == {"duplicate_ids": 0, "empty_texts": 0, "missing_passages": 0,
                                "unjudged_queries": 0, "leakage": 0}
    # hard_negative_ctxs with DPR's BM25 scores, best first; negative_ctxs are not kept
    assert ds.negatives["train-0"] == [("2", 11.5), ("3", 10.5)]
    assert ds.negatives["dev-0"] == [("8", 11.5), ("9", 10.5)]
    assert set(ds.negatives) == {q.id for q in train + dev}


def test_dpr_release_plain_and_gzipped_read_the_same(tmp_path):
    write_dpr_release(tmp_path / "gz")
    write_dpr_release(tmp_path / "plain", compress=False)
    assert (tmp_path / "plain" / "psgs_w100.tsv").is_file()
    gz, plain = _release_dataset(tmp_path / "gz")[0], _release_dataset(tmp_path / "plain")[0]
    assert (gz.corpus, gz.splits, gz.negatives) == (plain.corpus, plain.splits, plain.negatives)


def test_gzip_is_streamed_and_its_lines_are_the_texts(tmp_path):
    # a gzipped file in several gzip members (as `cat a.gz b.gz` makes) reads as one text
    import gzip

    passages = release_passages(30)
    text = release_tsv(passages)
    half = text.index(b"\n16\t") + 1
    path = tmp_path / "psgs_w100.tsv.gz"
    path.write_bytes(gzip.compress(text[:half]) + gzip.compress(text[half:]))
    from dprpipe.dpr_format import read_dpr_passages

    got = [(line, p.id) for line, p in read_dpr_passages(path)]
    assert got == [(n + 2, str(n + 1)) for n in range(30)]


@pytest.mark.parametrize("where", ["tsv", "json"])
def test_truncated_gzip_names_the_line_where_its_text_ends(tmp_path, where):
    import zlib

    files = write_dpr_release(tmp_path / "nq", n_passages=200, train=range(0, 150))
    path = files["passages" if where == "tsv" else "train"]
    data = path.read_bytes()
    cut = data[: len(data) * 2 // 3]
    path.write_bytes(cut)
    text = zlib.decompressobj(31).decompress(cut)     # the reference: what the cut file still holds
    with pytest.raises(DataError, match="ends early") as e:
        _release_dataset(tmp_path / "nq")
    assert_data_error(e, path, text.count(b"\n") + 1)


def test_not_a_gzip_file_and_a_gzip_without_gz_name(tmp_path):
    files = write_dpr_release(tmp_path / "nq")
    data = files["passages"].read_bytes()
    files["passages"].write_bytes(b"id\ttext\ttitle\n")          # named .gz, not compressed
    with pytest.raises(DataError, match="not a gzip file") as e:
        _release_dataset(tmp_path / "nq")
    assert_data_error(e, files["passages"], None)
    files["passages"].unlink()
    (tmp_path / "nq" / "psgs_w100.tsv").write_bytes(data)        # compressed, named .tsv
    with pytest.raises(DataError, match="looks gzip-compressed") as e:
        _release_dataset(tmp_path / "nq")
    assert_data_error(e, tmp_path / "nq" / "psgs_w100.tsv", 1)


def test_passage_id_missing_from_the_passages_file(tmp_path):
    write_dpr_release(tmp_path / "nq", compress=False)
    path = tmp_path / "nq" / "biencoder-toy-train.json"
    items = json.loads(path.read_text())
    items[3]["hard_negative_ctxs"][1]["passage_id"] = "777"
    path.write_text(json.dumps(items, indent=4))
    start = 2 + sum(len(json.dumps(it, indent=4).splitlines()) for it in items[:3])
    with pytest.raises(DataError, match="passage_id '777' of 'hard_negative_ctxs' is not in psgs_w100.tsv") as e:
        _release_dataset(tmp_path / "nq")
    assert_data_error(e, path, start)


def test_provided_negatives_scores():
    from dprpipe.dpr_format import provided_negatives

    # no scores (or not all numeric): reciprocal rank of the file's order
    assert provided_negatives([("a", None), ("b", "7"), ("c", 2.0)], []) == [("a", 1.0), ("b", 0.5), ("c", 0.3333)]
    # all numeric: sorted by score, ties in file order; positives and repeats left out
    assert provided_negatives([("a", 1), ("b", 5), ("p", 9), ("c", 5), ("b", 0.1)], ["p"]) == \
        [("b", 5.0), ("c", 5.0), ("a", 1.0)]
    assert provided_negatives([("a", True)], []) == [("a", 1.0)]         # a bool is not a score
    assert provided_negatives([("a", float("nan")), ("b", 1)], []) == [("a", 1.0), ("b", 0.5)]
    assert provided_negatives([], []) == []


def test_files_without_hard_negatives_provide_none(tmp_path):
    items = [dpr_item(f"q{i}", ["a"], positives=[{"title": "", "text": f"p{i}", "passage_id": str(i)}])
             for i in range(3)]
    items_hard = [dpr_item("qh", ["a"], positives=[{"title": "", "text": "ph", "passage_id": "h1"}],
                           hard=[{"title": "", "text": "p0", "passage_id": "0"}])]
    ds = read_dataset(write_dpr(tmp_path / "dpr", {"train": items, "dev": items_hard}))
    assert ds.negatives == {"dev-0": [("0", 1.0)]}


# ---------------------------------------------------------------- QA CSV test sets

@pytest.mark.parametrize("line,question,answers", [
    ("who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']",
     "who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",)),
    ('when was it built\t["1889", "in 1889"]', "when was it built", ("1889", "in 1889")),
    # csv-quoted fields (the csv module quotes a field holding a quote): a Python list with "
    ('"what did ""he"" say"\t"[\'hi\', ""it\'s""]"', 'what did "he" say', ("hi", "it's")),
    ("caf\u00e9?\t['\\u00e9t\u00e9']", "caf\u00e9?", ("\u00e9t\u00e9",)),
    ("trailing cr\t['x']\r", "trailing cr", ("x",)),
])
def test_qa_csv_rows(tmp_path, line, question, answers):
    folder = tmp_path / "qa"
    write_lines(folder / "nq-test.csv", [line])
    write_lines(folder / "passages.tsv", ["id\ttext\ttitle", "1\tsome text\tT"])
    ds = read_dataset(folder)
    assert ds.splits == {"test": [Query("test-0", question, answers, {})]}


@pytest.mark.parametrize("line,problem", [
    ("a question and no answers", "no answer list"),
    ("q\t['a']\textra", "expected 2 tab-separated columns"),
    ("q\t[Paris]", "is not a JSON list of strings"),
    ("q\t['unclosed", "is not a JSON list of strings"),
    ("q\t__import__('os')", "is not a JSON list of strings"),    # never evaluated
    ("q\t'Paris'", "must be a list of strings, got str"),
    ("q\t[1, 2]", "must be a list of strings"),
    ("q\t[]", "the answer list is empty"),
    ("q\t['\\ud800']", "unpaired UTF-16 surrogate"),
    ('q\t["\\ud800"]', "unpaired UTF-16 surrogate"),
    ("q\t" + "[" * 5000 + "]" * 5000, "not a JSON list of strings|nested too deeply"),
    ("q\0\t['a']", "NUL byte"),
])
def test_bad_qa_csv_row_names_file_and_line(tmp_path, line, problem):
    folder = tmp_path / "qa"
    path = write_lines(folder / "nq-test.csv", ["fine one\t['a']", "", line, "fine two\t['b']"])
    write_lines(folder / "passages.tsv", ["id\ttext\ttitle", "1\tsome text\tT"])
    with pytest.raises(DataError, match=problem) as e:
        read_dataset(folder)
    assert_data_error(e, path, 3)
    assert "\n" not in str(e.value)


def test_invalid_utf8_inside_a_gzip_names_its_line(tmp_path):
    import gzip

    files = write_dpr_release(tmp_path / "nq")
    lines = gzip.decompress(files["passages"].read_bytes()).split(b"\n")
    lines[5] = lines[5].replace(b"valley", b"vall\xffey")
    files["passages"].write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        _release_dataset(tmp_path / "nq")
    assert_data_error(e, files["passages"], 6)


def test_corrupt_gzip_data_is_one_error_naming_the_file(tmp_path):
    files = write_dpr_release(tmp_path / "nq", n_passages=300, train=range(0, 200))
    data = bytearray(files["train"].read_bytes())
    for at in range(len(data) // 2, len(data) // 2 + 64):     # a damaged stretch in the middle
        data[at] ^= 0x5A
    files["train"].write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        _release_dataset(tmp_path / "nq")
    # zlib sees the damage (or the JSON it garbled does) at a line of this file
    assert e.value.path == str(files["train"]) and e.value.line is not None and "\n" not in str(e.value)
