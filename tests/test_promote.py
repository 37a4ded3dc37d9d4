"""dprpipe.promote: the quality gate's verdicts, versions, release records and release folders."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from dprpipe.config import ConfigError, from_mapping
from dprpipe.evaluate import EvaluateConfig
from dprpipe.mine import MineConfig
from dprpipe.promote import (GateConfig, build_release, compare, failures, gto_version, next_version,
                             release_record, release_versions, version_number)
from dprpipe.release import RELEASES, read_current, read_release, set_current

PROMOTED = {"dpr": {"ndcg@10": 0.7031, "recall@100": 0.946}, "hybrid": {"ndcg@10": 0.7628, "recall@100": 0.971},
            "bm25": {"ndcg@10": 0.6771}}


def gate(**max_drop) -> GateConfig:
    return from_mapping(GateConfig, {"max_drop": max_drop}, "gate")


# ---------------------------------------------------------------- the gate


def test_default_gate_covers_dense_and_hybrid():
    cfg = GateConfig()
    assert {s: dict(m) for s, m in cfg.max_drop.items()} == {
        "dpr": {"ndcg@10": 0.01, "recall@100": 0.01}, "hybrid": {"ndcg@10": 0.01, "recall@100": 0.01}}
    # same figures: every gated metric passes, in the config's order
    verdicts = compare(PROMOTED, PROMOTED, cfg)
    assert [(v.system, v.metric, v.passed, v.drop) for v in verdicts] == [
        ("dpr", "ndcg@10", True, 0.0), ("dpr", "recall@100", True, 0.0),
        ("hybrid", "ndcg@10", True, 0.0), ("hybrid", "recall@100", True, 0.0)]


@pytest.mark.parametrize("new, passed, drop", [
    (0.7031, True, 0.0),
    (0.6931, True, 0.01),        # exactly max_drop passes (0.7031 - 0.6931 is 0.01000000000000001 in floats)
    (0.6930, False, 0.0101),
    (0.5000, False, 0.2031),
    (0.8000, True, -0.0969),     # a gain
])
def test_a_drop_beyond_max_drop_fails(new, passed, drop):
    [v] = compare({"dpr": {"ndcg@10": new}}, PROMOTED, gate(dpr={"ndcg@10": 0.01}))
    assert (v.promoted, v.new, v.passed, v.drop) == (0.7031, new, passed, drop)
    assert failures([v]) == ([] if passed else [v])


def test_each_metric_has_its_own_margin():
    cfg = gate(dpr={"ndcg@10": 0.05}, hybrid={"ndcg@10": 0.0, "mrr@10": 0.02})
    new = {"dpr": {"ndcg@10": 0.6600}, "hybrid": {"ndcg@10": 0.7627, "mrr@10": 0.7}}
    promoted = {**PROMOTED, "hybrid": {**PROMOTED["hybrid"], "mrr@10": 0.7319}}
    got = {(v.system, v.metric): v.passed for v in compare(new, promoted, cfg)}
    assert got == {("dpr", "ndcg@10"): True, ("hybrid", "ndcg@10"): False, ("hybrid", "mrr@10"): False}
    assert [v.describe() for v in failures(compare(new, promoted, cfg))] == [
        "hybrid ndcg@10: 0.7628 -> 0.7627 (drop 0.0001 > 0)",
        "hybrid mrr@10: 0.7319 -> 0.7000 (drop 0.0319 > 0.02)"]


def test_missing_figures():
    cfg = gate(dpr={"ndcg@10": 0.01, "mrr@10": 0.01})
    # the run lacks a gated figure: it fails; the promoted release lacks one: nothing to compare, it passes
    [ndcg, mrr] = compare({"dpr": {"mrr@10": 0.5}}, {"dpr": {"ndcg@10": 0.7}}, cfg)
    assert not ndcg.passed and ndcg.describe() == "dpr ndcg@10: 0.7000 -> missing from the run's metrics"
    assert mrr.passed and mrr.drop is None and mrr.describe() == "dpr mrr@10: no promoted figure -> 0.5000 (not compared)"
    [v] = compare({}, {}, gate(zeroshot={"ndcg@10": 0.0}))
    assert not v.passed
    [v] = compare({"dpr": {"ndcg@10": "0.7"}}, PROMOTED, gate(dpr={"ndcg@10": 0.01}))
    assert not v.passed, "a figure that is not a number is missing"


@pytest.mark.parametrize("values, message", [
    ({"max_drop": {}}, "max_drop must map systems"),
    ({"max_drop": 0.01}, "max_drop must map systems"),
    ({"max_drop": {"dpr": 0.01}}, "max_drop.dpr must map metrics"),
    ({"max_drop": {"dpr": {"ndcg@10": -0.01}}}, r"max_drop.dpr.ndcg@10 must be a number >= 0"),
    ({"max_drop": {"dpr": {"ndcg@10": True}}}, r"max_drop.dpr.ndcg@10 must be a number >= 0"),
    ({"max_drop": {"dpr": {"ndcg@10": "x"}}}, r"max_drop.dpr.ndcg@10 must be a number >= 0"),
    ({"max_drops": {}}, "unknown key"),
])
def test_bad_gate_params_fail_loudly(values, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_mapping(GateConfig, values, "gate")
    assert e.value.section == "gate"


def test_gate_config_is_read_only():
    cfg = gate(dpr={"ndcg@10": 1})
    assert cfg.max_drop["dpr"]["ndcg@10"] == 1.0 and isinstance(cfg.max_drop["dpr"]["ndcg@10"], float)
    with pytest.raises(TypeError):
        cfg.max_drop["dpr"]["ndcg@10"] = 0.5


# ---------------------------------------------------------------- versions


def test_versions():
    assert next_version([]) == "v1"
    assert next_version(["v1", "v2"]) == "v3"
    assert next_version(["v9", "v10.0.0", "v2"]) == "v11"        # release folders and GTO versions, numerically
    assert next_version(["latest", "v0", "v01", ".v5.tmp", "v3.1.0"]) == "v1"
    assert version_number("v12") == 12 and version_number("v12.0.0") == 12 and version_number("12") is None
    assert gto_version("v3") == "v3.0.0"
    with pytest.raises(ValueError):
        gto_version("3")


# ---------------------------------------------------------------- release folders


@pytest.fixture
def outputs(tmp_path):
    """A workspace's model folder, index folder and corpus (small stand-ins)."""
    ws = tmp_path / "ws"
    (ws / "models" / "dpr" / "query").mkdir(parents=True)
    (ws / "models" / "dpr" / "dpr_config.json").write_text('{"shared": true}\n')
    (ws / "models" / "dpr" / "query" / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (ws / "index").mkdir()
    (ws / "index" / "index.faiss").write_bytes(b"\x00\x01faiss")
    (ws / "index" / "ids.txt").write_text("d1\nd2\n")
    (ws / "corpus.jsonl").write_text('{"id": "d1", "title": "", "text": "a"}\n{"id": "d2", "title": "", "text": "b"}\n')
    return ws


def record(version: str, **kw) -> dict:
    return release_record(version, "0123abcd" * 5, PROMOTED, MineConfig(), EvaluateConfig(), **kw)


def test_release_record():
    when = datetime(2026, 12, 3, 18, 30, tzinfo=timezone(timedelta(hours=2)))
    rec = release_record("v2", "f" * 40, PROMOTED, MineConfig(k1=1.2, stemmer="none"),
                         EvaluateConfig(hybrid_weight=0.5), {"models/dpr": "abc.dir"}, when)
    assert rec == {
        "version": "v2", "git_revision": "f" * 40, "git_tag": "dpr@v2.0.0", "metrics": PROMOTED,
        "bm25": {"k1": 1.2, "b": 0.4, "epsilon": 0.25, "stemmer": "none", "stopwords": True, "use_title": True},
        "hybrid": {"weight": 0.5, "normalize": True},
        "outputs": {"models/dpr": "abc.dir"}, "time": "2026-12-03T16:30:00+00:00"}
    assert json.loads(json.dumps(rec)) == rec, "release.json is plain JSON"


def test_build_release_copies_the_outputs(outputs, tmp_path):
    root = tmp_path / "promoted"
    rel = build_release(root, record("v1"), outputs / "models" / "dpr", outputs / "index", outputs / "corpus.jsonl")
    assert rel.path == root / RELEASES / "v1" and rel.version == "v1"
    assert rel.record == json.loads((rel.path / "release.json").read_text()) == record("v1") | {"time": rel.record["time"]}
    for src, dst in [(outputs / "models" / "dpr", rel.model), (outputs / "index", rel.index)]:
        files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
        assert all((src / f).read_bytes() == (dst / f).read_bytes() for f in files)
    assert rel.corpus.read_bytes() == (outputs / "corpus.jsonl").read_bytes()
    # a copy: changing the workspace (the next run) leaves the release as it was
    (outputs / "index" / "index.faiss").write_bytes(b"new")
    assert (rel.index / "index.faiss").read_bytes() == b"\x00\x01faiss"
    assert sorted(p.name for p in (root / RELEASES).iterdir()) == ["v1"], "no temporary left"
    assert release_versions(root) == ["v1"]


def test_a_release_is_never_overwritten(outputs, tmp_path):
    root = tmp_path / "promoted"
    args = (outputs / "models" / "dpr", outputs / "index", outputs / "corpus.jsonl")
    first = build_release(root, record("v1"), *args)
    before = (first.path / "release.json").read_text()
    with pytest.raises(FileExistsError, match="v1 exists"):
        build_release(root, record("v1") | {"metrics": {}}, *args)
    assert (first.path / "release.json").read_text() == before


def test_a_failed_build_leaves_no_release(outputs, tmp_path):
    root = tmp_path / "promoted"
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        build_release(root, record("v1"), outputs / "models" / "dpr", outputs / "index", outputs / "missing.jsonl")
    assert not (root / RELEASES / "v1").exists()
    (outputs / "index" / "zz-dangling").symlink_to(outputs / "gone")
    with pytest.raises(OSError, match="zz-dangling"):   # the copy fails half way: the temporary goes
        build_release(root, record("v1"), outputs / "models" / "dpr", outputs / "index", outputs / "corpus.jsonl")
    assert not (root / RELEASES / "v1").exists()
    assert [p.name for p in (root / RELEASES).iterdir()] == []
    with pytest.raises(ValueError, match="not a release version"):
        build_release(root, record("v1") | {"version": "1.0"}, outputs / "models" / "dpr", outputs / "index",
                      outputs / "corpus.jsonl")


def test_promotion_and_rollback_switch_current(outputs, tmp_path):
    root = tmp_path / "promoted"
    args = (outputs / "models" / "dpr", outputs / "index", outputs / "corpus.jsonl")
    assert read_current(root) is None
    build_release(root, record("v1"), *args)
    set_current(root, "v1")
    build_release(root, record("v2"), *args)
    assert read_current(root).version == "v1", "a built release is not served until current.json names it"
    set_current(root, "v2")
    assert read_current(root).version == "v2"
    set_current(root, "v1")   # the rollback: the old folder is still there
    assert read_current(root) == read_release(root, "v1")
    assert release_versions(root) == ["v1", "v2"]
