"""Hard-negative mining: BM25 order (rank_bm25 as the reference), gold passages excluded, count capped."""

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from dprpipe.mine import MineConfig, Miner, passage_text
from dprpipe.records import Passage, Query

CORPUS = [
    Passage("p0", "Eiffel Tower", "The tower in Paris was built for the 1889 world fair."),
    Passage("p1", "Paris", "Paris is the capital and largest city of France."),
    Passage("p2", "Louvre", "The Louvre museum in Paris holds the Mona Lisa."),
    Passage("p3", "Paris", "A tower of steel and a city of light."),                  # answer in title only
    Passage("p4", "Lyon", "Lyon is a city in France with a tower on the hill."),
    Passage("p5", "Berlin", "Berlin has a television tower."),
    Passage("p6", "Cooking", "Bread and cheese."),
    Passage("p7", "Seine", "The Seine flows through Paris and past the tower."),
    Passage("p8", "Towers", "Every tower in every city: a tower survey of France."),
]

CFG = MineConfig(depth=100, negatives=30)


def reference_ranking(query_text, cfg=CFG, corpus=CORPUS):
    """Passage ids by rank_bm25 score over the same analyzer tokens, best first; ties by position."""
    analyzer = cfg.analyzer()
    bm25 = BM25Okapi([analyzer(passage_text(p, cfg.use_title)) for p in corpus], k1=cfg.k1, b=cfg.b,
                     epsilon=cfg.epsilon)
    scores = bm25.get_scores(analyzer(query_text))
    order = sorted(range(len(corpus)), key=lambda i: (-scores[i], i))
    return [(corpus[i].id, scores[i]) for i in order if scores[i] > 0]


@pytest.fixture(scope="module")
def miner():
    return Miner(CORPUS, CFG)


def test_run_equals_rank_bm25(miner):
    queries = [Query("q1", "tower city France"), Query("q2", "Paris tower"), Query("q3", "unknownword")]
    run = miner.run(queries, depth=5)
    for q in queries:
        ref = reference_ranking(q.text)[:5]
        assert [d for d, _ in run[q.id]] == [d for d, _ in ref]
        assert np.allclose([s for _, s in run[q.id]], [s for _, s in ref])
    assert run["q3"] == []          # zero-score passages are not hits


def test_negatives_follow_bm25_order_without_positives(miner):
    q = Query("q", "tower city France", relevant={"p8": 1, "p4": 2, "p6": 0})
    negs = miner.negatives([q])["q"]
    ref = [(d, s) for d, s in reference_ranking(q.text) if d not in ("p8", "p4")]
    assert [d for d, _ in negs] == [d for d, _ in ref]
    assert np.allclose([s for _, s in negs], [s for _, s in ref])
    assert "p8" not in dict(negs) and "p4" not in dict(negs)


def test_grade_zero_judgement_can_be_a_negative(miner):
    q = Query("q", "tower city France", relevant={"p8": 0})
    assert "p8" in dict(miner.negatives([q])["q"])


def test_passages_containing_an_answer_are_not_negatives(miner):
    q = Query("q", "Paris tower", answers=("Paris",))
    negs = [d for d, _ in miner.negatives([q])["q"]]
    ranking = [d for d, _ in reference_ranking(q.text)]
    # p0, p1, p2, p7 mention Paris in their text; p3 only in its title, so it stays a negative
    assert negs == [d for d in ranking if d not in ("p0", "p1", "p2", "p7")]
    assert {"p0", "p1", "p2", "p7"} <= set(ranking)   # they were candidates
    assert "p3" in negs


def test_answers_use_dpr_matching(miner):
    # "light" is a token of p3's text; "Lisa" of p2's; "Mona Lisa" matched as a token window
    q = Query("q", "Paris tower Louvre light", answers=("city of light", "Mona Lisa"))
    negs = [d for d, _ in miner.negatives([q])["q"]]
    assert {"p2", "p3"} <= {d for d, _ in reference_ranking(q.text)}
    assert "p3" not in negs and "p2" not in negs
    assert "p1" in negs  # "city" alone is not the answer "city of light"


def test_regex_answer_match():
    miner = Miner(CORPUS, MineConfig(answer_match="regex"))
    q = Query("q", "tower city", answers=(r"\d{4}",))          # p0 has a year
    negs = [d for d, _ in miner.negatives([q])["q"]]
    assert "p0" not in negs
    assert negs == [d for d, _ in reference_ranking("tower city") if d != "p0"]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_count_is_capped(count):
    miner = Miner(CORPUS, MineConfig(negatives=count))
    q = Query("q", "tower city France", relevant={"p8": 1})
    negs = miner.negatives([q])["q"]
    assert [d for d, _ in negs] == [d for d, _ in reference_ranking(q.text) if d != "p8"][:count]


def test_depth_limits_where_negatives_come_from():
    # the top 2 are p8 (positive) and one other: only one negative is within depth 2
    miner = Miner(CORPUS, MineConfig(depth=2, negatives=5))
    q = Query("q", "tower city France", relevant={reference_ranking("tower city France")[0][0]: 1})
    negs = miner.negatives([q])["q"]
    assert [d for d, _ in negs] == [d for d, _ in reference_ranking(q.text)[1:2]]


def test_several_queries_keep_their_own_negatives(miner):
    queries = [Query("a", "Berlin television"), Query("b", "bread cheese"), Query("c", "zzz")]
    out = miner.negatives(queries)
    assert list(out) == ["a", "b", "c"]
    assert out["a"][0][0] == "p5" and out["b"][0][0] == "p6" and out["c"] == []


def test_use_title_false_ignores_titles():
    miner = Miner(CORPUS, MineConfig(use_title=False))
    run = miner.run([Query("q", "Lyon Eiffel")], depth=10)
    # "Eiffel" only appears in a title; "Lyon" in p4's text
    assert [d for d, _ in run["q"]] == ["p4"]
    cfg = MineConfig(use_title=False)
    assert [d for d, _ in run["q"]] == [d for d, _ in reference_ranking("Lyon Eiffel", cfg)]


def test_zero_negatives_means_none():
    miner = Miner(CORPUS, MineConfig(negatives=0))
    assert miner.negatives([Query("q", "tower city France")]) == {"q": []}


def test_negatives_are_keyed_by_query_not_by_position():
    # two queries with the same id (a malformed split) must not shift the others' negatives
    miner = Miner(CORPUS, CFG)
    out = miner.negatives([Query("a", "Berlin television"), Query("a", "Berlin television"),
                           Query("b", "bread cheese", relevant={"p6": 1})])
    assert out["b"] == []   # p6, its only hit, is its positive



@pytest.mark.parametrize("cache_size", [0, 3, 1 << 18])
def test_analyzer_stems_equal_pystemmer_whatever_the_cache(monkeypatch, cache_size):
    # text.Analyzer memoises stems (bounded); the tokens must be PyStemmer's either way
    import regex
    import Stemmer

    import dprpipe.text as text

    monkeypatch.setattr(text, "_STEM_CACHE_SIZE", cache_size)
    text._stem_cache.cache_clear()
    stemmer = Stemmer.Stemmer("porter")
    analyzer = MineConfig().analyzer()
    for p in CORPUS * 2:  # twice: the second pass reads the cache
        words = [w for w in regex.findall(r"\w+", passage_text(p, True).lower()) if w not in text.ENGLISH_STOPWORDS]
        assert analyzer(passage_text(p, True)) == stemmer.stemWords(words)
    assert len(text._stem_cache("porter")) <= cache_size
    text._stem_cache.cache_clear()
