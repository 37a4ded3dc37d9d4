"""dprpipe.serve and dprpipe.api: the search service over tiny releases built here.

Each mode is checked against its reference (BM25 against mine.Miner, dense against
index.Searcher, hybrid against search.hybrid_run on those two runs); bad requests get a 4xx with a
one-line JSON reason; a real uvicorn server keeps answering while a new release is promoted
under concurrent requests; the page is driven in headless Chromium.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from dense_fixtures import single_thread, tiny_encoder, toy_corpus  # noqa: F401 (autouse: one thread)
from fastapi.testclient import TestClient

from dprpipe import release
from dprpipe.api import create_app
from dprpipe.distributed import free_port
from dprpipe.encode import encode_texts
from dprpipe.index import IndexConfig, Searcher, build_index, save_index
from dprpipe.io import write_json
from dprpipe.mine import MineConfig, Miner
from dprpipe.model import DualEncoder, passage_texts
from dprpipe.records import Passage, Query, write_corpus
from dprpipe.search import hybrid_run
from dprpipe.serve import HYBRID_DEPTH, MAX_QUERY_BYTES, QueryBatcher, Service, direct_encode, parse_request

BM25 = {"k1": 1.2, "b": 0.5, "stemmer": "porter"}
HYBRID = {"weight": 0.7, "normalize": True}


def corpus(extra: int = 0) -> list[Passage]:
    return toy_corpus() + [Passage(f"x{i}", f"Extra {i}", f"an extra passage number {i} about the tiger and coffee")
                           for i in range(extra)]


def write_release(root: Path, version: str, seed: int, passages: list[Passage], record: dict | None = None) -> Path:
    """A release folder as promotion writes it (dprpipe.release's layout)."""
    path = release.release_dir(root, version)
    model = tiny_encoder(seed)
    model.save(path / "model")
    emb = encode_texts(model, passage_texts(passages, model.cfg.use_title), "passage")
    save_index(path / "index", build_index(emb, IndexConfig()), [p.id for p in passages], IndexConfig())
    write_corpus(path / "corpus.jsonl", passages)
    write_json(path / "release.json", {"version": version, "bm25": BM25, "hybrid": HYBRID} if record is None
               else record)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("promoted")
    write_release(root, "v1", 0, corpus())
    write_release(root, "v2", 1, corpus(extra=4))
    release.set_current(root, "v1")
    return root


@pytest.fixture(scope="module")
def service(root):
    svc = Service(root, poll=3600)  # no watcher swaps here: these tests pin v1
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


QUESTIONS = ["what is a tiger ?", "coffee in winter", "the planet and the rocket", "violin"]


# ---------------------------------------------------------------- each mode against its reference

@pytest.mark.parametrize("q", QUESTIONS)
def test_bm25_equals_the_projects_bm25(client, q):
    body = client.get("/search", params={"q": q, "k": 5, "mode": "bm25"}).json()
    assert body["mode"] == "bm25" and body["version"] == "v1" and body["took_ms"] > 0
    ref = Miner(corpus(), MineConfig(**BM25)).run([Query("q", q)], 5)["q"]
    assert ref, "a question with no BM25 hit checks nothing"
    assert [h["id"] for h in body["hits"]] == [d for d, _ in ref]
    assert [h["score"] for h in body["hits"]] == pytest.approx([s for _, s in ref], rel=1e-12)
    text = {p.id: p for p in corpus()}
    assert all(h["title"] == text[h["id"]].title and h["text"] == text[h["id"]].text for h in body["hits"])


def dense_reference(root: Path, q: str, k: int) -> list[tuple[str, float]]:
    rel = release.read_release(root, "v1")
    model, _ = DualEncoder.load(str(rel.model))
    hits, scores = Searcher.load(rel.index).search(encode_texts(model, [q], "query"), k)
    return list(zip(hits[0], map(float, scores[0])))


@pytest.mark.parametrize("q", QUESTIONS)
def test_dense_equals_the_index_search(root, client, q):
    body = client.get("/search", params={"q": q, "k": 7, "mode": "dense"}).json()
    ref = dense_reference(root, q, 7)
    assert [h["id"] for h in body["hits"]] == [d for d, _ in ref]
    assert [h["score"] for h in body["hits"]] == pytest.approx([s for _, s in ref], rel=1e-5)


@pytest.mark.parametrize("q", QUESTIONS)
def test_hybrid_equals_hybrid_run_of_the_two_runs(root, client, q):
    k = 6
    body = client.get("/search", params={"q": q, "k": k, "mode": "hybrid"}).json()
    depth = max(k, HYBRID_DEPTH)
    sparse = Miner(corpus(), MineConfig(**BM25)).run([Query("q", q)], depth)
    dense = {"q": dense_reference(root, q, depth)}
    ref = hybrid_run(sparse, dense, HYBRID["weight"], HYBRID["normalize"])["q"][:k]
    assert [h["id"] for h in body["hits"]] == [d for d, _ in ref]
    assert [h["score"] for h in body["hits"]] == pytest.approx([s for _, s in ref], rel=1e-5)


def test_defaults_dense_k10_and_record_defaults(tmp_path):
    """No k or mode: dense top 10; a record without "bm25"/"hybrid" gets MineConfig's and 1.0/true."""
    write_release(tmp_path, "bare", 0, corpus(), record={"version": "bare"})
    release.set_current(tmp_path, "bare")
    svc = Service(tmp_path, poll=3600)
    svc.start()
    try:
        rel = svc.current
        assert rel.bm25_cfg == MineConfig() and (rel.hybrid_weight, rel.hybrid_normalize) == (1.0, True)
        body = TestClient(create_app(svc)).get("/search?q=tiger").json()
        assert body["mode"] == "dense" and body["k"] == 10 and len(body["hits"]) == 10
    finally:
        svc.stop()


def test_batched_encoding_equals_one_at_a_time(service):
    """Queries encoded together in one padded pass give the vectors they get alone."""
    rel = service.current
    out: dict[str, object] = {}
    batcher = QueryBatcher(max_wait=30, expected=lambda: len(QUESTIONS))  # all four share one pass
    try:
        threads = [threading.Thread(target=lambda q=q: out.__setitem__(q, batcher.encode(rel.model, q)))
                   for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    assert batcher.passes == 1
    for q in QUESTIONS:
        assert out[q] == pytest.approx(direct_encode(rel.model, q), abs=1e-5)


# ---------------------------------------------------------------- bad requests

BAD = [
    ("", "q is missing"),
    ("q=", "q is missing or blank"),
    ("q=%20%20", "q is missing or blank"),
    ("q=" + "a" * (MAX_QUERY_BYTES + 1), f"the limit is {MAX_QUERY_BYTES}"),
    ("q=tiger&k=0", "k must be in 1..16"),
    ("q=tiger&k=1001", "k must be in 1..16"),
    ("q=tiger&k=17", "k must be in 1..16"),     # more than the corpus
    ("q=tiger&k=-3", "k must be in"),
    ("q=tiger&k=ten", "k must be an integer"),
    ("q=tiger&mode=sparse", "unknown mode"),
    ("q=%FF%FEtiger", "not valid UTF-8"),
    ("q=caf%C3", "not valid UTF-8"),
    ("q=tiger&mode=%C3%28", "not valid UTF-8"),
]


@pytest.mark.parametrize("qs,reason", BAD)
def test_bad_requests_get_a_4xx_with_a_one_line_reason(client, qs, reason):
    r = client.get("/search?" + qs)
    assert 400 <= r.status_code < 500
    body = r.json()
    assert set(body) == {"error"} and reason in body["error"] and "\n" not in body["error"]
    assert client.get("/search?q=tiger").status_code == 200   # still serving


def test_parse_request_accepts_the_limits():
    assert parse_request(b"q=" + b"a" * MAX_QUERY_BYTES + b"&k=16&mode=bm25", 16).k == 16
    assert parse_request("q=caf%C3%A9+noir&k=1".encode(), 16).q == "café noir"
    assert parse_request(b"q=x&k=1000", 5000).k == 1000


def test_no_release_yet_is_503_then_served_once_promoted(tmp_path):
    svc = Service(tmp_path, poll=0.05)
    svc.start()
    try:
        c = TestClient(create_app(svc))
        r = c.get("/search?q=tiger")
        assert r.status_code == 503 and "no release" in r.json()["error"]
        write_release(tmp_path, "late", 0, corpus())
        release.set_current(tmp_path, "late")
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/search?q=tiger").json()["version"] == "late"
    finally:
        svc.stop()


def test_a_broken_release_is_refused_and_the_old_one_kept(root, tmp_path):
    local = tmp_path / "root"
    shutil.copytree(root, local)
    release.set_current(local, "v1")
    logs: list[str] = []
    svc = Service(local, poll=3600, log=logs.append)
    svc.start()
    try:
        broken = release.release_dir(local, "v3")
        shutil.copytree(release.release_dir(local, "v1"), broken)
        (broken / "index" / "index.faiss").write_bytes(b"not an index")
        release.set_current(local, "v3")
        assert not svc.refresh()
        assert svc.current.version == "v1" and "'v3' failed to load" in logs[-1]
        assert not svc.refresh()     # not retried until current.json changes
        release.set_current(local, "v2")
        assert svc.refresh() and svc.current.version == "v2"
    finally:
        svc.stop()


# ---------------------------------------------------------------- a real server

class LiveServer:
    """uvicorn on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self, service: Service):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_a_promotion_under_load_fails_no_request(root, tmp_path):
    import httpx

    local = tmp_path / "root"
    shutil.copytree(root, local)
    release.set_current(local, "v1")
    svc = Service(local, poll=0.05)
    svc.start()
    seen: dict[int, list[tuple[int, str | None]]] = {}
    stop = threading.Event()

    def client(n: int) -> None:
        log = seen.setdefault(n, [])
        with httpx.Client(base_url=server.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                mode = ("bm25", "dense", "hybrid")[(n + i) % 3]
                r = c.get("/search", params={"q": QUESTIONS[i % len(QUESTIONS)], "k": 5, "mode": mode})
                log.append((r.status_code, r.json().get("version")))
                i += 1

    try:
        with LiveServer(svc) as server:
            threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            before = sum(map(len, seen.values()))
            release.set_current(local, "v2")
            deadline = time.monotonic() + 60
            while not any(v == "v2" for log in list(seen.values()) for _, v in log[-1:]):
                assert time.monotonic() < deadline, "v2 was never served"
                time.sleep(0.05)
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join()
            with httpx.Client(base_url=server.url) as c:
                assert c.get("/search", params={"q": "tiger", "k": 20}).json()["version"] == "v2"  # 20 docs now
    finally:
        stop.set()
        svc.stop()
    results = [x for log in seen.values() for x in log]
    assert before > 0 and len(results) > before
    assert all(status == 200 for status, _ in results), [x for x in results if x[0] != 200][:5]
    for log in seen.values():
        versions = [v for _, v in log]
        assert versions[-1] == "v2"
        # sequential requests of one client: once it saw v2, never v1 again
        assert "v1" not in versions[versions.index("v2"):]
    assert sum(v == "v1" for _, v in results) > 0


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=15000", *flags, url],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_page_shows_three_rankings_in_a_browser(service, tmp_path):
    from html.parser import HTMLParser

    class Columns(HTMLParser):
        """Hits (data-id) and their titles per column (id col-<mode>)."""

        def __init__(self):
            super().__init__()
            self.cols: dict[str, list[str]] = {}
            self.titles: list[str] = []
            self.col, self.in_title = None, False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if (a.get("id") or "").startswith("col-"):
                self.col = a["id"][4:]
                self.cols[self.col] = []
            if "hit" in (a.get("class") or "").split() and self.col:
                self.cols[self.col].append(a.get("data-id"))
            self.in_title = a.get("class") == "t"

        def handle_data(self, data):
            if self.in_title:
                self.titles.append(data)
                self.in_title = False

    with LiveServer(service) as server:
        url = f"{server.url}/?q=what+is+a+tiger+%3F&k=5"   # what the page's form puts in the address
        dom = chromium(url, tmp_path / "profile-dom", "--dump-dom")
        shot = tmp_path / "page.png"
        chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Columns()
    page.feed(dom.stdout)
    assert list(page.cols) == ["bm25", "dense", "hybrid"], dom.stdout[-2000:]
    c = TestClient(create_app(service))
    for mode, ids in page.cols.items():
        ref = c.get("/search", params={"q": "what is a tiger ?", "k": 5, "mode": mode}).json()["hits"]
        assert ids == [h["id"] for h in ref], mode
    assert "Tiger" in page.titles
    assert "release v1" in dom.stdout      # the status line, written once all three answers arrived
    assert shot.is_file() and shot.stat().st_size > 10_000
