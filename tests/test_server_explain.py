"""The server's explanations (`"explain": true` in the Jina shape): the numbers are Reranker.explain's for the
same pair, made on the model thread, for the results returned only; cut to --max-explanation-parts with the
counts left out; occlusion bounded by --max-occlusion-parts; bad values and other dialects refused."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from m0lite.server import ServerSettings, build_app  # noqa: E402

QUERY = "slm markdown"


def page(seed: int, w: int = 120, h: int = 90) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Recording:
    """The tiny reranker, recording the thread and the pair of each explain call."""

    def __init__(self, rr):
        self.rr, self.calls = rr, []

    def __getattr__(self, name):
        return getattr(self.rr, name)

    def explain(self, query, document, method, **kw):
        self.calls.append((threading.current_thread(), document, method))
        return self.rr.explain(query, document, method, **kw)


def assert_same(got: dict, want: dict, size=None) -> None:
    """A server explanation against Reranker.explain's for the same pair (nothing cut), numbers to float noise."""
    assert got["method"] == want["method"] and got["text_omitted"] == 0
    assert got["raw_score"] == pytest.approx(want["raw_score"], abs=1e-5)
    assert got["score"] == pytest.approx(want["score"], abs=1e-6)
    assert [(t["token"], t["start"], t["end"]) for t in got["text"]] == [(t["token"], t["start"], t["end"]) for t in want["text"]]
    assert [t["score"] for t in got["text"]] == pytest.approx([t["score"] for t in want["text"]], abs=1e-5)
    if want["image"] is None:
        assert got["image"] is None
        return
    g, w = got["image"], want["image"]
    assert (g["width"], g["height"], g["rows"], g["cols"], g["regions_omitted"]) == (w["width"], w["height"], w["rows"], w["cols"], 0)
    assert [(r["row"], r["col"]) for r in g["regions"]] == [(r["row"], r["col"]) for r in w["regions"]]
    assert [r["box"] for r in g["regions"]] == [pytest.approx(r["box"]) for r in w["regions"]]
    assert [r["score"] for r in g["regions"]] == pytest.approx([r["score"] for r in w["regions"]], abs=1e-5)


@pytest.mark.parametrize("method", ["attention", "occlusion"])
def test_explanations_are_reranker_explains_made_on_the_model_thread(tiny_reranker, method):
    images = [page(0), page(1, 150, 110)]
    text = "ReaderLM-v2 converts HTML to markdown, 数据提取."
    docs = [text, {"image": b64(images[0])}, {"image": b64(images[1]), "text": "its caption: markdown tables"}]
    local = [text, images[0], {"image": images[1], "text": "its caption: markdown tables"}]
    rec = Recording(tiny_reranker)
    app = build_app(rec, ServerSettings())
    with TestClient(app) as c:
        body = {"query": QUERY, "documents": docs, "explain": True}
        r = c.post("/v1/rerank", json={**body, "explain_method": method} if method != "attention" else body)
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        for res in results:
            got = res["explanation"]
            assert_same(got, tiny_reranker.explain(QUERY, local[res["index"]], method=method))
            assert got["score"] == pytest.approx(res["relevance_score"], abs=1e-6)
        assert [method] * 3 == [m for _, _, m in rec.calls]
        assert {t for t, _, _ in rec.calls} == {app.state.scheduler._thread}  # the one thread that runs the model
        assert app.state.scheduler._thread is not threading.main_thread()


def test_only_returned_results_are_explained_each_alone_and_scores_do_not_change(tiny_reranker):
    docs = ["markdown html", "gold rush miners", {"image": b64(page(2))}, "small language model", "json"]
    rec = Recording(tiny_reranker)
    app = build_app(rec, ServerSettings())
    sched, per_pass = app.state.scheduler, []
    explain_fn = sched.explain_fn
    sched.explain_fn = lambda items: per_pass.append(len(items)) or explain_fn(items)
    with TestClient(app) as c:
        plain = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["results"]
        off = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "explain": False}).json()["results"]
        assert plain == off and all("explanation" not in x for x in plain) and not rec.calls
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "explain": True, "top_n": 2})
        results = r.json()["results"]
        assert [(x["index"], x["relevance_score"]) for x in results] == [(x["index"], x["relevance_score"]) for x in plain[:2]]
        assert len(rec.calls) == 2 and all("explanation" in x for x in results)
        assert per_pass == [1, 1]  # an explanation makes its own model passes: it takes a scheduler pass alone
        metrics = c.get("/metrics").text
        assert "m0lite_explanations_total 2.0" in metrics and "m0lite_explain_seconds_total" in metrics
        # return_documents and explain together
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": docs, "explain": True, "top_n": 1,
                                       "return_documents": False})
        assert set(r.json()["results"][0]) == {"index", "relevance_score", "explanation"}


