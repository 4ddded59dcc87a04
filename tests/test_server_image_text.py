"""The server takes documents of an image and text (Jina shape): scored as Reranker.rank scores them, echoed whole."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from m0lite.server import ServerSettings, build_app  # noqa: E402


def b64_page(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_and_text_documents_score_as_rank(tiny_reranker):
    page = b64_page(0)
    docs = [{"image": page, "text": "its caption"}, {"image": page}, "its caption", {"image": page, "text": ""}]
    with TestClient(build_app(tiny_reranker, ServerSettings())) as c:
        r = c.post("/v1/rerank", json={"query": "slm markdown", "documents": docs})
        assert r.status_code == 200, r.text
        got = {x["index"]: x for x in r.json()["results"]}
        expected = {x["index"]: x["relevance_score"] for x in tiny_reranker.rank("slm markdown", docs)}
        assert [got[i]["relevance_score"] for i in range(4)] == pytest.approx([expected[i] for i in range(4)], abs=1e-5)
        assert got[0]["document"] == {"image": page, "text": "its caption"} and got[1]["document"] == {"image": page}
        assert r.json()["usage"]["total_tokens"] == sum(tiny_reranker.score_pairs([("slm markdown", d) for d in docs])[1])
        for body, where in (({"query": "q", "documents": [{"image": page, "text": 5}]}, "documents[0].text: expected a string"),
                            ({"query": "q", "documents": [{"image": page, "text": "<|image_pad|>"}]}, "documents[0].text"),
                            ({"query": {"image": page, "text": "q"}, "documents": ["a"]}, "query: give exactly one")):
            r = c.post("/v1/rerank", json=body)
            assert r.status_code == 422 and where in r.text, r.text
