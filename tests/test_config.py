"""from_mapping: typed configs from params.yaml sections."""

import dataclasses

import pytest
import yaml

from dprpipe.bm25 import BM25Params
from dprpipe.config import from_mapping, to_dict
from dprpipe.data import PrepareConfig
from dprpipe.evaluate import EvaluateConfig
from dprpipe.mine import MineConfig


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
    assert to_dict(ev)["ks"] == [1, 10]


def test_project_params_yaml_loads():
    # the committed params.yaml must build every core config the stages read with these types
    import pathlib

    params = yaml.safe_load((pathlib.Path(__file__).parents[1] / "params.yaml").read_text())
    from_mapping(PrepareConfig, params["prepare"], "prepare")
    from_mapping(MineConfig, params["mine"], "mine")
    from_mapping(EvaluateConfig, params["evaluate"], "evaluate")


def test_docstring_examples():
    import doctest

    import dprpipe.config as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