def test_explanations_keep_the_strongest_parts(tiny_reranker):
    """A long text keeps its N strongest tokens (by |score|), in document order, and says how many it left
    out; an image its N strongest regions; boxes are in the pixels of the image as sent."""
    long_text = " ".join(["markdown tables gold json html model"] * 12)
    image = page(3, 400, 300)
    n = 7
    with TestClient(build_app(tiny_reranker, ServerSettings(max_explanation_parts=n))) as c:
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": [long_text, {"image": b64(image), "text": "short"}],
                                       "explain": True, "explain_method": "attention"})
        assert r.status_code == 200, r.text
        by_index = {x["index"]: x["explanation"] for x in r.json()["results"]}
    want = tiny_reranker.explain(QUERY, long_text, method="attention")
    got = by_index[0]
    strongest = sorted(sorted(want["text"], key=lambda t: -abs(t["score"]))[:n], key=lambda t: t["start"])
    assert len(want["text"]) > 60 and len(got["text"]) == n and got["text_omitted"] == len(want["text"]) - n
    assert [(t["start"], t["token"]) for t in got["text"]] == [(t["start"], t["token"]) for t in strongest]
    assert [t["score"] for t in got["text"]] == pytest.approx([t["score"] for t in strongest], abs=1e-5)
    want = tiny_reranker.explain(QUERY, {"image": image, "text": "short"}, method="attention")["image"]
    got = by_index[1]
    assert got["text_omitted"] == 0 and len(got["text"]) == 1
    assert (got["image"]["width"], got["image"]["height"]) == (400, 300)
    assert len(got["image"]["regions"]) == n and got["image"]["regions_omitted"] == len(want["regions"]) - n
    strongest = sorted(sorted(want["regions"], key=lambda g: -abs(g["score"]))[:n], key=lambda g: (g["row"], g["col"]))
    assert [(g["row"], g["col"]) for g in got["image"]["regions"]] == [(g["row"], g["col"]) for g in strongest]
    assert [g["box"] for g in got["image"]["regions"]] == [pytest.approx(g["box"]) for g in strongest]


def test_bad_values_and_other_dialects_are_refused(tiny_reranker):
    rec = Recording(tiny_reranker)
    with TestClient(build_app(rec, ServerSettings(max_occlusion_parts=60))) as c:
        for body, status, words in [
            ({"explain": "yes"}, 422, "explain: expected true or false, got a string"),
            ({"explain": 1}, 422, "explain: expected true or false, got a number"),
            ({"explain": True, "explain_method": "gradient"}, 422,
             "explain_method: expected one of 'attention', 'occlusion', got 'gradient'"),
            ({"explain": True, "explain_method": None}, 422, "explain_method: expected one of"),
            # Occlusion is for few, short documents: the 2 largest of these pass 60 prompt tokens.
            ({"explain": True, "explain_method": "occlusion", "top_n": 2}, 413, "--max-occlusion-parts"),
        ]:
            r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["a b c " * 20, "d e f " * 20, "g"], **body})
            assert r.status_code == status and words in r.json()["detail"], (body, r.text)
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["g", "a b c " * 40], "top_n": 1,
                                       "explain": True, "explain_method": "occlusion"})
        assert r.status_code == 413  # the limit counts the largest documents: which ones come first is not known yet
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["a b c", "g"], "explain": True,
                                       "explain_method": "occlusion"})
        assert r.status_code == 200 and all(x["explanation"]["method"] == "occlusion" for x in r.json()["results"])
        for path, body, headers in [
            ("/v2/rerank", {"query": QUERY, "documents": ["a"], "explain": True}, {}),
            ("/v1/rerank", {"query": QUERY, "documents": ["a"], "explain": True}, {"X-Fern-SDK-Name": "cohere"}),
            ("/rerank", {"query": QUERY, "texts": ["a"], "explain_method": "attention"}, {}),
            ("/score", {"text_1": QUERY, "text_2": ["a"], "explain": False}, {}),
        ]:
            r = c.post(path, json=body, headers=headers)
            detail = r.json()["detail"]
            assert r.status_code == 422 and "explanations come in the Jina shape only" in detail, (path, r.text)
            assert detail.startswith(("explain:", "explain_method:")), detail
    assert len(rec.calls) == 2  # only the request that was allowed


def test_explanations_keep_to_the_deadline():
    """Explain items past their request's deadline are dropped, never run; scores and explanations asked at
    once each get their own answer."""
    from m0lite.server.scheduler import DeadlineExceeded, Scheduler

    explained, scored = [], []

    def explain(items):
        explained.append(list(items))
        time.sleep(0.3)
        return [f"why {x}" for x in items]

    def score(pairs):
        scored.append(list(pairs))
        return [0.0] * len(pairs), [1] * len(pairs)

    sched = Scheduler(score, explain_fn=explain, max_pass_pairs=1, batch_wait_s=0)

    async def go():
        with pytest.raises(DeadlineExceeded):
            await sched.explain(["a", "b", "c", "d"], time.monotonic() + 0.45)
        await asyncio.sleep(0.4)
        assert await sched.explain(["e"], time.monotonic() + 5) == ["why e"]
        both = await asyncio.gather(sched.score(["s"], time.monotonic() + 5), sched.explain(["x"], time.monotonic() + 5))
        assert both == [([0.0], [1]), ["why x"]]

    try:
        asyncio.run(go())
    finally:
        sched.stop()
    assert explained[:2] == [["a"], ["b"]] and ["c"] not in explained and ["d"] not in explained, explained
    assert sched.stats["expired"] + sched.stats["cancelled"] >= 1 and scored == [["s"]]
