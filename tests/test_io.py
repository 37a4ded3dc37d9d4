"""Atomic writes (also under SIGKILL), killed writers' temporaries, checksums, run files and line readers."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dprpipe.io import (CHECKSUMS, DataError, atomic_dir, atomic_memmap, atomic_write, read_jsonl, read_run,
                        read_tsv, verify_checksums, write_checksums, write_json, write_jsonl, write_run)


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


# ---------------------------------------------------------------- killed writers (SIGKILL: no cleanup runs)

# A child that rewrites folder `out` (two files) with atomic_dir and SIGKILLs itself just before
# its n-th step (a removal or a rename).
KILLED_WRITER = r"""
import os, signal, sys
from pathlib import Path
import dprpipe.io as io
n, calls = int(sys.argv[2]), [0]
def step(fn):
    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper
io.os.replace, io._remove = step(os.replace), step(io._remove)
with io.atomic_dir(Path(sys.argv[1]) / "out") as tmp:
    (tmp / "a.txt").write_text("new a")
    (tmp / "b.txt").write_text("new b")
"""


def _contents(folder: Path) -> dict | None:
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else None


def test_killed_folder_writer_leaves_the_old_folder_the_new_one_or_none(tmp_path):
    old, new = {"a.txt": "old a", "b.txt": "old b"}, {"a.txt": "new a", "b.txt": "new b"}
    seen = []
    for n in range(1, 8):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for name, text in old.items():
            (out / name).write_text(text)
        r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(n)], capture_output=True,
                           text=True, timeout=60)
        state = _contents(out)
        seen.append(state)
        if r.returncode == 0:                     # n is past the last step: the write completed
            assert state == new and sorted(os.listdir(tmp_path)) == ["out"]
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        # never a partial or mixed folder; missing between the removal and the rename (DVC reruns the stage)
        assert state in (old, new, None), (n, state)
        # the next write cleans up whatever the killed one left
        with atomic_dir(out) as tmp:
            (tmp / "c.txt").write_text("c")
        assert sorted(os.listdir(tmp_path)) == ["out"] and _contents(out) == {"c.txt": "c"}
    assert seen[0] == old and seen[-1] == new and None in seen   # the kills covered every step


def test_killed_file_writer_keeps_the_old_file_and_its_temporary_is_removed_later(tmp_path):
    path = tmp_path / "run.tsv"
    path.write_text("old\n")
    code = ("import os, signal, sys; import dprpipe.io as io\n"
            "io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "with io.atomic_write(sys.argv[1]) as f: f.write('new\\n' * 1000)")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == [".run.tsv.tmp", "run.tsv"]      # the killed writer's temporary
    write_run(path, {"q": [("d", 1.0)]})
    assert os.listdir(tmp_path) == ["run.tsv"]


# A child that SIGKILLs itself in the middle of filling an atomic folder (a memmap half written
# inside it) and of an atomic file next to it: the temporaries of two outputs are left behind.
KILLED_MID_BODY = r"""
import os, signal, sys
from pathlib import Path
import dprpipe.io as io
root = Path(sys.argv[1])
with io.atomic_dir(root / "emb") as tmp, io.atomic_write(root / "run.tsv") as f:
    with io.atomic_memmap(tmp / "passages.npy", (1000, 8)) as arr:
        arr[:500] = 1.0
        f.write("q\td\t1.0\n")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writers_temporaries_go_with_the_next_write_of_their_own_output(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "passages.npy").write_bytes(b"old")
    r = subprocess.run([sys.executable, "-c", KILLED_MID_BODY, str(tmp_path)], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert sorted(os.listdir(tmp_path)) == [".emb.tmp", ".run.tsv.tmp", "emb"]
    assert sorted(os.listdir(tmp_path / ".emb.tmp")) == [".passages.npy.tmp"]     # the half-filled memmap
    assert (tmp_path / "emb" / "passages.npy").read_bytes() == b"old"           # the old output is intact
    with atomic_dir(tmp_path / "emb") as tmp:
        with atomic_memmap(tmp / "passages.npy", (2, 8)) as arr:
            arr[:] = 2.0
    # the folder's temporary is gone; the other output's is left to that output's next write
    assert sorted(os.listdir(tmp_path)) == [".run.tsv.tmp", "emb"]
    assert os.listdir(tmp_path / "emb") == ["passages.npy"]
    write_run(tmp_path / "run.tsv", {"q": [("d", 2.0)]})
    assert sorted(os.listdir(tmp_path)) == ["emb", "run.tsv"]


# ---------------------------------------------------------------- checksums of artifact folders

def test_checksums_round_trip_and_sha256sum_format(tmp_path):
    import hashlib

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "sub" / "b.txt").write_text("b")
    assert verify_checksums(tmp_path, "rerun") is False        # no manifest: nothing to check
    write_checksums(tmp_path)
    lines = (tmp_path / CHECKSUMS).read_text().splitlines()
    zeros, b = hashlib.sha256(bytes(100)).hexdigest(), hashlib.sha256(b"b").hexdigest()
    assert lines == [f"{zeros}  a.bin", f"{b}  sub/b.txt"]
    assert verify_checksums(tmp_path, "rerun") is True
    (tmp_path / "new.txt").write_text("files the manifest does not list are not checked")
    assert verify_checksums(tmp_path, "rerun") is True


@pytest.mark.parametrize("damage,match", [
    (lambda f: (f / "a.bin").write_bytes(b"\x00" * 99), "a.bin: contents differ"),
    (lambda f: (f / "a.bin").unlink(), "a.bin: missing"),
    (lambda f: (f / CHECKSUMS).write_text("zz  a.bin\n"), f"{CHECKSUMS}:1: not a sha256sum line"),
    (lambda f: (f / CHECKSUMS).write_text("0" * 64 + "  ../outside\n"), "not a sha256sum line"),
])
def test_checksums_name_the_bad_file(tmp_path, damage, match):
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    write_checksums(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=match) as e:
        verify_checksums(tmp_path, "rerun the stage")
    assert str(e.value).endswith("rerun the stage")


# ---------------------------------------------------------------- reading: one clear line per problem

def test_data_error_is_one_short_line():
    err = DataError("f.jsonl", 3, "first\nsecond " + "x" * 10_000)
    assert "\n" not in str(err) and len(str(err)) < 520 and str(err).startswith("f.jsonl:3: first second x")


def test_a_carriage_return_does_not_end_a_line(tmp_path):
    # JSON allows a bare CR as whitespace; it must not split the record or shift the line numbers
    (tmp_path / "x.jsonl").write_bytes(b'{"a":\r 1}\r\n{"b": 2}\n{"c": \n')
    it = read_jsonl(tmp_path / "x.jsonl")
    assert [next(it), next(it)] == [(1, {"a": 1}), (2, {"b": 2})]
    with pytest.raises(DataError) as e:
        next(it)
    assert e.value.line == 3


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n')
    real_open = builtins.open

    def no_permission(file, *args, **kwargs):   # as for a mode-000 file (root could read one)
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    with pytest.raises(DataError, match=r"x.jsonl: cannot read the file \(Permission denied\)"):
        list(read_jsonl(path))
