"""The search service's core: a promoted release loaded for searching, request checks, hot swaps.

`load_release` turns a `release.Release` (model, index, corpus, record) into a `LoadedRelease`:
the dual encoder (its query side), the FAISS `index.Searcher`, and the project's BM25 over the
release's corpus, built at load time with the record's "bm25" mapping (fields of
`mine.MineConfig`: k1, b, epsilon, stemmer, stopwords, use_title; its defaults where absent).
`LoadedRelease.search` answers one query in one mode:
  bm25    the BM25 ranking (as `mine.Miner.run`: passages scoring 0 are left out);
  dense   inner product of the query vector with the index (as `index.Searcher`);
  hybrid  `search.hybrid_run` over the top max(k, HYBRID_DEPTH) of each, with the record's
          "hybrid" mapping (weight, normalize; defaults 1.0 and true), cut to k.

`Service` holds the release being served and watches `<root>/current.json`: a new version is
loaded completely in a background thread, then one reference is swapped; a request keeps the
release it started with, so a swap never fails or mixes a request. A release that fails to
load is reported on stderr and the old one stays in service.

Queries are encoded by a `QueryBatcher`: one worker thread encodes every query waiting when it
is free in one forward pass (waiting up to `max_wait` seconds for requests already admitted), with
the bf16 casts of the weights kept between passes. A hybrid request scores BM25 while its query is
being encoded. The vectors are `encode.encode_texts`' (the offline search's).

`parse_request` checks a raw query string (bytes, as received): q is required, non-blank, valid
UTF-8 and at most MAX_QUERY_BYTES; k an integer in 1..min(MAX_K, corpus size); mode one of
MODES. A bad request is a `BadRequest` with a one-line reason.

Inputs: a release root. Outputs: hits (id, title, text, score) per query and mode.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np

from . import release as releases
from .io import DataError
from .config import from_mapping
from .evaluate import EvaluateConfig
from .mine import MineConfig, passage_text
from .records import Passage, read_corpus
from .search import hybrid_run

MODES = ("bm25", "dense", "hybrid")
MAX_QUERY_BYTES = 10_000     # UTF-8 bytes of q: a question is far shorter; the encoder reads 64 tokens
MAX_K = 1000
DEFAULT_K = 10
HYBRID_DEPTH = 100           # each list's depth before fusing (min-max normalisation depends on it)


class BadRequest(ValueError):
    """A request the service refuses (4xx), with a one-line reason."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass(frozen=True)
class SearchRequest:
    q: str
    k: int = DEFAULT_K
    mode: str = "dense"


@dataclass(frozen=True)
class Hit:
    id: str
    title: str
    text: str
    score: float


def parse_request(query_string: bytes, n_docs: int) -> SearchRequest:
    """Check the raw query string of GET /search (see the module docstring for the rules)."""
    # percent-escapes undone to bytes, decoded below: Starlette's parsing (and parse_qsl) would
    # replace invalid UTF-8 with U+FFFD silently; a repeated parameter counts once, the last one
    params = {}
    for pair in query_string.split(b"&"):
        if pair:
            name, _, value = pair.partition(b"=")
            params[unquote_to_bytes(name.replace(b"+", b" "))] = unquote_to_bytes(value.replace(b"+", b" "))

    def text(name: bytes) -> str | None:
        raw = params.get(name)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"parameter {name.decode()!r} is not valid UTF-8 (byte {e.start})") from None

    q = text(b"q")
    if q is None or not q.strip():
        raise BadRequest("q is missing or blank")
    if len(params[b"q"]) > MAX_QUERY_BYTES:
        raise BadRequest(f"q is {len(params[b'q'])} bytes; the limit is {MAX_QUERY_BYTES}")
    mode = text(b"mode") or "dense"
    if mode not in MODES:
        raise BadRequest(f"unknown mode {mode[:40]!r}; expected one of {', '.join(MODES)}")
    k_text = text(b"k")
    try:
        k = DEFAULT_K if k_text is None else int(k_text)
    except ValueError:
        raise BadRequest(f"k must be an integer, got {k_text[:40]!r}") from None
    limit = min(MAX_K, n_docs)
    if not 1 <= k <= limit:
        raise BadRequest(f"k must be in 1..{limit} (at most {MAX_K} and the {n_docs} passages), got {k}")
    return SearchRequest(q, k, mode)


def bm25_config(record: dict) -> MineConfig:
    """The BM25 settings of a release record ("bm25"), MineConfig's defaults for what it lacks."""
    return from_mapping(MineConfig, record.get("bm25"), "release.json bm25")   # unknown keys, wrong types: ValueError


