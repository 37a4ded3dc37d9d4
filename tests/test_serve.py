"""dprpipe.serve and dprpipe.api: the search service over tiny releases built here.

Each mode is checked against its reference (BM25 against mine.Miner, dense against
index.Searcher, hybrid against search.hybrid_run on those two runs); bad requests get a 4xx with a
one-line JSON reason; a real uvicorn server keeps answering while a new release is promoted
under concurrent requests; in headless Chromium (driven over the DevTools protocol) a question is
typed into the page, its three rankings are read back, and a screenshot is saved (page.png in the
test's tmp_path).
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
from dprpipe.evaluate import EvaluateConfig
from dprpipe.index import IndexConfig, Searcher, build_index, save_index
from dprpipe.io import write_json
from dprpipe.mine import MineConfig, Miner
from dprpipe.model import DualEncoder, passage_texts
from dprpipe.records import Passage, Query, write_corpus
from dprpipe.search import hybrid_run
from dprpipe.serve import HYBRID_DEPTH, MAX_QUERY_BYTES, QueryBatcher, Service, parse_request

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
    assert [(h["id"], h["score"]) for h in body["hits"]] == ref   # the same vector: the same floats


@pytest.mark.parametrize("q", QUESTIONS)
def test_hybrid_equals_hybrid_run_of_the_two_runs(root, client, q):
    k = 6
    body = client.get("/search", params={"q": q, "k": k, "mode": "hybrid"}).json()
    depth = max(k, HYBRID_DEPTH)
    sparse = Miner(corpus(), MineConfig(**BM25)).run([Query("q", q)], depth)
    dense = {"q": dense_reference(root, q, depth)}
    ref = hybrid_run(sparse, dense, HYBRID["weight"], HYBRID["normalize"])["q"][:k]
    assert [(h["id"], h["score"]) for h in body["hits"]] == ref


def test_defaults_dense_k10_and_record_defaults(tmp_path):
    """No k or mode: dense top 10; a record without "bm25"/"hybrid" gets MineConfig's and EvaluateConfig's."""
    write_release(tmp_path, "bare", 0, corpus(), record={"version": "bare"})
    release.set_current(tmp_path, "bare")
    svc = Service(tmp_path, poll=3600)
    svc.start()
    try:
        rel = svc.current
        default = EvaluateConfig()
        assert rel.bm25_cfg == MineConfig()
        assert (rel.hybrid_weight, rel.hybrid_normalize) == (default.hybrid_weight, True)
        body = TestClient(create_app(svc)).get("/search?q=tiger").json()
        assert body["mode"] == "dense" and body["k"] == 10 and len(body["hits"]) == 10
    finally:
        svc.stop()


def encode_concurrently(batcher: QueryBatcher, model) -> dict[str, object]:
    """QUESTIONS submitted from a thread each, all announced first (the worker waits for them)."""
    out: dict[str, object] = {}
    batcher.expect(len(QUESTIONS))
    try:
        threads = [threading.Thread(target=lambda q=q: out.__setitem__(q, batcher.submit(model, q, True).result()))
                   for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        batcher.close()
    return out


def test_batched_encoding_equals_one_at_a_time(service):
    """Queries encoded together in one padded pass give the vectors they get alone (to float
    rounding: the fixture's encoder is float32; bench/serve_results.md measures bf16's)."""
    rel = service.current
    batcher = QueryBatcher(max_wait=30)
    out = encode_concurrently(batcher, rel.model)
    assert batcher.passes == 1
    for q in QUESTIONS:
        assert out[q] == pytest.approx(encode_texts(rel.model, [q], "query")[0], abs=1e-5)


def test_max_batch_1_encodes_each_query_alone(service):
    """Concurrent queries, one per pass: each vector is encode_texts' of that query alone, bit for bit."""
    rel = service.current
    batcher = QueryBatcher(max_batch=1, max_wait=30)
    out = encode_concurrently(batcher, rel.model)
    assert batcher.passes == len(QUESTIONS)
    for q in QUESTIONS:
        assert (out[q] == encode_texts(rel.model, [q], "query")[0]).all(), q
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        QueryBatcher(max_batch=0)


