"""Atomic writes and run files."""

import os

import pytest

from dprpipe.io import (DataError, atomic_dir, atomic_write, read_jsonl, read_run, read_tsv, write_json,
                        write_jsonl, write_run)


class Boom(Exception):
    pass


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_write(path) as f:
        f.write("new")
        assert not path.exists()              # nothing visible until the body finishes
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.txt"]


def test_atomic_write_keeps_old_file_when_body_raises(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Boom):
        with atomic_write(path) as f:
            f.write("half of the new conte")
            raise Boom
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # no temporary file left behind


def test_atomic_write_interrupted_leaves_nothing(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "wb") as f:
            f.write(b"\x00\x01")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_write_binary_and_utf8(tmp_path):
    with atomic_write(tmp_path / "b", "wb") as f:
        f.write(b"\xff\x00")
    assert (tmp_path / "b").read_bytes() == b"\xff\x00"
    with atomic_write(tmp_path / "t") as f:
        f.write("caf\u00e9")
    assert (tmp_path / "t").read_bytes() == "caf\u00e9".encode("utf-8")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_mode_a_plain_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        (tmp_path / "plain_dir").mkdir()
        with atomic_write(tmp_path / "atomic") as f:
            f.write("x")
        with atomic_dir(tmp_path / "atomic_dir") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic") == mode("plain") == 0o666 & ~umask
    assert mode("atomic_dir") == mode("plain_dir") == 0o777 & ~umask


def test_atomic_dir_success_replaces_old_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "a.txt").write_text("a")
        assert (out / "stale.txt").exists()   # the old folder is intact until the end
    assert sorted(os.listdir(out)) == ["a.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_keeps_old_folder_when_body_raises(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(Boom):
        with atomic_dir(out) as tmp:
            (tmp / "partial.txt").write_text("partial")
            raise Boom
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "keep"
    assert os.listdir(tmp_path) == ["out"]    # no temporary folder left behind


def test_atomic_dir_new_folder_not_created_on_failure(tmp_path):
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "new"):
            raise Boom
    assert os.listdir(tmp_path) == []


def test_atomic_write_inside_atomic_dir_failure(tmp_path):
    # the pattern of the stages: files written atomically into a folder written atomically
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "out") as tmp:
            write_jsonl(tmp / "a.jsonl", [{"x": 1}])
            with atomic_write(tmp / "b.jsonl") as f:
                f.write("{")
                raise Boom
    assert os.listdir(tmp_path) == []


def test_run_round_trip(tmp_path):
    run = {"q1": [("d3", 12.5), ("d1", 3.25), ("d2", -0.5)], "q2": [("d9", 1.0)], "q 3": [("d#1", 0.123456)]}
    write_run(tmp_path / "run.tsv", run)
    assert (tmp_path / "run.tsv").read_text().splitlines()[0] == "q1\td3\t12.500000"
    assert read_run(tmp_path / "run.tsv") == run


def test_read_run_sorts_by_score_and_keeps_file_order_for_ties(tmp_path):
    (tmp_path / "run.tsv").write_text("q\ta\t1.0\nq\tb\t3.0\nq\tc\t1.0\nq\td\t2\n")
    assert read_run(tmp_path / "run.tsv") == {"q": [("b", 3.0), ("d", 2.0), ("a", 1.0), ("c", 1.0)]}


def test_read_run_errors(tmp_path):
    (tmp_path / "run.tsv").write_text("q\ta\t1.0\nq\tb\tNaN?\n")
    with pytest.raises(DataError, match="not a number") as e:
        read_run(tmp_path / "run.tsv")
    assert (e.value.line, e.value.path) == (2, str(tmp_path / "run.tsv"))
    (tmp_path / "run.tsv").write_text("q\ta\t1.0\n\nq\tb\n")
    with pytest.raises(DataError, match="3 tab-separated columns") as e:
        read_run(tmp_path / "run.tsv")
    assert str(e.value).startswith(f"{tmp_path / 'run.tsv'}:3: ")
    with pytest.raises(DataError, match="file not found"):
        read_run(tmp_path / "missing.tsv")


def test_jsonl_round_trip_and_line_numbers(tmp_path):
    records = [{"a": 1}, {"b": "caf\u00e9\nline"}, {}]
    assert write_jsonl(tmp_path / "x.jsonl", records) == 3
    assert list(read_jsonl(tmp_path / "x.jsonl")) == [(1, {"a": 1}), (2, {"b": "caf\u00e9\nline"}), (3, {})]
    assert "caf\u00e9" in (tmp_path / "x.jsonl").read_text(encoding="utf-8")  # not \\u-escaped


def test_read_tsv_crlf_and_header(tmp_path):
    (tmp_path / "x.tsv").write_bytes(b"ID\tText\r\n1\ta\r\n\r\n2\tb\r\n")
    assert list(read_tsv(tmp_path / "x.tsv", 2, header=("id", "text"))) == [(2, ["1", "a"]), (4, ["2", "b"])]
    # a header is only skipped on line 1
    (tmp_path / "y.tsv").write_text("1\ta\nid\ttext\n")
    assert [f for _, f in read_tsv(tmp_path / "y.tsv", 2, header=("id", "text"))] == [["1", "a"], ["id", "text"]]


def test_write_json(tmp_path):
    write_json(tmp_path / "m.json", {"bm25": {"ndcg@10": 0.5}})
    assert (tmp_path / "m.json").read_text() == '{\n  "bm25": {\n    "ndcg@10": 0.5\n  }\n}\n'
