"""Long texts in windows through the server: max_chunks_per_doc (and chunk_overlap) in the Jina and Cohere shapes
score a text as Reranker.rank does with the same options, and the result names its best window; without them,
nothing changes. In process (TestClient)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from m0lite.server import ServerSettings, build_app  # noqa: E402
from tests.test_windows import BUDGET, LONG, QUERY  # noqa: E402

DOCS = [LONG, "merchants sold shovels", LONG[400:]]


@pytest.fixture(scope="module")
def client(tiny_reranker):
    with TestClient(build_app(tiny_reranker, ServerSettings(**BUDGET))) as c:
        yield c


def by_index(results):
    return {r["index"]: r for r in results}


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_windows_score_as_rank_does(client, tiny_reranker, route):
    options = dict(max_chunks_per_doc=3, chunk_overlap=8)
    r = client.post(route, json={"query": QUERY, "documents": DOCS, **options})
    assert r.status_code == 200, r.text
    got = by_index(r.json()["results"])
    expected = by_index(tiny_reranker.rank(QUERY, DOCS, **options, **BUDGET))
    assert len(got) == 3
    for i, e in expected.items():
        assert got[i]["relevance_score"] == pytest.approx(e["relevance_score"], rel=1e-5)
        assert got[i]["window"] == e["window"]
    assert got[1]["window"] == {"start": 0, "end": len(DOCS[1])}  # a text that fits is its one window
    assert got[0]["window"]["end"] < len(LONG)  # the long text is not read whole in 3 windows


def test_default_overlap_and_no_option_unchanged(client, tiny_reranker):
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 2})
    assert r.status_code == 200, r.text
    expected = by_index(tiny_reranker.rank(QUERY, DOCS, max_chunks_per_doc=2, **BUDGET))
    for i, x in by_index(r.json()["results"]).items():
        assert x["relevance_score"] == pytest.approx(expected[i]["relevance_score"], rel=1e-5)
        assert x["window"] == expected[i]["window"]
    plain = client.post("/rerank", json={"query": QUERY, "documents": DOCS})
    assert plain.status_code == 200
    expected = by_index(tiny_reranker.rank(QUERY, DOCS, **BUDGET))
    for i, x in by_index(plain.json()["results"]).items():
        assert "window" not in x
        assert x["relevance_score"] == pytest.approx(expected[i]["relevance_score"], rel=1e-5)


def test_usage_counts_every_window(client):
    one = client.post("/rerank", json={"query": QUERY, "documents": [LONG]}).json()["usage"]["total_tokens"]
    three = client.post("/rerank", json={"query": QUERY, "documents": [LONG], "max_chunks_per_doc": 3}).json()
    assert three["usage"]["total_tokens"] > 2 * one


@pytest.mark.parametrize("body, needle", [
    ({"max_chunks_per_doc": 0}, "max_chunks_per_doc: expected an integer of at least 1, got 0"),
    ({"max_chunks_per_doc": "3"}, "max_chunks_per_doc: expected an integer of at least 1, got a string"),
    ({"max_chunks_per_doc": True}, "max_chunks_per_doc: expected an integer of at least 1, got a boolean"),
    ({"max_chunks_per_doc": 2, "chunk_overlap": -1}, "chunk_overlap: expected an integer of at least 0"),
    ({"max_chunks_per_doc": 2, "chunk_overlap": 47}, "chunk_overlap (47) must be smaller than a window (47 tokens"),
    ({"max_chunks_per_doc": 2, "explain": True}, "explain: not with max_chunks_per_doc"),
])
def test_bad_window_options(client, body, needle):
    r = client.post("/rerank", json={"query": QUERY, "documents": DOCS, **body})
    assert r.status_code == 422 and needle in r.json()["detail"], r.text
