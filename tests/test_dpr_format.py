"""dprpipe.dpr_format: reading DPR folders and the streaming JSON list parser, on tiny files written here."""

import hashlib
import json
from pathlib import Path

import pytest
from dataset_fixtures import assert_data_error, dpr_item, write_dpr
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
