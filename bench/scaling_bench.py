"""Scaling: cost of mine, encode and index at 1x, 4x and 16x corpus size.

Inputs: a BEIR dataset folder and params.yaml's `mine`, `model`, `encode` and `index` sections.
Outputs (a dict, see `run`), per scale:
- mine: BM25 index build (from tokens; tokenising is a fixed cost per passage, see the BM25
  section) plus the top-100 search of the test queries, over the corpus repeated m times;
- encode: `encode.encode_passages_to` in a fresh process over m x 16 short passages (the
  first 24 words of SciFact passages) in blocks of 16: seconds and passages/s over distinct
  passages, and the process's peak RSS above the loaded model and what it still holds
  afterwards (after `malloc_trim`), over distinct passages and over one block of passages
  repeated m times (same shapes at every scale), to show memory stays flat;
- index: build and search of flat, HNSW (M 16, efConstruction 100) and IVF-PQ (the project's
  settings) over synthetic unit vectors of m times the SciFact corpus size.
"""

from __future__ import annotations

import ctypes
import tempfile
from dataclasses import replace
from pathlib import Path

from measure import child, native_stderr_silenced, params_section, section_config, timed

SCALES = (1, 4, 16)


def encode_child(n: int, words: int, block_size: int, batch_size: int, repeats: int, data: str,
                 distinct: bool = True) -> dict:
    """Runs in a fresh process: encode n short passages to a memmap, `repeats` times.

    `distinct`: the first n corpus passages; else the first `block_size` ones over and over
    (every block then has the same shapes, so only n changes between scales).
    """
    from measure import peak_rss_bytes, reset_peak_rss, rss_bytes

    from dprpipe.prepare import read_dataset
    from dprpipe.records import Passage
    from dprpipe.encode import encode_passages_to
    from dprpipe.model import DualEncoder, EncoderConfig

    enc_cfg = section_config(EncoderConfig, "model")
    model, _ = DualEncoder.load(enc_cfg.model, enc_cfg)
    base = [Passage(p.id, p.title, " ".join(p.text.split()[:words]))
            for p in read_dataset(data).corpus[:n if distinct else block_size]]
    passages = [Passage(f"{base[i % len(base)].id}#{i}", base[i % len(base)].title, base[i % len(base)].text)
                for i in range(n)]
    # warm-up on one block, so the model's first-call allocations are in the baseline
    with tempfile.TemporaryDirectory() as tmp:
        encode_passages_to(model, passages[:block_size], min(n, block_size), Path(tmp) / "w.npy",
                           Path(tmp) / "w.ids", batch_size, block_size)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # loading and warm-up garbage is not encode's
    baseline = rss_bytes()
    reset_peak_rss()

    def once():
        with tempfile.TemporaryDirectory() as tmp:
            encode_passages_to(model, iter(passages), n, Path(tmp) / "e.npy", Path(tmp) / "e.ids",
                               batch_size, block_size)

    t, _ = timed(once, repeats)
    peak = peak_rss_bytes()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: what is left is what encode holds
    return {"n": n, "seconds": t.to_json(), "baseline_rss_mb": baseline / 2**20, "peak_rss_mb": peak / 2**20,
            "peak_above_baseline_mb": max(0, peak - baseline) / 2**20,
            "live_above_baseline_mb": max(0, rss_bytes() - baseline) / 2**20}


def run(data: str, quick: bool, repeats: int) -> dict:
    from dprpipe.bm25 import BM25Index
    from dprpipe.prepare import read_dataset
    from dprpipe.index import IndexConfig, build_index
    from dprpipe.mine import MineConfig, passage_text
    from index_bench import synthetic

    out: dict = {"scales": list(SCALES)}
    cfg = section_config(MineConfig, "mine")
    ds = read_dataset(data)
    split = "test" if "test" in ds.splits else next(iter(ds.splits))
    corpus = ds.corpus[:500] if quick else ds.corpus
    analyzer = cfg.analyzer()
    docs = [analyzer(passage_text(p, cfg.use_title)) for p in corpus]
    qtoks = [analyzer(q.text) for q in ds.splits[split]]

    mine = []
    for m in SCALES:
        big = docs * m
        t_build, index = timed(lambda: BM25Index(big, cfg.bm25()), repeats)
        t_search, _ = timed(lambda: index.search(qtoks, 100), repeats, warmup=1)
        mine.append({"scale": m, "passages": len(big), "build_s": t_build.to_json(), "search_s": t_search.to_json(),
                     "total_s": t_build.median + t_search.median, "qps": len(qtoks) / t_search.median,
                     "index_mb": index.nbytes / 2**20})
    out["mine"] = mine

    enc = params_section("encode")
    base_n = 8 if quick else 16
    block = 8 if quick else 16
    batch = int(enc.get("batch_size", 32))
    out["encode"] = []
    for m in SCALES:
        kw = dict(n=base_n * m, words=24, block_size=block, batch_size=batch, data=data)
        r = child("scaling_bench", "encode_child", repeats=1 if quick else repeats, **kw)
        # the same block of passages repeated: only n changes, so any growth would be encode's own
        # (distinct passages bring new batch shapes, whose buffers glibc and oneDNN keep cached)
        same = child("scaling_bench", "encode_child", repeats=1, distinct=False, **kw)
        r.update(scale=m, passages_per_s=r["n"] / r["seconds"]["median_s"],
                 peak_above_baseline_mb_repeated=same["peak_above_baseline_mb"],
                 live_above_baseline_mb_repeated=same["live_above_baseline_mb"])
        out["encode"].append(r)
    out["encode_block_size"] = block

    base_cfg = section_config(IndexConfig, "index")
    n0 = 1000 if quick else len(ds.corpus)
    queries = synthetic(len(qtoks), 384, seed=6)
    index_rows = []
    for m in SCALES:
        emb = synthetic(n0 * m, 384, seed=5)
        for kind, cfg_k in (("flat", replace(base_cfg, kind="flat")),
                            ("hnsw", replace(base_cfg, kind="hnsw", hnsw_m=16, ef_construction=100)),
                            ("ivfpq", replace(base_cfg, kind="ivfpq"))):
            # the 16x HNSW and IVF-PQ builds (graph insertion; k-means over 83k vectors) take tens
            # of seconds each: timed once
            reps = 1 if (kind != "flat" and m == SCALES[-1]) else repeats
            with native_stderr_silenced():
                t_build, index = timed(lambda: build_index(emb, cfg_k), reps)
            t_search, _ = timed(lambda: index.search(queries, 10), repeats, warmup=1)
            index_rows.append({"scale": m, "kind": kind, "n": len(emb), "build_s": t_build.to_json(),
                               "build_runs": reps, "search_s": t_search.to_json(),
                               "qps": len(queries) / t_search.median})
    out["index"] = index_rows
    out["queries"] = len(qtoks)
    return out

