"""Data checks of the prepare step: find what is wrong with a dataset that parses.

Inputs: plain columns of the records as read (ids, texts, judgement pairs) and, for each
record, the file and line it came from. Outputs: a list of `Finding`s per check, each naming
where the case is, what is wrong and which record it is (so prepare can drop it). The checks
decide nothing: `enforce` applies a `prepare.on_<check>` policy to them, "error" (a DataError
naming the first case) or "warn" (one line on stderr); the counts go to the data report.

Checks: `duplicate_ids` (a passage, query or judgement seen twice), `empty_texts`,
`missing_passages` (a judgement of a passage or query that is not in the data),
`unjudged_queries` (no relevant passage) and `leakage` (one question in two splits).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Mapping, Sequence
from dataclasses import dataclass

from .io import DataError, clip

Loc = tuple[str, "int | None"]
"""A file and a line (None where the format has no line for the record)."""

CHECKS = ("duplicate_ids", "empty_texts", "missing_passages", "unjudged_queries", "leakage")

ON_WARN = {   # what prepare does with the cases of a check whose policy is "warn"
    "duplicate_ids": "keep the first record of each id",
    "empty_texts": "keep them",
    "missing_passages": "drop those judgements",
    "unjudged_queries": "keep them (a query that no qrels file names is in no split, as in BEIR)",
    "leakage": "keep them in both splits",
}


@dataclass(frozen=True)
class Finding:
    """One case of a check: where it is, what is wrong, and the record's position in its list."""

    check: str
    where: Loc
    message: str
    index: int | None = None


def _first_at(first: Loc, here: Loc) -> str:
    """'line 3' when both are in one file, else 'corpus.jsonl:3'."""
    if first[0] == here[0]:
        return f"line {first[1]}" if first[1] is not None else "earlier in the file"
    return f"{first[0]}:{first[1]}" if first[1] is not None else first[0]


def duplicate_ids(keys: Sequence[Hashable], where: Sequence[Loc], describe: Callable[[Hashable], str]
                  ) -> list[Finding]:
    """Every record whose key was seen before; the first record of each key is not a finding.

    >>> at = [("c.jsonl", 1), ("c.jsonl", 2), ("c.jsonl", 3)]
    >>> [(f.where, f.message, f.index) for f in duplicate_ids(["a", "b", "a"], at, lambda k: f"id {k!r}")]
    [(('c.jsonl', 3), "duplicate id 'a' (first at line 1)", 2)]
    """
    first: dict[Hashable, int] = {}
    out = []
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            out.append(Finding("duplicate_ids", where[i],
                               f"duplicate {describe(key)} (first at {_first_at(where[j], where[i])})", i))
    return out


def empty_texts(texts: Sequence[str], ids: Sequence[str], where: Sequence[Loc], what: str,
                skip: Container[int] = ()) -> list[Finding]:
    """Records whose text is empty or only whitespace (a title alone does not count as text).

    >>> [f.message for f in empty_texts(["ok", " \\n"], ["a", "b"], [("q", 1), ("q", 2)], "query")]
    ["query 'b' has an empty text"]
    """
    return [Finding("empty_texts", where[i], f"{what} {clip(ids[i])} has an empty text", i)
            for i, text in enumerate(texts) if not text.strip() and i not in skip]


def missing_ids(pairs: Sequence[tuple[str, str]], where: Sequence[Loc], query_ids: Container[str],
                passage_ids: Container[str], skip: Container[int] = ()) -> list[Finding]:
    """Judgements (qid, docid) of a passage, or of a query, that the dataset does not have.

    >>> [f.message for f in missing_ids([("q", "d"), ("q", "x")], [("t", 1), ("t", 2)], {"q"}, {"d"})]
    ["query 'q' is judged against passage 'x', which is not in the corpus"]
    """
    out = []
    for i, (qid, docid) in enumerate(pairs):
        if i in skip:
            continue
        if qid not in query_ids:
            out.append(Finding("missing_passages", where[i], f"judgement of query {clip(qid)}, "
                               "which is not among the queries", i))
        elif docid not in passage_ids:
            out.append(Finding("missing_passages", where[i], f"query {clip(qid)} is judged against passage "
                               f"{clip(docid)}, which is not in the corpus", i))
    return out


def unjudged_queries(query_ids: Sequence[str], where: Sequence[Loc], judged: Container[str],
                     in_split: Container[str], skip: Container[int] = ()) -> list[Finding]:
    """Queries with no relevant passage: no judgement with a grade above 0.

    >>> fs = unjudged_queries(["a", "b", "c"], [("q", 1), ("q", 2), ("q", 3)], {"a"}, {"a", "b"})
    >>> [f.message for f in fs]
    ["query 'b' has no relevant passage", "query 'c' has no relevant passage (no qrels file names it)"]
    """
    out = []
    for i, qid in enumerate(query_ids):
        if qid in judged or i in skip:
            continue
        why = "" if qid in in_split else " (no qrels file names it)"
        out.append(Finding("unjudged_queries", where[i], f"query {clip(qid)} has no relevant passage{why}", i))
    return out


def normalize(text: str) -> str:
    """The form two question texts are compared in: case-folded, whitespace collapsed.

    >>> normalize("  Obesity decreases\\tLIFE quality. ")
    'obesity decreases life quality.'
    """
    return " ".join(text.casefold().split())


def leakage(splits: Mapping[str, Sequence[tuple[str, str]]], where: Mapping[str, Loc]) -> list[Finding]:
    """Queries whose text (normalised) is also the text of a query of an earlier split.

    `splits` maps each split, in order, to its (query id, text) pairs; one finding per query of
    a later split that repeats an earlier split's question (a question repeated inside one
    split is not a leak).

    >>> fs = leakage({"train": [("1", "Is it?")], "test": [("2", "is  it?"), ("3", "new")]},
    ...              {"1": ("q.jsonl", 1), "2": ("q.jsonl", 2), "3": ("q.jsonl", 3)})
    >>> [(f.where, f.message) for f in fs]
    [(('q.jsonl', 2), "query '2' of test has the text of query '1' of train")]
    """
    seen: dict[str, tuple[str, str]] = {}
    out = []
    for split, queries in splits.items():
        here: dict[str, tuple[str, str]] = {}
        for qid, text in queries:
            key = normalize(text)
            if key in seen:
                other_split, other = seen[key]
                out.append(Finding("leakage", where.get(qid, (split, None)),
                                   f"query {clip(qid)} of {split} has the text of query {clip(other)} "
                                   f"of {other_split}"))
            here.setdefault(key, (split, qid))
        for key, first in here.items():
            seen.setdefault(key, first)
    return out


def enforce(findings: Sequence[Finding], check: str, policy: str, warn: Callable[[str], None]) -> None:
    """Apply `prepare.on_<check>`: "error" raises a DataError at the first case, "warn" reports them.

    Either way the message names the first case's file and line, and how many cases there are.
    """
    if not findings:
        return
    first = findings[0]
    path, line = first.where
    more = f" ({len(findings)} such cases)" if len(findings) > 1 else ""
    if policy == "error":
        raise DataError(path, line, f"{first.message}{more}; fix the data, or set prepare.on_{check}: warn "
                        f"to {ON_WARN[check]}")
    note = DataError(path, line, f"{first.message}{more}; prepare.on_{check} is warn: {ON_WARN[check]}")
    warn(f"warning: {note}")
