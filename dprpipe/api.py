"""The HTTP layer of the search service: a FastAPI app over `serve.Service`.

GET /search?q=...&k=10&mode=bm25|dense|hybrid   JSON hits (see `serve.Service.search`)
GET /health                                      {"version": ...} (503 before the first release)
GET /                                            a page with the three rankings side by side

Errors are JSON {"error": "<one line>"} with a 4xx (503 while no release is promoted). The page is
plain HTML and JavaScript with nothing fetched from elsewhere; `/?q=...` searches on load.

Inputs: a `Service`. Outputs: a FastAPI application.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from .serve import MAX_K, MAX_QUERY_BYTES, MODES, BadRequest, Service


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="dprpipe search", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/search")
    async def search(request: Request):
        try:
            # the raw bytes: Starlette's own parsing would turn invalid UTF-8 into U+FFFD silently
            body = await run_in_threadpool(service.search, request.scope["query_string"])
        except BadRequest as e:
            return JSONResponse({"error": e.reason}, status_code=e.status)
        return JSONResponse(body)

    @app.get("/health")
    async def health():
        rel = service.current
        if rel is None:
            return JSONResponse({"error": "no release is promoted yet"}, status_code=503)
        return {"version": rel.version, "passages": rel.n_docs}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dprpipe search</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #222; }
form { margin-bottom: 1em; }
#q { width: 50%; font-size: 16px; padding: 4px; }
#cols { display: flex; gap: 1.5em; align-items: flex-start; }
.col { flex: 1 1 0; min-width: 0; }
.col h2 { font-size: 16px; margin: 0 0 .5em; border-bottom: 2px solid #888; }
.hit { margin-bottom: .8em; padding: .3em .4em; border-left: 4px solid transparent; }
.hit.only { border-left-color: #d08000; background: #fff6e6; }
.hit .t { font-weight: 600; }
.hit .m { color: #666; font-size: 12px; }
.hit .x { font-size: 13px; max-height: 5.6em; overflow: hidden; }
#status { color: #666; }
.err { color: #b00; }
</style></head>
<body>
<h1>dprpipe search</h1>
<form id="f">
  <input id="q" name="q" placeholder="Ask a question" autofocus>
  k <input id="k" name="k" type="number" min="1" max="__MAX_K__" value="10" style="width:4em">
  <button type="submit">Search</button>
  <span id="status"></span>
</form>
<p class="m">Shaded hits are missing from the other two columns' top k. Queries up to __MAX_BYTES__ bytes.</p>
<div id="cols"></div>
<script>
const MODES = __MODES__;
const cols = document.getElementById("cols");
for (const m of MODES) {
  const c = document.createElement("div");
  c.className = "col"; c.id = "col-" + m;
  c.innerHTML = "<h2>" + m + "</h2><ol></ol>";
  cols.appendChild(c);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function run(q, k) {
  const status = document.getElementById("status");
  status.textContent = "searching...";
  const params = m => new URLSearchParams({q: q, k: k, mode: m});
  const answers = await Promise.all(MODES.map(m =>
    fetch("/search?" + params(m)).then(r => r.json().then(j => ({ok: r.ok, j: j})))));
  const ids = answers.map(a => new Set(a.ok ? a.j.hits.map(h => h.id) : []));
  let version = "";
  answers.forEach((a, i) => {
    const ol = document.querySelector("#col-" + MODES[i] + " ol");
    ol.replaceChildren();
    if (!a.ok) { ol.appendChild(el("li", "err", a.j.error)); return; }
    version = a.j.version;
    for (const h of a.j.hits) {
      const only = ids.every((s, j) => j === i || !s.has(h.id));
      const li = el("li", "hit" + (only ? " only" : ""));
      li.dataset.id = h.id;
      li.appendChild(el("div", "t", h.title || "(untitled)"));
      li.appendChild(el("div", "m", h.id + "  score " + h.score.toFixed(4)));
      li.appendChild(el("div", "x", h.text));
      ol.appendChild(li);
    }
    ol.parentElement.querySelector("h2").textContent = MODES[i] + " (" + a.j.took_ms.toFixed(1) + " ms)";
  });
  status.textContent = version ? "release " + version : "";
  document.body.dataset.done = "1";
}
document.getElementById("f").addEventListener("submit", ev => {
  ev.preventDefault();
  const q = document.getElementById("q").value, k = document.getElementById("k").value;
  history.replaceState(null, "", "/?" + new URLSearchParams({q: q, k: k}));
  run(q, k);
});
const start = new URLSearchParams(location.search);
if (start.get("q")) {
  document.getElementById("q").value = start.get("q");
  if (start.get("k")) document.getElementById("k").value = start.get("k");
  document.getElementById("f").requestSubmit();
}
</script>
</body></html>
""".replace("__MODES__", str(list(MODES)).replace("'", '"')).replace("__MAX_K__", str(MAX_K)) \
   .replace("__MAX_BYTES__", f"{MAX_QUERY_BYTES:,}")
