"""dvc.yaml against the code: each stage depends on exactly the project modules its script imports,
and on whole params sections, the ones its script reads.

The imports are followed through the project (stages/, dprpipe/, flows/) with `ast`: those a
module runs when it is imported (its top level, `if` and `try` blocks included), and all of the
stage script's own (its main runs them); an import inside a core function runs only if the stage
calls it (e.g. the search CLI's), so it is not followed. A module added to a stage's import chain
and forgotten in dvc.yaml, or a dep left behind after a move, fails here rather than leaving DVC
blind to a code change.
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the default pipeline, and round two's (enabled as round2/dvc.yaml; its paths are relative to the root)
STAGES = {**yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"],
          **{f"round2/dvc.yaml:{name}": stage
             for name, stage in yaml.safe_load((ROOT / "round2" / "pipeline.yaml").read_text())["stages"].items()}}


def _module_file(name: str, script_dir: Path) -> Path | None:
    """The project file of an absolute module name, or None outside the project (a library)."""
    parts = name.split(".")
    for base in (script_dir, ROOT):
        path = base.joinpath(*parts).with_suffix(".py")
        if path.is_file():
            return path
    return None


def _import_nodes(tree: ast.Module, everywhere: bool) -> list[ast.AST]:
    """The import statements of a module: all of them, or those that run when it is imported."""
    if everywhere:
        return list(ast.walk(tree))
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [n for field in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, field, [])]
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return out


def _imports(path: Path, script_dir: Path, everywhere: bool = False) -> set[Path]:
    """The project files `path` imports directly (package __init__ files aside)."""
    package = path.relative_to(ROOT).parent.as_posix().replace("/", ".")
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)), everywhere):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports a module; `from mod import name` imports mod
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            file = _module_file(name, script_dir)
            if file is not None and file.name != "__init__.py":
                found.add(file)
    return found


def imported_files(script: Path) -> set[str]:
    """Every project file the script imports, transitively, as dvc.yaml paths (the script included)."""
    todo, seen = [script], {script}
    while todo:
        path = todo.pop()
        for file in _imports(path, script.parent, everywhere=path == script):
            if file not in seen:
                seen.add(file)
                todo.append(file)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _script(stage: dict) -> Path:
    [script] = [w for w in stage["cmd"].split() if w.startswith("stages/") and w.endswith(".py")]
    return ROOT / script


def _read_sections(script: Path) -> set[str]:
    """The params sections the script loads (`load_params(path, "<section>", Config)`)."""
    return {node.args[1].value for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_params"
            and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_modules_the_stage_imports(name):
    stage = STAGES[name]
    listed = {d for d in stage["deps"] if d.endswith(".py")}
    imported = imported_files(_script(stage))
    assert {"missing": sorted(imported - listed), "not imported": sorted(listed - imported)} == \
        {"missing": [], "not imported": []}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_params_are_whole_sections_the_stage_reads(name):
    stage = STAGES[name]
    params = stage.get("params", [])
    assert all(isinstance(p, str) and "." not in p for p in params), f"{name}: list whole sections: {params}"
    assert set(params) <= _read_sections(_script(stage))


def test_a_stage_reads_every_section_it_loads_unless_exact():
    # the sections a stage script loads are all in its params, except the exact-search baseline's index
    for name, stage in STAGES.items():
        loaded = _read_sections(_script(stage))
        if "--exact" in stage["cmd"]:
            loaded -= {"index"}            # --exact builds the exact index from IndexConfig() alone
        if _script(stage).name == "encode.py" and "--model base" not in stage["cmd"]:
            loaded -= {"model"}            # a checkpoint carries its own encoder config
        assert loaded == set(stage.get("params", [])), name


def test_the_import_walk_on_hand_checked_cases():
    # stages/mine.py: mine -> bm25, text, io, records; stage_cli -> config, io (relative and absolute imports)
    assert imported_files(ROOT / "stages" / "mine.py") == {
        "stages/mine.py", "stages/stage_cli.py", "dprpipe/mine.py", "dprpipe/bm25.py", "dprpipe/text.py",
        "dprpipe/io.py", "dprpipe/records.py", "dprpipe/config.py"}
    # the search CLI's imports run only inside its main(); the evaluate stage imports search for hybrid_run
    search = ROOT / "dprpipe" / "search.py"
    assert _imports(search, search.parent) == {ROOT / "dprpipe" / "io.py"}
    assert ROOT / "dprpipe" / "index.py" in _imports(search, search.parent, everywhere=True)
