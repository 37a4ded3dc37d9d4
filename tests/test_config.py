"""from_mapping: typed configs from params.yaml sections."""

import dataclasses
import pathlib

import pytest
import yaml

from dprpipe.bm25 import BM25Params
from dprpipe.claims import ReportConfig
from dprpipe.config import from_mapping
from dprpipe.encode import EncodeConfig
from dprpipe.evaluate import EvaluateConfig
from dprpipe.index import IndexConfig
from dprpipe.dense_mine import DenseMineConfig
from dprpipe.mine import MineConfig
from dprpipe.model import EncoderConfig
from dprpipe.prepare import PrepareConfig
from dprpipe.promote import GateConfig
from dprpipe.rounds import RoundTwoConfig
from dprpipe.train import TrainConfig

PARAMS = pathlib.Path(__file__).parents[1] / "params.yaml"
SECTIONS = {"prepare": PrepareConfig, "mine": MineConfig, "mine_dense": DenseMineConfig, "model": EncoderConfig,
            "train": TrainConfig, "train_round2": RoundTwoConfig,
            "encode": EncodeConfig, "index": IndexConfig, "evaluate": EvaluateConfig, "report": ReportConfig,
            "gate": GateConfig}
"""The config each params.yaml section is read into by its stage (`gate`: by the release flow)."""


@dataclasses.dataclass(frozen=True)
class Cfg:
    n: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    ks: tuple[int, ...] = (1, 2)
    limit: int | None = None


def test_defaults_and_values():
    assert from_mapping(Cfg, None, "s") == Cfg()
    assert from_mapping(Cfg, {}, "s") == Cfg()
    cfg = from_mapping(Cfg, {"n": 3, "rate": 0.25, "flag": True, "name": "y", "ks": [5, 10], "limit": 7}, "s")
    assert cfg == Cfg(3, 0.25, True, "y", (5, 10), 7)


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError) as e:
        from_mapping(Cfg, {"n": 1, "colour": "red", "alpha": 2}, "train")
    msg = str(e.value)
    assert "'train'" in msg
    assert "unknown key(s) alpha, colour" in msg
    assert "known keys: n, rate, flag, name, ks, limit" in msg


@pytest.mark.parametrize("key,value,expected", [
    ("n", "3", "s.n: expected int, got str '3'"),
    ("n", 2.5, "s.n: expected int, got float 2.5"),
    ("n", True, "s.n: expected int, got bool True"),          # bool is an int subclass: still rejected
    ("rate", "fast", "s.rate: expected float, got str 'fast'"),
    ("rate", False, "s.rate: expected float, got bool"),
    ("flag", 1, "s.flag: expected bool, got int 1"),
    ("flag", "yes", "s.flag: expected bool, got str"),
    ("name", 5, "s.name: expected str, got int 5"),
    ("ks", 5, "s.ks: expected a list"),
    ("ks", [1, "2"], "s.ks: expected int, got str '2'"),
    ("ks", [1, True], "s.ks: expected int, got bool"),
    ("limit", "7", "s.limit"),
    ("limit", 1.5, "s.limit"),
])
def test_wrong_types_name_the_key(key, value, expected):
    with pytest.raises(ValueError) as e:
        from_mapping(Cfg, {key: value}, "s")
    assert expected in str(e.value)


@pytest.mark.parametrize("text, value", [("3e-05", 3e-5), ("1.0e-5", 1e-5), ("0.1", 0.1)])
def test_numeric_string_is_accepted_for_float(text, value):
    # DVC's `exp run -S train.lr=3e-5` writes `3e-05`, which YAML 1.1 loads as a string
    cfg = from_mapping(Cfg, {"rate": text}, "s")
    assert cfg.rate == value and type(cfg.rate) is float


def test_int_is_accepted_for_float():
    cfg = from_mapping(Cfg, {"rate": 1}, "s")
    assert cfg.rate == 1.0 and type(cfg.rate) is float
    assert type(from_mapping(BM25Params, {"k1": 2, "b": 0}, "mine").b) is float


def test_lists_become_tuples():
    cfg = from_mapping(Cfg, {"ks": [3, 1]}, "s")
    assert cfg.ks == (3, 1) and isinstance(cfg.ks, tuple)
    assert from_mapping(Cfg, {"ks": []}, "s").ks == ()
    assert from_mapping(Cfg, {"ks": (4,)}, "s").ks == (4,)


def test_optional_accepts_null():
    assert from_mapping(Cfg, {"limit": None}, "s").limit is None