def hybrid_config(record: dict) -> tuple[float, bool]:
    given = record.get("hybrid") or {}
    unknown = sorted(set(given) - {"weight", "normalize"})
    if unknown:
        raise ValueError(f'release.json "hybrid" has unknown keys {unknown}; expected weight, normalize')
    default = EvaluateConfig()
    return (float(given.get("weight", default.hybrid_weight)),
            bool(given.get("normalize", default.hybrid_normalize)))


class QueryBatcher:
    """Encode queries from many threads in shared forward passes.

    `submit` queues a query and returns a Future of its vector at once, so the caller can do
    other work (hybrid's BM25) while it is encoded. When the worker is free it takes every
    queued query (up to `max_batch`); it waits up to `max_wait` seconds for more only while
    queries announced by `expect` are not submitted yet (a lone client never waits). Queries
    of different releases (a swap in progress) go in separate passes. One worker thread does
    all encoding, so torch's threads are not oversubscribed, and it holds an autocast context
    open per model, so the bf16 casts of the weights are made once, not on every pass (see
    `encode_queries`).
    """

    def __init__(self, max_batch: int = 32, max_wait: float = 0.002):
        if max_batch < 1 or max_wait < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.max_batch, self.max_wait = max_batch, max_wait
        self.passes = 0          # forward passes made (queries / passes = the mean batch)
        self._cond = threading.Condition()
        self._queue: list[tuple[object, str, Future]] = []
        self._expected = 0       # queries announced by `expect`, not submitted yet
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="query-encoder", daemon=True)
        self._thread.start()

    def expect(self, n: int = 1) -> None:
        """Announce `n` queries about to be submitted (with expected=True), or withdraw them (n < 0)."""
        with self._cond:
            self._expected += n
            self._cond.notify()

    def submit(self, model, text: str, expected: bool = False) -> Future:
        """Queue a query; the Future's result is its vector (float32 [dim]).

        expected: the query was announced by `expect`; it stops being waited for as it is queued.
        """
        fut: Future = Future()
        with self._cond:
            if expected:
                self._expected -= 1
            if self._closed:
                raise RuntimeError("the query encoder is closed")
            self._queue.append((model, text, fut))
            self._cond.notify()
        return fut

    def encode(self, model, text: str) -> np.ndarray:
        return self.submit(model, text).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _next_batch(self) -> list[tuple[object, str, Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.max_wait
            while (len(self._queue) < self.max_batch and self._expected > 0
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            model = self._queue[0][0]
            batch = [x for x in self._queue[:self.max_batch] if x[0] is model]
            taken = {id(x) for x in batch}
            self._queue = [x for x in self._queue if id(x) not in taken]
            return batch

    def _work(self) -> None:
        from .model import autocast

        held, held_model = contextlib.ExitStack(), None
        try:
            while (batch := self._next_batch()) is not None:
                model = batch[0][0]
                if model is not held_model:
                    held.close()   # leaving the outermost autocast drops its casts of the old weights
                    held, held_model = contextlib.ExitStack(), model
                    held.enter_context(autocast(model.cfg, next(model.parameters()).device))
                self.passes += 1
                try:
                    vecs = encode_queries(model, [t for _, t, _ in batch])
                except BaseException as e:  # the waiting requests fail with it; the worker goes on
                    for _, _, fut in batch:
                        fut.set_exception(e)
                    continue
                for row, (_, _, fut) in zip(vecs, batch):
                    fut.set_result(row)
        finally:
            held.close()


def encode_queries(model, texts: list[str]) -> np.ndarray:
    """Query vectors [len(texts), dim] float32, the computation of `encode.encode_texts` in one pass.

    Under torch.no_grad rather than encode_texts' inference_mode: autocast caches its bf16 casts
    of the weights only outside inference mode, and only while an enclosing autocast context
    stays open (the `QueryBatcher` worker holds one). The casts are the same, so are the vectors;
    without the cache a single query spent about a quarter of its encoding time re-casting weights.
    """
    import torch

    from .model import autocast

    with torch.no_grad(), autocast(model.cfg, next(model.parameters()).device):
        return model.encode_query(model.tokenize_queries(texts)).cpu().numpy()


class LoadedRelease:
    """One release in memory: encoder, FAISS index, BM25 and passages. Read-only once built."""

    def __init__(self, rel: releases.Release, progress: bool = False):
        from .bm25 import BM25Index
        from .index import Searcher
        from .model import DualEncoder

        self.version, self.record, self.path = rel.version, rel.record, rel.path
        self.bm25_cfg = bm25_config(rel.record)
        self.hybrid_weight, self.hybrid_normalize = hybrid_config(rel.record)
        self.passages: list[Passage] = read_corpus(rel.corpus)
        self.by_id = {p.id: p for p in self.passages}
        self.model, _ = DualEncoder.load(str(rel.model))
        self.model.eval()
        self.searcher = Searcher.load(rel.index)
        unknown = set(self.searcher.ids) - self.by_id.keys()
        if len(self.searcher.ids) != len(self.passages) or unknown:
            raise DataError(rel.path, None, f"the index holds {len(self.searcher.ids)} passages, corpus.jsonl "
                            f"{len(self.passages)}; they must be the same passages")
        self.analyzer = self.bm25_cfg.analyzer()
        self.bm25 = BM25Index((self.analyzer(passage_text(p, self.bm25_cfg.use_title)) for p in self.passages),
                              self.bm25_cfg.bm25())

    @property
    def n_docs(self) -> int:
        return len(self.passages)

    def bm25_hits(self, q: str, k: int) -> list[tuple[str, float]]:
        idx, scores = self.bm25.search([self.analyzer(q)], k, threads=1)
        return [(self.passages[i].id, s) for i, s in zip(idx[0].tolist(), scores[0].tolist()) if s > 0]

    def dense_hits(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        hits, scores = self.searcher.search(vector[None, :], k)
        return list(zip(hits[0], map(float, scores[0])))

    def hybrid_hits(self, q: str, k: int, vector: Future) -> list[tuple[str, float]]:
        depth = max(k, HYBRID_DEPTH)
        sparse = self.bm25_hits(q, depth)   # while the query is being encoded
        fused = hybrid_run({"q": sparse}, {"q": self.dense_hits(vector.result(), depth)},
                           self.hybrid_weight, self.hybrid_normalize, depth=k)
        return fused.get("q", [])

    def search(self, req: SearchRequest, vector: Future | None = None) -> list[Hit]:
        """One request's hits; `vector`: a Future of req.q's query vector (dense and hybrid)."""
        if req.mode == "bm25":
            ranked = self.bm25_hits(req.q, req.k)
        elif req.mode == "dense":
            ranked = self.dense_hits(vector.result(), req.k)
        else:
            ranked = self.hybrid_hits(req.q, req.k, vector)
        out = []
        for pid, score in ranked:
            p = self.by_id[pid]
            out.append(Hit(pid, p.title, p.text, float(score)))
        return out


def load_release(rel: releases.Release) -> LoadedRelease:
    return LoadedRelease(rel)


class Service:
    """The release being served, swapped in the background when current.json changes."""

    def __init__(self, root: str | os.PathLike, poll: float = 2.0, batcher: QueryBatcher | None = None,
                 loader: Callable[[releases.Release], LoadedRelease] = load_release,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)):
        self.root, self.poll, self.loader, self.log = Path(root), poll, loader, log
        self.batcher = batcher or QueryBatcher()
        self._current: LoadedRelease | None = None
        self._failed: str | None = None     # a version that failed to load: not retried until current.json changes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> LoadedRelease | None:
        return self._current   # one attribute read: a request sees the old release or the new one

    def refresh(self) -> bool:
        """Load the release current.json names if it is not the one served; True if swapped."""
        try:
            version = releases.current_version(self.root)
        except DataError as e:
            self.log(f"serve: {e}")
            return False
        loaded = self._current.version if self._current else None
        if version is None or version == loaded or version == self._failed:
            return False
        t0 = time.perf_counter()
        try:
            new = self.loader(releases.read_release(self.root, version))
        except Exception as e:
            self._failed = version
            self.log(f"serve: release {version!r} failed to load, still serving {loaded!r}: "
                     f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            return False
        self._current, self._failed = new, None
        self.log(f"serve: serving release {version!r} ({new.n_docs} passages, loaded in "
                 f"{time.perf_counter() - t0:.1f} s)")
        return True

    def start(self) -> None:
        """Load the current release now, then watch current.json every `poll` seconds."""
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="release-watcher", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.batcher.close()

    def search(self, query_string: bytes) -> dict:
        """GET /search as a JSON-ready dict; BadRequest for a bad request or before any release."""
        t0 = time.perf_counter()
        rel = self._current
        if rel is None:
            raise BadRequest(f"no release is promoted yet under {self.root}", 503)
        self.batcher.expect()   # until its query is queued (or it turns out to need none), the encoder may wait for it
        try:
            req = parse_request(query_string, rel.n_docs)
        except BaseException:
            self.batcher.expect(-1)
            raise
        if req.mode == "bm25":
            self.batcher.expect(-1)
            vector = None
        else:
            vector = self.batcher.submit(rel.model, req.q, expected=True)
        hits = rel.search(req, vector)
        return {"query": req.q, "mode": req.mode, "k": req.k, "version": rel.version,
                "hits": [asdict(h) for h in hits], "took_ms": round((time.perf_counter() - t0) * 1000, 3)}
