"""PDF documents through the server: the Jina and Cohere shapes take {"pdf": ...} (never a local path), results
carry `pages`, limits answer 413 naming their flag, the worker process dies alone, and a fuzz run of mutated
PDFs gets no 5xx. In process (TestClient); nothing outside this machine is contacted."""

from __future__ import annotations

import base64
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("pypdfium2")

from fastapi.testclient import TestClient  # noqa: E402

from bench.fuzz_pdf import StandIn, run  # noqa: E402
from m0lite.errors import PdfError  # noqa: E402
from m0lite.fixtures.pdfs import picture_pdf, text_pdf  # noqa: E402
from m0lite.server import ServerSettings, build_app  # noqa: E402
from m0lite.server.pdfs import PdfRenderer  # noqa: E402

QUERY = "quarterly revenue"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(tiny_reranker):
    with TestClient(build_app(tiny_reranker, ServerSettings(max_pdf_pages=4, max_pdf_bytes=200_000))) as c:
        yield c


def test_rerank_scores_a_pdf_as_its_best_page(client, tiny_reranker):
    data = picture_pdf([(595, 842), (960, 540), (612, 792)], seed=11)
    docs = ["a text", {"pdf": b64(data)}, {"pdf": "data:application/pdf;base64," + b64(data), "pages": "2-3"}]
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": docs})
    assert r.status_code == 200, r.text
    got = {x["index"]: x for x in r.json()["results"]}
    expected = {x["index"]: x for x in tiny_reranker.rank(QUERY, [docs[0], {"pdf": data}, {"pdf": data, "pages": "2-3"}])}
    for i in (1, 2):
        assert got[i]["relevance_score"] == pytest.approx(expected[i]["relevance_score"], rel=1e-5)
        assert [p["page"] for p in got[i]["pages"]] == [p["page"] for p in expected[i]["pages"]]
        assert got[i]["document"] == docs[i]
    assert "pages" not in got[0]
    cohere = client.post("/v2/rerank", json={"query": QUERY, "documents": docs[1:2]})
    assert cohere.status_code == 200 and cohere.json()["results"][0]["pages"][0]["page"] == got[1]["pages"][0]["page"]


def test_pdf_text(client, tiny_reranker):
    data = text_pdf([(595, 842, "Revenue grew in Q3")])
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": [{"pdf": b64(data)}], "pdf_text": True})
    assert r.status_code == 200, r.text
    expected = tiny_reranker.rank(QUERY, [{"pdf": data}], pdf_text=True)[0]["relevance_score"]
    assert r.json()["results"][0]["relevance_score"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("doc, status, needles", [
    ({"pdf": "/etc/passwd"}, 422, ["documents[0]", "looks like a file path"]),
    ({"pdf": "report.pdf"}, 422, ["documents[0]", "files are not read here"]),
    ({"pdf": b64(text_pdf([(595, 842, "x")], encrypt=True))}, 422, ["documents[0]", "encrypted"]),
    ({"pdf": b64(text_pdf([]))}, 422, ["documents[0]", "has no pages"]),
    ({"pdf": b64(text_pdf([(1e6, 1, None)]))}, 422, ["page 1", "aspect ratio"]),
    ({"pdf": b64(b"%PDF-1.7\n" + b"\xff" * 300)}, 422, ["not a valid PDF"]),
    ({"pdf": b64(text_pdf([(595, 842, None)] * 5))}, 413, ["5 pages to render, over the limit of 4", "--max-pdf-pages"]),
    ({"pdf": b64(text_pdf([(595, 842, None)] * 5)), "pages": "1-2"}, 200, []),
    ({"pdf": b64(b"%PDF-1.4\n" + b"0" * 300_000)}, 413, ["--max-pdf-bytes"]),
    ({"pdf": b64(text_pdf([(595, 842, None)])), "text": "x"}, 422, ["'text' or 'image' does not go with 'pdf'"]),
    ({"pdf": 3}, 422, ["documents[0].pdf"]),
    ({"pdf": b64(text_pdf([(595, 842, None)])), "pages": [1]}, 422, ["documents[0].pages"]),
])
def test_bad_pdfs(client, doc, status, needles):
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": [doc]})
    assert r.status_code == status, r.text
    for needle in needles:
        assert needle in r.json()["detail"]


def test_explain_refuses_pdfs(client):
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": [{"pdf": b64(text_pdf([(595, 842, None)]))}],
                                        "explain": True})
    assert r.status_code == 422 and "PDF" in r.json()["detail"]


def test_a_worker_that_dies_is_an_error_and_replaced():
    renderer = PdfRenderer(timeout=20)
    data = text_pdf([(595, 842, "x")])
    try:
        assert [p.number for p in renderer.render(data, "a.pdf", None)] == [1]
        renderer._proc.kill()  # as if PDFium had crashed on the file
        renderer._proc.join()
        renderer._proc.is_alive = lambda: True  # noqa: the renderer finds out by sending it the next file
        with pytest.raises(PdfError, match="a.pdf: the PDF renderer died on this file"):
            renderer.render(data, "a.pdf", None)
        assert renderer.restarts == 1
        assert [p.text for p in renderer.render(data, "a.pdf", None, with_text=True)] == ["x"]
        renderer.timeout = 1e-4
        with pytest.raises(PdfError, match=r"not rendered within 0.0001 s \(--pdf-timeout\)"):
            renderer.render(picture_pdf([(595, 842)] * 30), "big.pdf", None)
        assert renderer.restarts == 2
    finally:
        renderer.close()


def test_fuzz_mutated_pdfs_get_no_5xx():
    """A few hundred mutated PDFs (seeded; stopped at 40 s on a slow machine): never a 5xx, and the server and
    its worker still answer afterwards."""
    with TestClient(build_app(StandIn(), ServerSettings(pdf_timeout=10))) as c:
        statuses = run(c, 300, seed=1, deadline=time.monotonic() + 40)
        assert sum(statuses.values()) >= 100 and 200 in statuses and 422 in statuses
        good = c.post("/v1/rerank", json={"query": "q", "documents": [{"pdf": b64(text_pdf([(595, 842, "ok")]))}]})
        assert good.status_code == 200 and c.get("/health").status_code == 200