def test_validation_in_post_init_still_runs():
    with pytest.raises(ValueError, match="k1 >= 0"):
        from_mapping(BM25Params, {"k1": -1}, "mine")


def test_project_configs_from_yaml_text():
    params = yaml.safe_load("""
prepare: {dataset: data/x, format: beir, max_words: 100, dev_fraction: 0, seed: 1}
mine: {k1: 1, b: 0.4, stemmer: none, stopwords: false, depth: 50}
evaluate: {ks: [1, 10], curve_ks: [1, 2], hybrid_weight: 2}
""")
    prep = from_mapping(PrepareConfig, params["prepare"], "prepare")
    assert prep == PrepareConfig("data/x", "beir", 100, 0.0, 1)
    mine = from_mapping(MineConfig, params["mine"], "mine")
    assert (mine.k1, mine.stemmer, mine.stopwords, mine.depth, mine.negatives) == (1.0, "none", False, 50, 30)
    ev = from_mapping(EvaluateConfig, params["evaluate"], "evaluate")
    assert ev.ks == (1, 10) and ev.hybrid_weight == 2.0


def test_every_params_section_has_its_config():
    params = yaml.safe_load(PARAMS.read_text())
    assert {k for k, v in params.items() if isinstance(v, dict)} == set(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_config_defaults_are_the_params_yaml_values(section):
    # one source of defaults: a config built without params.yaml is the one params.yaml gives
    cls, values = SECTIONS[section], yaml.safe_load(PARAMS.read_text())[section]
    assert sorted(values) == sorted(f.name for f in dataclasses.fields(cls)), "params.yaml lists every field"
    from_params, defaults = from_mapping(cls, values, section), cls()
    differ = {f.name: (getattr(defaults, f.name), getattr(from_params, f.name)) for f in dataclasses.fields(cls)
              if getattr(defaults, f.name) != getattr(from_params, f.name)}
    assert differ == {}, f"{cls.__name__} default vs params.yaml {section}: {differ}"


# ---------------------------------------------------------------- errors name the key, and the params file its line


def test_config_error_carries_section_and_key():
    from dprpipe.config import ConfigError

    with pytest.raises(ConfigError) as e:
        from_mapping(Cfg, {"n": "x"}, "s")
    assert (e.value.section, e.value.key) == ("s", "n")
    with pytest.raises(ConfigError) as e:
        from_mapping(Cfg, {1: 2, "n": 1}, "s")               # YAML keys can be ints: listed, not a TypeError
    assert e.value.key == 1 and "unknown key(s) 1" in str(e.value)
    with pytest.raises(ConfigError) as e:                    # __post_init__: the key its message names first
        from_mapping(PrepareConfig, {"dataset": "x", "dev_fraction": 1.5}, "prepare")
    assert e.value.key == "dev_fraction" and "dev_fraction must be in [0, 1)" in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), "nan", "NaN"])
def test_nan_is_not_a_number_here(value):
    with pytest.raises(ValueError, match="s.rate: expected a number, got NaN"):
        from_mapping(Cfg, {"rate": value}, "s")


def _load(tmp_path, text):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "stages"))
    from stage_cli import load_params

    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        return load_params(path, "prepare", PrepareConfig)
    except SystemExit as e:
        assert str(e.code).startswith(f"error: {path}") and "\n" not in str(e.code)
        return str(e.code)[len(f"error: {path}"):]


@pytest.mark.parametrize("text,expected", [
    ("mine: {}\nprepare:\n  dataset: x\n  max_word: 3\n", ":4: params section 'prepare': unknown key(s) max_word"),
    ("prepare:\n  dataset: x\n\n  max_words: three\n", ":4: prepare.max_words: expected int, got str 'three'"),
    ("prepare:\n  seed: 1\n  seed: 2\n", ":3: prepare.seed appears twice (first at line 2)"),
    ("prepare:\n  seed: 1\nprepare:\n  seed: 2\n", ":3: section 'prepare' appears twice (first at line 1)"),
    ("prepare:\n  seed: [1, 2\n  x: 3\n", ":3: not valid YAML"),
    ("prepare:\n\tseed: 1\n", ":2: not valid YAML"),
    ("prepare:\n  dataset: a\n  seed: \x07\n", ":3: not valid YAML (character #x0007 is not allowed)"),
    (b"prepare:\n  dataset: caf\xe9\n", ":2: not valid UTF-8"),
    ("- a\n- b\n", ":1: expected a mapping of sections"),
    ("prepare: 3\n", ":1: section 'prepare' must be a mapping"),
    ("prepare:\n  format: csv\n", ":2: params section 'prepare': format 'csv' is not a dataset format"),
    ('prepare:\n  dataset: "a\x85b"\n  seed: x\n', ":3: prepare.seed: expected int"),     # NEL: not a line end
    ("prepare: !!python/object:os.system {}\n", ":1: not valid YAML (could not determine a constructor"),
    ("prepare:\n  dataset: " + "[" * 5000 + "\n", ":2: not valid YAML"),
])
def test_params_file_errors_name_the_line(tmp_path, text, expected):
    got = _load(tmp_path, text)
    assert isinstance(got, str) and got.startswith(expected), got


