"""The visual-token and document caches: exact (cached == uncached) and bounded in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite import Reranker
from m0lite.caches import TensorLRU
from m0lite.prompt import Side, build_prompt

QUERIES = ["slm markdown", "数据提取", "\nstarts with a newline", "what is the gold rush?"]
DOCS = ["ReaderLM-v2 converts HTML to markdown.", "数据提取么？为什么不用正则啊", "The California Gold Rush", "x" * 500, ""]


def page(seed, w=150, h=110):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    return Reranker.from_pretrained(tiny_ckpt, dtype="float32", vision_cache_bytes=0)


@pytest.fixture
def cached(tiny_ckpt):
    return Reranker.from_pretrained(tiny_ckpt, dtype="float32", doc_cache_bytes=64 * 2**20)


def test_document_cache_is_exact_for_text(plain, cached):
    for q in QUERIES:
        expected = plain.rank(q, DOCS)
        assert cached.rank(q, DOCS) == [pytest.approx(r, abs=1e-5) for r in expected]
    assert cached.doc_cache.hits >= len(DOCS) * (len(QUERIES) - 1) - len(DOCS)  # the first query fills it
    assert len(cached.doc_cache) == len(DOCS)


def test_document_cache_is_exact_for_images(plain, cached):
    docs = [page(0), "a text doc", {"image": page(1, 300, 60)}]
    for q in ["slm markdown", page(2), {"image": page(3)}]:
        expected = plain.rank(q, docs)
        assert cached.rank(q, docs) == [pytest.approx(r, abs=1e-5) for r in expected]
    assert cached.doc_cache.hits >= 6


def test_document_cache_with_compute_score_options(plain, cached):
    pairs = [[q, d] for q in QUERIES for d in DOCS]
    for kw in (dict(), dict(max_length=40), dict(max_doc_length=20, max_query_length=10, max_length=100)):
        assert cached.compute_score(pairs, normalize_scores=False, **kw) == pytest.approx(
            plain.compute_score(pairs, normalize_scores=False, **kw), abs=1e-5)


def test_prefix_split_refuses_a_changed_token_boundary(cached):
    tok = cached.tokenizer
    ok = build_prompt(tok, Side(text="plain query"), Side(text="doc"), max_length=10240, max_doc_length=9728, split_prefix=True)
    assert ok.prefix_len == len(tok.encode("**Document**:\ndoc\n**Query**:\n"))
    # ":\n" + "\n..." tokenizes as ":\n\n" inside the prompt, so the document part cannot be split off.
    bad = build_prompt(tok, Side(text="\nquery"), Side(text="doc"), max_length=10240, max_doc_length=9728, split_prefix=True)
    assert bad.prefix_len == 0


def test_document_cache_stays_under_its_bound(tiny_ckpt, plain):
    small = Reranker.from_pretrained(tiny_ckpt, dtype="float32", doc_cache_bytes=200_000)
    docs = [f"document number {i} " * (i + 1) for i in range(30)]
    assert small.rank("q", docs) == [pytest.approx(r, abs=1e-5) for r in plain.rank("q", docs)]
    assert 0 < small.doc_cache.nbytes <= 200_000 and len(small.doc_cache) < 30


def test_vision_cache_is_exact_and_bounded(tiny_ckpt, plain):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype="float32", vision_cache_bytes=20_000)
    images = [page(i, 100 + 30 * i, 90) for i in range(4)]
    first = rr.compute_score([["q", im] for im in images], doc_type="image", normalize_scores=False)
    again = rr.compute_score([["other q", im] for im in images], doc_type="image", normalize_scores=False)
    assert first == pytest.approx(plain.compute_score([["q", im] for im in images], doc_type="image", normalize_scores=False), abs=1e-5)
    assert again == pytest.approx(plain.compute_score([["other q", im] for im in images], doc_type="image", normalize_scores=False), abs=1e-5)
    assert rr.vision_cache.hits > 0 and rr.vision_cache.nbytes <= 20_000


def test_an_image_query_is_encoded_once_per_batch(tiny_ckpt, monkeypatch):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype="float32", vision_cache_bytes=0)
    calls = []
    forward = rr.model.visual.forward
    monkeypatch.setattr(rr.model.visual, "forward", lambda px, grids: calls.append(len(grids)) or forward(px, grids))
    rr.rank(page(7), DOCS)
    assert calls == [1]


def test_lru_evicts_oldest_and_skips_oversized():
    lru = TensorLRU(100)
    lru.put(b"a", torch.zeros(10))  # 40 bytes
    lru.put(b"b", torch.zeros(10))
    assert lru.get(b"a") is not None  # a is now the most recent
    lru.put(b"c", torch.zeros(10))  # evicts b
    assert lru.get(b"b") is None and lru.get(b"a") is not None and lru.nbytes == 80
    lru.put(b"huge", torch.zeros(1000))
    assert lru.get(b"huge") is None and lru.nbytes == 80