def test_the_batchers_bf16_vectors_are_encode_texts_bit_for_bit():
    """Under bf16 autocast the worker keeps the weights' casts between passes; the vectors stay
    exactly encode_texts' (which casts afresh each call), pass after pass, and a second model
    (a swap) gets its own casts, not the first one's."""
    models = [tiny_encoder(seed, precision="bf16") for seed in (0, 1)]
    for m in models:
        m.eval()
    batcher = QueryBatcher(max_wait=0)
    try:
        for model in models + models:
            for q in QUESTIONS:
                ref = encode_texts(model, [q], "query")[0]
                assert (batcher.encode(model, q) == ref).all(), q
    finally:
        batcher.close()
    assert batcher.passes == 4 * len(QUESTIONS)
    a, b = (encode_texts(m, [QUESTIONS[0]], "query")[0] for m in models)
    assert not (a == b).all()   # the two models differ, so a stale cast would have shown


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
            deadline = time.monotonic() + 60   # every client answered from v1 first (a busy CPU can take seconds)
            while len(seen) < len(threads) or not all(seen.values()):
                assert time.monotonic() < deadline, "no answers from v1"
                time.sleep(0.05)
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


class Browser:
    """Headless Chromium driven over the Chrome DevTools Protocol (its --remote-debugging-port
    websocket; the websockets client comes with Prefect): one page, commands answered in order."""

    def __init__(self, profile: Path):
        self.log = open(profile.with_suffix(".log"), "w")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.profile, self.ws, self.next_id = profile, None, 0

    def __enter__(self) -> Browser:
        import httpx
        from websockets.sync.client import connect

        active = self.profile / "DevToolsActivePort"   # Chromium writes its chosen port here
        deadline = time.monotonic() + 60
        while not (active.is_file() and active.read_text().strip()):
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            assert time.monotonic() < deadline, "chromium did not open its debugging port"
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 << 20)
        return self

    def __exit__(self, *exc) -> None:
        if self.ws:
            self.ws.close()
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()

    def send(self, method: str, **params) -> dict:
        import json

        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:   # events in between are not needed: readiness is polled with evaluate
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, (method, msg["error"])
                return msg["result"]

    def evaluate(self, js: str):
        res = self.send("Runtime.evaluate", expression=js, returnByValue=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait_for(self, js: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(js):
            assert time.monotonic() < deadline, f"timed out waiting for {js}"
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        x, y = self.evaluate(f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
                             f"(document.querySelector({selector!r}).getBoundingClientRect())")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, text: str) -> None:
        for ch in text:   # one key event per character, as a keyboard sends them
            self.send("Input.dispatchKeyEvent", type="keyDown", key=ch, text=ch)
            self.send("Input.dispatchKeyEvent", type="keyUp", key=ch)

    def press_enter(self) -> None:
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}
        self.send("Input.dispatchKeyEvent", type="keyDown", text="\r", **key)
        self.send("Input.dispatchKeyEvent", type="keyUp", **key)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_a_query_typed_into_the_page_shows_three_rankings(service, tmp_path):
    import base64
    import struct

    question = "what is a tiger ?"
    with LiveServer(service) as server, Browser(tmp_path / "profile") as page:
        page.send("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=server.url + "/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('q')")
        assert page.evaluate("document.body.dataset.done") is None   # nothing searched yet
        page.click("#q")
        page.type(question)
        assert page.evaluate("document.activeElement.id + '|' + document.getElementById('q').value") \
            == "q|" + question
        page.press_enter()
        page.wait_for("document.body.dataset.done === '1'")
        shown = page.evaluate("""Object.fromEntries(["bm25", "dense", "hybrid"].map(m => [m,
            [...document.querySelectorAll('#col-' + m + ' li.hit')].map(li =>
                [li.dataset.id, li.querySelector('.t').textContent, li.querySelector('.x').textContent])]))""")
        status, address = page.evaluate("[document.getElementById('status').textContent, location.search]")
        shot = tmp_path / "page.png"
        shot.write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))
    text = {p.id: p for p in corpus()}
    c = TestClient(create_app(service))
    assert list(shown) == ["bm25", "dense", "hybrid"]
    for mode, hits in shown.items():
        ref = c.get("/search", params={"q": question, "k": 10, "mode": mode}).json()["hits"]   # the form's k: 10
        assert [h[0] for h in hits] == [h["id"] for h in ref] and hits, mode
        assert all(t == text[i].title and x == text[i].text for i, t, x in hits), mode
    assert shown["bm25"][0][1] == "Tiger"   # the passage about tigers leads BM25's column, by its title
    assert status == "release v1" and "q=what+is+a+tiger" in address
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1400, 1000)
    assert len(png) > 20_000   # a blank page compresses to a few kB
