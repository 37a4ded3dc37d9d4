"""Shared plumbing of the benchmark: timing, memory, machine facts, params and tables.

Every figure in `bench/` is a median over `repeats` runs of the same measurement (`timed`);
peak memory comes from tracemalloc (Python and numpy allocations) or from the peak RSS of a
child process (`child`, which reports `peak_rss_bytes`; for native libraries such as FAISS and torch).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's dprpipe, not an installed copy

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "scifact"
MB = 1 << 20


@dataclass
class Timing:
    """Seconds of each run; `median` is the figure reported."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_json(self) -> dict:
        return {"median_s": self.median, "runs_s": self.runs}


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[Timing, Any]:
    """Run `fn` warmup + repeats times; wall-clock seconds of the timed runs and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    t = Timing()
    for _ in range(repeats):
        gc.collect()  # a collection of earlier garbage must not land inside a timed run
        t0 = time.perf_counter()
        result = fn()
        t.runs.append(time.perf_counter() - t0)
    return t, result


def alternating(kinds: dict[str, Callable[[], dict]], repeats: int,
                key: str) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """Each of `kinds` (name -> a function measuring one run, returning a dict) in turn, `repeats`
    times, so a change in the host's load hits all alike; every run's figures with the 1-min load
    before and after it, and each kind's median of `key` over its runs."""
    runs: dict[str, list[dict]] = {name: [] for name in kinds}
    for _ in range(repeats):
        for name, measure in kinds.items():
            load = load_average()[0]
            runs[name].append({**measure(), "load": [load, load_average()[0]]})
    return runs, {name: statistics.median(r[key] for r in rs) for name, rs in runs.items()}


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Peak bytes allocated (Python objects and numpy buffers) while `fn` runs, and its result.

    Counts only what is allocated inside the call, so inputs made beforehand are not included;
    what `fn` keeps (the index) is part of the peak.
    """
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


@contextlib.contextmanager
def native_stderr_silenced():
    """Silence C-level stderr (FAISS prints a k-means warning per PQ sub-quantiser on small data)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def reset_peak_rss() -> None:
    """Start the peak RSS count afresh (Linux >= 4.0), so setup before a measurement is not in it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(module: str, func: str, **kwargs) -> dict:
    """Run `bench.<module>.<func>(**kwargs)` in a fresh Python and return its JSON result.

    A fresh process gives a clean peak RSS: the child reports `peak_rss_bytes()` itself.
    """
    code = ("import json, sys; sys.path.insert(0, {bench!r}); import {m}; "
            "print('@@RESULT@@' + json.dumps({m}.{f}(**json.loads(sys.argv[1]))))").format(
        bench=str(ROOT / "bench"), m=module, f=func)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {module}.{func} failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def load_params() -> dict:
    """The project's params.yaml (the benchmark measures the configured settings)."""
    import yaml

    with open(ROOT / "params.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def params_section(section: str) -> dict:
    """One section of params.yaml as a plain dict (empty when absent)."""
    return load_params().get(section) or {}


def section_config(cls, section: str):
    """`cls` built from params.yaml's `section`, keeping only the keys `cls` knows.

    The benchmark needs a section's settings, not all of its keys (params.yaml may carry keys
    for stage code that the dataclass does not hold), so unknown keys are dropped here.
    """
    import dataclasses

    from dprpipe.config import from_mapping

    values = params_section(section)
    names = {f.name for f in dataclasses.fields(cls)}
    return from_mapping(cls, {k: v for k, v in values.items() if k in names}, section)


def cpu_info(cpuinfo: str | None = None) -> dict[str, str]:
    r"""The fields of the first processor's block of /proc/cpuinfo (it describes them all); {}
    where there is no such file.

    >>> cpu_info("processor\t: 0\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n")
    {'processor': '0', 'flags': 'fpu avx2'}
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    return set(cpu_info().get("flags", "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    r"""The CPU's name, with its family and model numbers: a virtual machine's name ("AMD EPYC")
    can hide which generation runs it, and two generations differ in speed by 2x.

    >>> cpu_model("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n")
    'AMD EPYC (family 26, model 2)'
    """
    fields = cpu_info(cpuinfo)
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine() -> dict:
    """What the figures were measured on: CPU, vector extensions, memory, library versions."""
    import numpy
    import scipy
    import torch

    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    for name in ("faiss", "bm25s", "rank_bm25", "transformers"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", None) or _dist_version(name)
        except ImportError:
            info[name] = None
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (user + system clock ticks so far, command line) for every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(d.name)] = (int(fields[11]) + int(fields[12]), cmd)
        except (OSError, ValueError, IndexError):
            continue
    return out


def busy_processes(interval: float = 1.0, threshold: float = 0.2) -> list[str]:
    """Other processes using at least `threshold` of a core over the next `interval` seconds."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(interval)
    after = _cpu_ticks()
    me = os.getpid()
    busy = []
    for pid, (ticks, cmd) in after.items():
        if pid == me or pid not in before:
            continue
        share = (ticks - before[pid][0]) / hz / interval
        if share >= threshold:
            busy.append((share, f"{share:.0%} {cmd[:100] or pid}"))
    return [text for _, text in sorted(busy, reverse=True)]


def fmt(x: Any, digits: int = 3) -> str:
    """Numbers for tables: 3 significant digits, thousands separated; others as text."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0:
            return "0"
        if abs(x) >= 10 ** digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (also readable as plain text)."""
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
