"""The `dprpipe` command: `dprpipe serve` runs the search service; `dprpipe search` is the search CLI.

    dprpipe serve [--root promoted] [--host 127.0.0.1] [--port 8000] [--poll 2] [--threads N]
                  [--batch-wait-ms 2] [--max-batch 32] [--switch-interval-ms 0.5]
    dprpipe search "What causes scurvy?" -k 5        (the same as python -m dprpipe.search)

Inputs: argv. Outputs: a running HTTP server (see dprpipe/api.py and docs/serve.md).
"""

from __future__ import annotations

import argparse
import os
import sys


def serve(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="dprpipe serve", description="Serve the promoted release over HTTP.")
    p.add_argument("--root", default="promoted", help="release root holding current.json (default: promoted)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll", type=float, default=2.0, help="seconds between checks of current.json (default: 2)")
    # every core by default: on a quiet 2-core machine 2 threads served SciFact's dense queries at a
    # p50 of 13 ms and 152 queries/s against 19 ms and 97 with 1 (bench/serve_results.md). On a CPU
    # shared with other busy work use 1: torch's threads then wait on each other at every layer.
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of the query encoder (default: the cores available; 1 on a busy machine)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long the encoder waits for queries of requests already admitted (default: 2)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="queries per encoder pass (default: 32; 1: each alone, exactly the offline search's vectors)")
    # the encoder thread takes the GIL back after each of its ~150 torch ops per pass; while request
    # threads run Python (HTTP, BM25, JSON) each take-back can wait for the whole switch interval
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="Python's thread switch interval (default: 0.5; Python's own is 5)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        p.error("--max-batch must be at least 1 and --batch-wait-ms at least 0")

    import faiss
    import torch
    import uvicorn

    from .api import create_app
    from .serve import QueryBatcher, Service

    torch.set_num_threads(args.threads)
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    faiss.omp_set_num_threads(1)  # one query against SciFact-size flat indexes: threads cost more than they save
    service = Service(args.root, poll=args.poll, batcher=QueryBatcher(args.max_batch, args.batch_wait_ms / 1000))
    service.start()
    if service.current is None:
        print(f"serve: no release under {args.root} yet; answering 503 until one is promoted", file=sys.stderr)
    try:
        # a larger request-line limit than h11's 16 kB, so an over-long q gets the JSON reason
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level,
                    h11_max_incomplete_event_size=64 * 1024)
    finally:
        service.stop()


def search(argv: list[str]) -> None:
    from .search import main as search_main

    search_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"serve": serve, "search": search}
    if not argv or argv[0] not in commands:
        sys.exit("usage: dprpipe {serve,search} ... (dprpipe serve --help)")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
