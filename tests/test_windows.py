"""Long texts scored in windows (max_chunks_per_doc): each window exactly as that window alone, the text as its
best window, the default (None) unchanged, and with the document cache each window its own prefix."""

from __future__ import annotations

import pytest

from m0lite import InputError, Reranker
from m0lite.documents import text_windows, window_tokens

QUERY = "where did the gold rush merchants get rich"
WORDS = ("merchants sold supplies to miners during the California Gold Rush and made more money than "
         "most miners who dug for gold in the rivers of the Sierra Nevada ").split()
LONG = " ".join(WORDS[i % len(WORDS)] + ("." if i % 13 == 12 else "") for i in range(260))
# A small document budget so that the text needs several windows: max(64 - 16, 16) = 48 tokens, windows of 47.
BUDGET = dict(max_length=64, max_query_length=16)


def windows(rr, text, k, overlap):
    _, offsets = rr.tokenizer.encode_with_offsets(text)
    return text_windows(offsets, len(text), 48, k, overlap)


def test_each_window_scores_as_that_window_alone(tiny_reranker):
    spans = windows(tiny_reranker, LONG, 4, 8)
    assert len(spans) == 4
    parts = tiny_reranker.rank(QUERY, [LONG], max_chunks_per_doc=4, chunk_overlap=8, pages_as_documents=True, **BUDGET)
    alone = tiny_reranker.rank(QUERY, [LONG[a:b] for a, b in spans], **BUDGET)
    assert sorted((tuple(r["window"].values()), r["relevance_score"]) for r in parts) == \
        sorted((spans[r["index"]], r["relevance_score"]) for r in alone)
    best = tiny_reranker.rank(QUERY, [LONG], max_chunks_per_doc=4, chunk_overlap=8, **BUDGET)[0]
    assert best["relevance_score"] == max(r["relevance_score"] for r in alone)
    assert best["window"] == parts[0]["window"]


def test_windows_cover_the_budget_and_overlap(tiny_reranker):
    tok = tiny_reranker.tokenizer
    ids, offsets = tok.encode_with_offsets(LONG)
    spans = windows(tiny_reranker, LONG, 100, 8)
    assert spans[0][0] == 0 and spans[-1][1] == len(LONG)
    size = window_tokens(48)
    assert len(spans) == -(-(len(ids) - 8) // (size - 8))  # every window but the last moves on size - 8 tokens
    for (a, b), (c, _) in zip(spans, spans[1:]):
        assert len(tok.encode(LONG[a:b])) < 48  # read whole, never cut
        assert c < b and len(tok.encode(LONG[c:b])) in range(7, 10)  # the shared tokens, give or take an edge
    assert windows(tiny_reranker, "short text", 3, 8) == [(0, 10)]


def test_default_is_the_truncated_text_unchanged(tiny_reranker):
    docs = [LONG, "short text"]
    default = tiny_reranker.rank(QUERY, docs, **BUDGET)
    assert all(set(r) == {"index", "relevance_score"} for r in default)
    one = tiny_reranker.rank(QUERY, docs, max_chunks_per_doc=1, **BUDGET)  # the first window: the text's start
    short = next(r for r in one if r["index"] == 1)
    assert short["window"] == {"start": 0, "end": 10}
    assert short["relevance_score"] == next(r for r in default if r["index"] == 1)["relevance_score"]
    assert tiny_reranker.compute_score([QUERY, LONG], **BUDGET) == tiny_reranker.compute_score(
        [QUERY, LONG], max_chunks_per_doc=None, **BUDGET)


def test_compute_score_and_score_pairs_take_the_best_window(tiny_reranker):
    spans = windows(tiny_reranker, LONG, 3, 16)
    alone = tiny_reranker.compute_score([[QUERY, LONG[a:b]] for a, b in spans], **BUDGET)
    assert tiny_reranker.compute_score([[QUERY, LONG]], max_chunks_per_doc=3, chunk_overlap=16, **BUDGET) == \
        pytest.approx([max(alone)], rel=1e-6)
    (detail,), (length,) = tiny_reranker.score_pairs([(QUERY, LONG)], max_chunks_per_doc=3, chunk_overlap=16,
                                                     details=True, **BUDGET)
    assert detail[0] == detail[1][0][0] and len(detail[1]) == 3 and length > 3 * 40


def test_document_cache_keeps_each_window_its_own_prefix(tiny_ckpt, tiny_reranker):
    cached = Reranker.from_pretrained(tiny_ckpt, dtype="float32", doc_cache_bytes=64 * 2**20)
    kw = dict(max_chunks_per_doc=4, chunk_overlap=8, pages_as_documents=True, **BUDGET)
    expected = tiny_reranker.rank(QUERY, [LONG], **kw)
    for query in (QUERY, "another question about miners"):
        got = cached.rank(query, [LONG], **kw)
        if query == QUERY:
            assert [(r["window"], r["relevance_score"]) for r in got] == \
                [(r["window"], pytest.approx(r["relevance_score"], abs=1e-5)) for r in expected]
    assert len(cached.doc_cache) == 4 and cached.doc_cache.hits == 4


@pytest.mark.parametrize("kw, message", [(dict(max_chunks_per_doc=0), "max_chunks_per_doc"),
                                         (dict(max_chunks_per_doc="3"), "max_chunks_per_doc"),
                                         (dict(max_chunks_per_doc=2, chunk_overlap=47), "chunk_overlap"),
                                         (dict(max_chunks_per_doc=2, chunk_overlap=-1), "chunk_overlap")])
def test_bad_window_options(tiny_reranker, kw, message):
    with pytest.raises(InputError, match=message):
        tiny_reranker.rank(QUERY, [LONG], **kw, **BUDGET)