def test_params_file_that_loads(tmp_path):
    assert _load(tmp_path, "") == PrepareConfig()
    assert _load(tmp_path, "\ufeffprepare:\n  seed: 4\n").seed == 4                   # a UTF-8 byte-order mark
    assert _load(tmp_path, "base: &b {seed: 3}\nprepare:\n  <<: *b\n  dataset: q\n") == \
        PrepareConfig(dataset="q", seed=3)                                              # YAML merge keys
    assert _load(tmp_path, "base: &b {sed: 3}\nprepare:\n  <<: *b\n").startswith(":1: ")   # merged key's line


def test_missing_params_file(tmp_path):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "stages"))
    from stage_cli import load_params

    with pytest.raises(SystemExit, match=r"^error: .*nowhere.yaml: cannot read the params file"):
        load_params(tmp_path / "nowhere.yaml", "prepare", PrepareConfig)


# ---------------------------------------------------------------- services listen on 127.0.0.1


@pytest.mark.slow   # a fresh interpreter importing prefect: ~5-10 s
def test_services_listen_on_loopback_by_default(tmp_path):
    # what the serve process (flows/deploy.py) and `prefect server start` would bind, with no user
    # profile or PREFECT_* variable in the way; the runner reads its host in a thread of its own
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    code = f"""
import json, sys, threading
sys.path.insert(0, {str(root)!r})
import flows.deploy as deploy
from prefect.settings import (PREFECT_CLIENT_METRICS_ENABLED, PREFECT_RUNNER_SERVER_ENABLE,
                              PREFECT_RUNNER_SERVER_HOST, PREFECT_SERVER_API_HOST)
seen = {{}}
t = threading.Thread(target=lambda: seen.update(runner=PREFECT_RUNNER_SERVER_HOST.value()))
t.start(); t.join()
print(json.dumps({{"runner": seen["runner"], "server": PREFECT_SERVER_API_HOST.value(), "const": deploy.LOCAL_HOST,
                  # off by default; on, they would listen on every interface (Prefect has no host for them)
                  "runner_webserver_on": PREFECT_RUNNER_SERVER_ENABLE.value(),
                  "client_metrics_on": PREFECT_CLIENT_METRICS_ENABLED.value()}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "runner": "127.0.0.1", "server": "127.0.0.1", "const": "127.0.0.1",
        "runner_webserver_on": False, "client_metrics_on": False}


def test_documented_service_commands_bind_loopback():
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[1]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]   # the Prefect commands are in docs/prefect.md
    readme = "\n".join(p.read_text() for p in docs)
    starts = re.findall(r"prefect server start[^\n`]*", readme)
    assert starts and all("--host 127.0.0.1" in s for s in starts), starts
    workers = re.findall(r"prefect worker start[^\n`]*", readme)
    assert all("--with-healthcheck" not in w for w in workers), workers   # its health server binds every interface
    sources = [*docs, root / "prefect.yaml", *(root / "flows").glob("*.py"),
               *(root / "dprpipe").glob("*.py"), *(root / "stages").glob("*.py")]
    wide = [p.name for p in sources if re.search(r"0\.0\.0\.0|host\s*=\s*['\"]{2}", p.read_text())]
    assert wide == [], f"listening on every interface: {wide}"
    # a Dask cluster the flows start: scheduler and workers on loopback, no dashboard on every interface
    for path in (root / "flows").glob("*.py"):
        text = path.read_text()
        hosts = re.findall(r"""["']?host["']?\s*[:=]\s*["']([^"']*)["']""", text)
        dashboards = re.findall(r"""dashboard_address["']?\s*[:=]\s*([^,)}\n]+)""", text)
        assert all(h == "127.0.0.1" for h in hosts), (path.name, hosts)
        assert all(d.strip() == "None" or "127.0.0.1" in d for d in dashboards), (path.name, dashboards)
