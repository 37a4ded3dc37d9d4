"""Hybrid search and a small search CLI.

`hybrid_run` fuses a BM25 run and a dense run over the union of their hits (the paper reranks
the union by BM25 + 1.1 * dense; Pyserini min-max normalises each list first, which makes the
weight portable across models). Dense runs come from `index.Searcher`.

CLI (after `dvc repro`):
    python -m dprpipe.search "What causes scurvy?" -k 5
prints the top passages from the built index for a question.
"""

from __future__ import annotations

import argparse
import sys

from .io import Run


def _minmax(hits: list[tuple[str, float]]) -> dict[str, float]:
    if not hits:
        return {}
    scores = [s for _, s in hits]
    lo, hi = min(scores), max(scores)
    span = hi - lo
    return {d: (s - lo) / span if span > 0 else 1.0 for d, s in hits}


def hybrid_run(sparse: Run, dense: Run, weight: float, normalize: bool, depth: int = 1000) -> Run:
    """Fuse two runs: score = sparse + weight * dense over the union of hits.

    The weight and normalisation have no defaults here: they are EvaluateConfig's, chosen on dev.

    A passage missing from one list gets that list's lowest score for the query (0 after
    min-max normalisation), as Pyserini does.

    >>> hybrid_run({"q": [("a", 2.0), ("b", 1.0)]}, {"q": [("b", 0.9), ("c", 0.1)]}, 1.5, True)["q"]
    [('b', 1.5), ('a', 1.0), ('c', 0.0)]
    """
    out: Run = {}
    for qid in sparse.keys() | dense.keys():
        s_hits, d_hits = sparse.get(qid, []), dense.get(qid, [])
        if normalize:
            s, d = _minmax(s_hits), _minmax(d_hits)
        else:
            s, d = dict(s_hits), dict(d_hits)
        s_min = min(s.values(), default=0.0)
        d_min = min(d.values(), default=0.0)
        fused = {doc: s.get(doc, s_min) + weight * d.get(doc, d_min) for doc in s.keys() | d.keys()}
        out[qid] = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:depth]
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> None:
    from .records import read_corpus
    from .encode import encode_texts
    from .index import Searcher
    from .model import DualEncoder

    p = argparse.ArgumentParser(prog="python -m dprpipe.search", description="Top passages for a question.")
    p.add_argument("question", nargs="+")
    p.add_argument("-k", type=int, default=5, help="passages to show (default 5)")
    p.add_argument("--model", default="models/dpr", help="checkpoint folder (default: models/dpr)")
    p.add_argument("--index", default="data/index/dpr", help="index folder (default: data/index/dpr)")
    p.add_argument("--corpus", default="data/prepared/corpus.jsonl")
    args = p.parse_args(argv)
    try:
        model, _ = DualEncoder.load(args.model)
        searcher = Searcher.load(args.index)
        text = {x.id: x for x in read_corpus(args.corpus)}
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}\n(run `dvc repro` first, or pass --model/--index/--corpus)")
    q = encode_texts(model, [" ".join(args.question)], "query")
    hits, scores = searcher.search(q, args.k)
    for rank, (pid, score) in enumerate(zip(hits[0], scores[0]), start=1):
        psg = text.get(pid)
        body = f"{psg.title}: {psg.text}" if psg and psg.title else (psg.text if psg else "")
        print(f"{rank:>2}. [{pid}] {score:.4f}  {body[:300]}")


if __name__ == "__main__":
    main()
