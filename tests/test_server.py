"""The HTTP server (`m0lite serve`): every dialect's answers, bad input, overload, scheduling, metrics, fuzz.

Two kinds of test:
- in process (FastAPI's TestClient, or httpx over the ASGI transport) around
  `FakeReranker`, a deterministic stand-in that can be slow or fail on demand:
  API behaviour in every dialect (Jina, Cohere, TEI, vLLM, llama.cpp), every bad
  input, auth, budgets, batching and fair passes, overload, deadlines, /metrics,
  request ids; the dialects against the real tiny model (scores equal `rank`);
  and a hypothesis fuzz run against the app around the real tiny model (no 500, ever);
- one real server process on loopback with the tiny random checkpoint: scores
  equal `Reranker.rank` on the model card's example (images served by a local
  http.server), also under concurrent clients, and the cases that need real
  sockets (a 50 MB body, an image URL that hangs). Load, memory, slow clients and
  Cohere's SDK: `test_server_load.py`.
Nothing outside 127.0.0.1 is contacted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import io
import json
import random
import select
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from m0lite.errors import InputError  # noqa: E402
from m0lite.cli import DEMO_DOCUMENTS  # noqa: E402
from m0lite.server import ServerSettings, build_app  # noqa: E402
from tests.server_process import server_process  # noqa: E402



# --- helpers ---------------------------------------------------------------


def png(width: int, height: int, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 70-byte PNG that declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


PNG_B64 = base64.b64encode(png(64, 48)).decode()


class FakeReranker:
    """Deterministic stand-in for Reranker.score_pairs: the score is a hash of the pair.

    `delay` seconds per call makes it slow; a document "BOOM" makes the call fail
    with InputError (a failure the server's own checks cannot foresee). Every call's
    pairs are recorded, to see how requests were batched."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[list[str]] = []

    @staticmethod
    def key(x) -> str:
        if isinstance(x, Image.Image):
            return f"image:{x.size}:{hashlib.sha256(x.tobytes()).hexdigest()[:8]}"
        return str(x)

    @classmethod
    def expected(cls, query, doc) -> float:
        digest = hashlib.sha256(f"{cls.key(query)}\0{cls.key(doc)}".encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32

    def score_pairs(self, pairs, normalize=True, **kw):
        self.calls.append([self.key(d) for _, d in pairs])
        time.sleep(self.delay)
        if any(isinstance(d, str) and d == "BOOM" for _, d in pairs):
            raise InputError("pairs[0] document: BOOM")
        raw = [2 * self.expected(q, d) for q, d in pairs]
        return [self.normalize(r) for r in raw] if normalize else raw, [len(self.key(q)) + len(self.key(d)) for q, d in pairs]

    @staticmethod
    def normalize(raw: float) -> float:
        return raw / 2  # exact in floating point: the normalised score is `expected` itself

    def count_tokens(self, text: str) -> int:
        return len(text)


def client(reranker=None, **kw) -> TestClient:
    return TestClient(build_app(reranker or FakeReranker(), ServerSettings(**kw)))


async def gather_posts(app, bodies: list[dict], timeout: float = 20.0) -> list[httpx.Response]:
    """POST all bodies to /v1/rerank at once, in process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=timeout) as c:
        return await asyncio.wait_for(asyncio.gather(*(c.post("/v1/rerank", json=b) for b in bodies)), timeout)


def run_concurrently(app, bodies: list[dict], stop: bool = True) -> list[httpx.Response]:
    """POST all bodies at once, in process; then stop the app's model thread (the ASGI
    transport runs no lifespan events)."""
    try:
        return asyncio.run(gather_posts(app, bodies))
    finally:
        if stop:
            app.state.scheduler.stop()


def assert_ranked(data: dict, n_docs: int, top_n: int | None = None) -> None:
    """The Jina response shape: best first, distinct indices in range."""
    assert set(data) == {"id", "model", "usage", "results"}
    assert isinstance(data["usage"]["total_tokens"], int)
    results = data["results"]
    assert len(results) == min(top_n or n_docs, n_docs)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices) and all(0 <= i < n_docs for i in indices)


# --- the API, in process ---------------------------------------------------


def test_jina_shape_top_n_and_return_documents():
    docs = ["alpha", {"text": "beta"}, {"image": PNG_B64}, "gamma"]
    with client() as c:
        r = c.post("/v1/rerank", json={"model": "jina-reranker-m0", "query": "q", "documents": docs})
        assert r.status_code == 200, r.text
        data = r.json()
        assert_ranked(data, 4)
        by_index = {x["index"]: x for x in data["results"]}
        assert by_index[0]["document"] == {"text": "alpha"}
        assert by_index[1]["document"] == {"text": "beta"}
        assert by_index[2]["document"] == {"image": PNG_B64}  # echoed as given
        assert by_index[0]["relevance_score"] == FakeReranker.expected("q", "alpha")
        assert data["usage"]["total_tokens"] > 0

        r = c.post("/v1/rerank", json={"query": "q", "documents": docs, "top_n": 2, "return_documents": False})
        assert r.status_code == 200
        assert_ranked(r.json(), 4, top_n=2)
        assert r.json()["results"] == [{k: v for k, v in x.items() if k != "document"} for x in data["results"][:2]]

        r = c.post("/v1/rerank", json={"query": "q", "documents": docs, "top_n": 99})
        assert len(r.json()["results"]) == 4


def test_vllm_and_cohere_spellings():
    data_uri = "data:image/png;base64," + PNG_B64
    with client() as c:
        base = c.post("/v1/rerank", json={"query": "q", "documents": ["a", {"image": data_uri}]}).json()
        variants = [
            {"query": "q", "documents": ["a", {"image": data_uri}], "top_k": 2},  # top_k
            {"query": "q", "documents": ["a", {"image": data_uri}], "top_n": 0},  # vLLM: 0 = all
            {"query": {"text": "q"}, "documents": [{"type": "text", "text": "a"},
                                                   {"type": "image_url", "image_url": {"url": data_uri}}]},
            {"query": "q", "documents": {"content": [{"type": "text", "text": "a"},
                                                     {"type": "image_url", "image_url": {"url": data_uri}}]},
             "truncate_prompt_tokens": 10, "priority": 0},  # vLLM's extra fields are ignored
        ]
        for body in variants:
            r = c.post("/v1/rerank", json=body)
            assert r.status_code == 200, (body, r.text)
            got = [(x["index"], x["relevance_score"]) for x in r.json()["results"]]
            assert got == [(x["index"], x["relevance_score"]) for x in base["results"]]
        # An image query works too.
        r = c.post("/v1/rerank", json={"query": {"image": PNG_B64}, "documents": ["a", "b"]})
        assert r.status_code == 200, r.text


DEEP = b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

BAD_REQUESTS = [
    # (body, status, words the message must contain)
    (b'{"query": "q", "documents": ["a"', 400, "malformed JSON"),
    (b"", 400, "empty"),
    (b"\xff\xfe\x00garbage", 400, "malformed JSON"),
    (DEEP, 400, "malformed JSON"),
    (b'[{"query": "q"}]', 422, "JSON object, got an array"),
    ({"documents": ["a"]}, 422, "query: is required"),
    ({"query": "q"}, 422, "documents: is required"),
    ({"query": "", "documents": ["a"]}, 422, "query: is empty"),
    ({"query": "  \n", "documents": ["a"]}, 422, "query: is empty"),
    ({"query": "q", "documents": []}, 422, "documents: is empty"),
    ({"query": 5, "documents": ["a"]}, 422, "query: expected a string"),
    ({"query": "q", "documents": "a"}, 422, "documents: expected an array"),
    ({"query": "q", "documents": ["a", None]}, 422, "documents[1]: expected a string"),
    ({"query": "q", "documents": ["a", {"text": 3}]}, 422, "documents[1].text: expected a string"),
    ({"query": {"text": "x", "image": PNG_B64}, "documents": ["a"]}, 422, "query: give exactly one"),
    ({"query": "q", "documents": ["a", {"url": "x"}]}, 422, "documents[1]: give exactly one"),
    ({"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": "3"}, 422, "top_n"),
    ({"query": "q", "documents": ["a"], "top_n": True}, 422, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, 422, "return_documents"),
    ({"query": "q", "documents": ["a"], "model": 7}, 422, "model"),
    (b'{"query": "\\ud800", "documents": ["a"]}', 422, "query: text is not valid Unicode"),
    ({"query": "q", "documents": ["a", "x <|image_pad|> y"]}, 422, "documents[1] contains the reserved token"),
    ({"query": "q", "documents": ["a", {"image": ""}]}, 422, "documents[1].image: is empty"),
    ({"query": "q", "documents": [{"image": "file:///etc/passwd"}]}, 422, "documents[0]: unsupported URL scheme"),
    ({"query": "q", "documents": [{"image": "ftp://example.com/x.png"}]}, 422, "unsupported URL scheme"),
    ({"query": "q", "documents": [{"image": "/etc/passwd"}]}, 422, "documents[0]:"),
    ({"query": "q", "documents": [{"image": "cat.png"}]}, 422, "not an http(s) URL, a data URI or valid base64"),
    ({"query": "q", "documents": ["a", {"image": "!!!not base64!!!"}]}, 422, "documents[1]: image is not"),
    ({"query": "q", "documents": [{"image": "data:image/png,rawbytes"}]}, 422, "only base64 data URIs"),
    ({"query": "q", "documents": [{"image": base64.b64encode(b"no image here, " * 20).decode()}]}, 422,
     "documents[0]:"),
    ({"query": "q", "documents": [{"image": base64.b64encode(png(64, 48)[:60]).decode()}]}, 422, "documents[0]:"),
    ({"query": "q", "documents": ["a", {"image": base64.b64encode(bomb_png()).decode()}]}, 413,
     "documents[1]: "),
    ({"query": "q", "documents": [{"image": base64.b64encode(png(2000, 5)).decode()}]}, 422, "aspect ratio"),
    ({"query": {"image": "gopher://x"}, "documents": ["a"]}, 422, "query: unsupported URL scheme"),
]


def test_bad_requests_get_clear_errors():
    with client() as c:
        for body, status, words in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = c.post("/v1/rerank", content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (body if len(content) < 300 else content[:80], r.text)
            assert r.headers["content-type"] == "application/json"
            detail = r.json()["detail"]
            assert isinstance(detail, str) and words in detail, (words, detail)
            assert "Traceback" not in detail and "root:" not in detail
        assert c.get("/health").json()["status"] == "ok"
        # The fake never saw any of them: every bad request was stopped before the model.
        assert c.app.state.scheduler.stats["pairs"] == 0


def test_limits():
    with client(max_documents=3, max_text_chars=10, max_body_bytes=2000, max_image_bytes=100,
                max_image_pixels=50 * 50, max_images=1) as c:
        def post(body):
            return c.post("/v1/rerank", json=body)

        r = post({"query": "q", "documents": ["a"] * 4})
        assert r.status_code == 413 and "over the limit of 3" in r.json()["detail"]
        r = post({"query": "q", "documents": {"content": ["a"] * 4}})
        assert r.status_code == 413 and "over the limit of 3" in r.json()["detail"]
        r = post({"query": {"image": "AAAA"}, "documents": [{"image": "AAAA"}]})
        assert r.status_code == 413 and "has 2 images (query and documents), over the limit of 1" in r.json()["detail"]
        r = post({"query": "q", "documents": ["a", "b" * 11]})
        assert r.status_code == 413 and r.json()["detail"].startswith("documents[1]: text is 11 characters")
        r = post({"query": "q" * 11, "documents": ["a"]})
        assert r.status_code == 413 and r.json()["detail"].startswith("query:")
        r = post({"query": "q", "documents": ["a" * 3000]})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"]
        r = post({"query": "q", "documents": [{"image": PNG_B64}]})
        assert r.status_code == 413 and "documents[0]" in r.json()["detail"]
        with client(max_image_pixels=50 * 50) as c2:
            r = c2.post("/v1/rerank", json={"query": "q", "documents": [{"image": PNG_B64}]})
            assert r.status_code == 413 and "pixels" in r.json()["detail"], r.text
        # A chunked body (no Content-Length) is capped as it streams in.
        r = c.post("/v1/rerank", content=iter([b'{"query": "q", "documents": ["'] + [b"a" * 500] * 10 + [b'"]}']),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert post({"query": "q", "documents": ["a", "b", "c"]}).status_code == 200


def test_auth():
    with client(api_key="s3cret") as c:
        body = {"query": "q", "documents": ["a"]}
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret-and-more"}]:
            r = c.post("/v1/rerank", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["detail"]
            assert c.get("/v1/models", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/rerank", json=body, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "jina-reranker-m0"
        assert c.get("/health").status_code == 200  # health needs no key


def test_models_and_openapi():
    with client(served_model_name="m0-test") as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "m0-test"
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).json()["model"] == "m0-test"
        schema = c.get("/openapi.json").json()
        body = schema["paths"]["/v1/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/RerankRequest"}
        request = schema["components"]["schemas"]["RerankRequest"]
        assert {"query", "documents", "top_n", "return_documents"} <= set(request["properties"])
        assert {"TextInput", "ImageInput", "RerankResponse", "ErrorResponse"} <= set(schema["components"]["schemas"])
        assert c.get("/nope").json() == {"detail": "Not Found"}
        assert c.get("/v1/rerank").status_code == 405


def test_private_image_urls_refused_without_connecting():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    try:
        with client() as c:  # --allow-private-urls off (the default)
            for url in [f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png",
                        f"http://[::ffff:127.0.0.1]:{port}/a.png", "http://169.254.169.254/latest/meta-data",
                        "http://10.1.2.3/x.png", "http://[::1]/x.png", "http://0.0.0.0/x.png"]:
                r = c.post("/v1/rerank", json={"query": "q", "documents": ["a", {"image": url}]})
                assert r.status_code == 422, (url, r.text)
                detail = r.json()["detail"]
                assert detail.startswith("documents[1]:") and "refused" in detail, detail
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


# --- batching, overload, deadlines -----------------------------------------


def test_concurrent_requests_are_batched():
    fake = FakeReranker(delay=0.05)
    app = build_app(fake, ServerSettings(max_batch_pairs=64, batch_wait_ms=100))
    bodies = [{"query": f"q{k}", "documents": [f"d{k}-{i}" for i in range(3)]} for k in range(6)]
    responses = run_concurrently(app, bodies)
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        for x in r.json()["results"]:
            assert x["relevance_score"] == FakeReranker.expected(body["query"], body["documents"][x["index"]])
    assert max(len(call) for call in fake.calls) > 3, fake.calls  # pairs of several requests in one call
    assert sum(len(call) for call in fake.calls) == 18


def test_a_failing_request_does_not_fail_its_batch():
    fake = FakeReranker()
    app = build_app(fake, ServerSettings(max_batch_pairs=64, batch_wait_ms=200))
    bodies = [{"query": "q", "documents": ["a", "b"]}, {"query": "q", "documents": ["c", "BOOM"]},
              {"query": "q", "documents": ["d"]}]
    ok1, bad, ok2 = run_concurrently(app, bodies)
    assert ok1.status_code == 200 and ok2.status_code == 200
    assert bad.status_code == 422 and "BOOM" in bad.json()["detail"]
    assert len(fake.calls[0]) == 5  # they were batched together first


def test_overload_answers_503_with_retry_after():
    fake = FakeReranker(delay=0.4)
    app = build_app(fake, ServerSettings(max_queue=2, max_batch_pairs=1, batch_wait_ms=0))
    t0 = time.monotonic()
    responses = run_concurrently(app, [{"query": "q", "documents": [f"d{k}"]} for k in range(10)])
    elapsed = time.monotonic() - t0
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 2 <= codes.count(200) <= 3 and codes.count(503) >= 7, codes  # 1 in the worker + 2 queued
    for r in responses:
        if r.status_code == 503:
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert "busy" in r.json()["detail"]
    assert elapsed < 5, elapsed  # the refused ones were answered at once, nothing hung


def test_deadline_504_and_expired_requests_are_not_scored():
    fake = FakeReranker(delay=0.6)
    app = build_app(fake, ServerSettings(max_batch_pairs=1, batch_wait_ms=0, request_timeout=0.3))
    first, second = run_concurrently(app, [{"query": "q", "documents": ["first"]},
                                           {"query": "q", "documents": ["second"]}], stop=False)
    assert first.status_code == 504 and second.status_code == 504
    assert "--request-timeout" in first.json()["detail"]
    time.sleep(0.6)  # let the worker finish "first" and reach "second"
    app.state.scheduler.stop()
    assert fake.calls == [["first"]]  # "second" passed its deadline in the queue: never scored


# --- fuzzing ---------------------------------------------------------------

IMAGE_SOURCES = [PNG_B64, "data:image/png;base64," + PNG_B64, "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
                 "http://127.0.0.1:9/x.png", "http://[::1]:9/x.png", "file:///etc/passwd", "/etc/passwd",
                 "~/.ssh/id_rsa", "../../etc/passwd", "http://", "https://:80", "http://[::1", "data:,",
                 "data:;base64,", "====", "a", base64.b64encode(bomb_png(5000, 5000)).decode()]

json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
text = st.text(max_size=40) | st.sampled_from(["", " ", "<|image_pad|>", "<|vision_start|>x", "\x00", "\ud800"])
image = st.sampled_from(IMAGE_SOURCES) | st.text(max_size=30)
document = (text | st.builds(lambda t: {"text": t}, text) | st.builds(lambda s: {"image": s}, image)
            | st.builds(lambda s: {"type": "image_url", "image_url": {"url": s}}, image) | json_any)
chaotic = st.fixed_dictionaries(
    {"query": text | st.builds(lambda t: {"text": t}, text) | st.builds(lambda s: {"image": s}, image) | json_any,
     "documents": st.lists(document, max_size=5) | json_any},
    optional={"model": st.text(max_size=10) | json_any, "top_n": st.integers(-2, 8) | json_any,
              "top_k": st.integers(-2, 8), "return_documents": st.booleans() | json_any, "extra": json_any,
              "explain": st.booleans() | json_any, "explain_method": json_any})
# Mostly-valid requests, so that the success path is fuzzed too.
good_image = st.sampled_from([PNG_B64, "data:image/png;base64," + PNG_B64] + [
    base64.b64encode(png(w, h)).decode() for w, h in [(30, 90), (1, 1), (3, 600), (601, 3), (1, 250)]])
good_doc = st.text(max_size=30) | st.builds(lambda t: {"text": t}, st.text(max_size=30)) | st.builds(
    lambda s: {"image": s}, good_image)
plausible = st.fixed_dictionaries(
    {"query": st.text(min_size=1, max_size=30).filter(str.strip) | st.builds(lambda s: {"image": s}, good_image),
     "documents": st.lists(good_doc | document, min_size=1, max_size=4)},
    optional={"model": st.text(max_size=10), "top_n": st.integers(0, 6), "return_documents": st.booleans(),
              "explain": st.booleans(), "explain_method": st.sampled_from(["attention", "occlusion"])})
request = plausible | chaotic


@pytest.fixture(scope="module")
def fuzz_client(tiny_reranker):
    """The real tiny model behind the app, so that the fuzz reaches its checks too."""
    with client(tiny_reranker, max_documents=4, max_text_chars=30, image_timeout=0.5) as c:
        yield c


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=request | json_any | st.binary(max_size=64), as_json=st.booleans())
def test_fuzz_never_500(fuzz_client, body, as_json):
    if isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body, ensure_ascii=as_json).encode("utf-8", "surrogatepass")
    headers = {"content-type": "application/json" if as_json else "text/plain"}
    r = fuzz_client.post("/v1/rerank", content=content, headers=headers)
    assert r.status_code in (200, 400, 413, 422), (content[:300], r.status_code, r.text)
    data = r.json()
    if r.status_code == 200:
        docs = body["documents"] if isinstance(body["documents"], list) else body["documents"]["content"]
        assert_ranked(data, len(docs), top_n=body["top_n"] if "top_n" in body else body.get("top_k"))
        assert all(("explanation" in x) == (body.get("explain") is True) for x in data["results"])
    else:
        assert set(data) == {"detail"} and isinstance(data["detail"], str) and data["detail"]


# --- a real server process with the tiny checkpoint ------------------------

QUERY = "slm markdown"
TEXTS = DEMO_DOCUMENTS  # the model card's texts
IMAGES = {  # stand-ins for the model card's image URLs, served from 127.0.0.1
    "/handelsblatt-preview.png": png(160, 120, (20, 90, 200)),
    "/paper-11.png": png(90, 128, (240, 240, 240)),
    "/wired-preview.png": png(200, 100, (10, 10, 10)),
    "/using-deepseek-r1-reasoning-model-in-deepsearch.webp": png(120, 64, (0, 160, 80), fmt="WEBP"),
}
NOISE_PNG = io.BytesIO()
Image.frombytes("RGB", (200, 200), random.Random(0).randbytes(200 * 200 * 3)).save(NOISE_PNG, format="PNG")


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    release = threading.Event()

    def do_GET(self):
        if self.path == "/hang":  # accepts, then never answers (until the test ends)
            self.release.wait(30)
            return
        body = NOISE_PNG.getvalue() if self.path == "/noise.png" else IMAGES.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _ImageHandler.release.set()
    server.shutdown()
    server.server_close()


API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY_CAP = 1 << 20


@pytest.fixture(scope="module")
def real_server(tiny_ckpt, tmp_path_factory):
    """`python -m m0lite.server` on the tiny checkpoint; yields its base URL; always killed."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # --image-timeout: short for the hanging-URL test, long enough for a loopback fetch on a busy 2-core CI machine
    flags = ["--api-key", API_KEY, "--allow-private-urls", "--image-timeout", "3", "--max-body-bytes", str(BODY_CAP),
             "--log-level", "warning",
             "--doc-cache-mb", "16"]  # repeated documents take the cached path; scores must not change
    with server_process(tiny_ckpt, log_path, *flags) as (url, _):
        yield url


def card_documents(image_server: str) -> list[dict]:
    """The model card's curl example: images and texts mixed."""
    urls = [image_server + path for path in IMAGES]
    return [{"image": urls[0]}, {"image": urls[1]}, {"image": urls[2]}, {"text": TEXTS[0]},
            {"image": urls[3]}, {"text": TEXTS[1]}, {"text": TEXTS[2]}, {"text": TEXTS[3]}]


def test_model_card_example_matches_reranker(real_server, image_server, tiny_reranker):
    docs = card_documents(image_server)
    r = httpx.post(f"{real_server}/v1/rerank", headers=AUTH, timeout=60, json={
        "model": "jina-reranker-m0", "query": QUERY, "documents": docs, "return_documents": False})
    assert r.status_code == 200, r.text
    data = r.json()
    assert_ranked(data, len(docs))
    assert all(set(x) == {"index", "relevance_score"} for x in data["results"])

    expected = tiny_reranker.rank(QUERY, docs)
    assert [x["index"] for x in data["results"]] == [x["index"] for x in expected]
    for got, want in zip(data["results"], expected):
        assert abs(got["relevance_score"] - want["relevance_score"]) < 1e-5
    pairs = [(QUERY, d) for d in docs]
    assert data["usage"]["total_tokens"] == sum(tiny_reranker.score_pairs(pairs)[1])

    r = httpx.post(f"{real_server}/v1/rerank", headers=AUTH, timeout=60, json={
        "query": QUERY, "documents": docs, "top_n": 3, "return_documents": True})
    top = r.json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in expected[:3]]
    assert all(x["document"] == docs[x["index"]] for x in top)


def test_concurrent_clients_get_their_own_scores(real_server, image_server, tiny_reranker):
    """Requests batched together by the model thread still get exactly the scores of rank()."""
    docs = card_documents(image_server)
    expected = {x["index"]: x["relevance_score"] for x in tiny_reranker.rank(QUERY, docs)}
    subsets = [[k % 8, (3 * k + 1) % 8, (5 * k + 2) % 8] for k in range(8)]
    results: list = [None] * len(subsets)

    def worker(k: int) -> None:
        chosen = subsets[k]
        r = httpx.post(f"{real_server}/v1/rerank", headers=AUTH, timeout=60,
                       json={"query": QUERY, "documents": [docs[i] for i in chosen], "return_documents": False})
        results[k] = (r.status_code, r.json())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(subsets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for chosen, (status, data) in zip(subsets, results):
        assert status == 200, data
        for x in data["results"]:
            assert abs(x["relevance_score"] - expected[chosen[x["index"]]]) < 1e-5, (chosen, x, expected)


def test_image_download_limits(image_server):
    with client(allow_private_urls=True, max_image_bytes=20_000) as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": [{"image": image_server + "/paper-11.png"}]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a", {"image": image_server + "/noise.png"}]})
        assert r.status_code == 413 and r.json()["detail"].startswith("documents[1]:"), r.text
        assert "20000" in r.json()["detail"] and "--max-image-bytes" in r.json()["detail"]


def test_real_server_auth(real_server, tiny_ckpt):
    body = {"query": "q", "documents": ["a"]}
    assert httpx.post(f"{real_server}/v1/rerank", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{real_server}/v1/rerank", json=body, headers=wrong).status_code == 401
    r = httpx.post(f"{real_server}/v1/rerank", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["model"] == Path(tiny_ckpt).name
    assert httpx.get(f"{real_server}/v1/models", headers=AUTH).json()["data"][0]["id"] == Path(tiny_ckpt).name


def _raw_post(url: str, head: bytes, body_chunks, limit: int) -> tuple[bytes, int]:
    """Send a request head, then body chunks until the server answers; return (answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)  # little in flight: `sent` ~ what was read
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sent, answer = 0, b""
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0] or sent > limit:
                break  # the server answered (or we have sent far more than it should read)
            try:
                sock.sendall(chunk)
            except OSError:  # closed by the server, or it stopped reading
                break
            sent += len(chunk)
        sock.settimeout(10)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"}" in answer:
                    break
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    return answer, sent


def test_50mb_body_is_refused_without_being_read(real_server):
    size = 50 * 1024 * 1024
    piece = b"a" * 65536

    head = (f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    answer, sent = _raw_post(real_server, head, (piece for _ in range(size // len(piece))), limit=size)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-body-bytes" in answer
    assert sent < size // 4  # answered on the declared length, long before the body was sent

    head = (f"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    answer, sent = _raw_post(real_server, head, (chunk for _ in range(size // len(piece))), limit=size)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < size // 4  # read up to the cap, then answered
    assert httpx.get(f"{real_server}/health").status_code == 200


def test_bad_images_on_the_real_server(real_server, image_server):
    def post(documents):
        return httpx.post(f"{real_server}/v1/rerank", headers=AUTH, timeout=30,
                          json={"query": QUERY, "documents": documents})

    t0 = time.monotonic()
    r = post(["a", {"image": f"{image_server}/hang"}])
    assert r.status_code == 422 and r.json()["detail"].startswith("documents[1]:"), r.text
    assert "timed out" in r.json()["detail"] and time.monotonic() - t0 < 10

    r = post([{"image": f"{image_server}/missing.png"}])
    assert r.status_code == 422 and "404" in r.json()["detail"]
    r = post([{"image": "data:image/png;base64,iVBORw0KGgo!!!"}])
    assert r.status_code == 422 and "documents[0]:" in r.json()["detail"]
    r = post(["a", {"image": base64.b64encode(bomb_png()).decode()}])
    assert r.status_code == 413 and "documents[1]:" in r.json()["detail"]
    r = post([{"image": "/etc/passwd"}])
    assert r.status_code == 422 and "root:" not in r.text
    r = httpx.post(f"{real_server}/v1/rerank", headers={**AUTH, "Content-Type": "application/json"},
                   content=b'{"query": "q", "documents": [')
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    assert httpx.get(f"{real_server}/health").json()["status"] == "ok"


# --- dialects ----------------------------------------------------------------------


def test_dialect_shapes():
    docs = ["alpha", "beta", "gamma"]
    want = {i: FakeReranker.expected("q", d) for i, d in enumerate(docs)}
    best_first = sorted(want, key=lambda i: -want[i])
    with client() as c:
        # TEI: a list best first; raw_scores are the scores before normalising; text only when asked.
        r = c.post("/rerank", json={"query": "q", "texts": docs})
        assert r.status_code == 200, r.text
        assert r.json() == [{"index": i, "score": want[i]} for i in best_first]
        r = c.post("/rerank", json={"query": "q", "texts": docs, "raw_scores": True, "return_text": True})
        assert r.json() == [{"index": i, "score": 2 * want[i], "text": docs[i]} for i in best_first]
        # vLLM and llama.cpp: Jina's shape with an id, on every alias.
        for path in ("/rerank", "/reranking", "/v1/reranking", "/v1/rerank"):
            r = c.post(path, json={"query": "q", "documents": docs, "top_n": 2})
            assert r.status_code == 200, (path, r.text)
            assert_ranked(r.json(), 3, top_n=2)
            assert [x["index"] for x in r.json()["results"]] == best_first[:2]
            assert r.json()["results"][0]["document"] == {"text": docs[best_first[0]]}
        # Cohere: v2 at its own route; v1 when the client is Cohere's SDK. No documents unless asked.
        for path, headers, version in [("/v2/rerank", {}, "2"), ("/v1/rerank", {"X-Fern-SDK-Name": "cohere"}, "1")]:
            r = c.post(path, json={"model": "m", "query": "q", "documents": docs}, headers=headers)
            data = r.json()
            assert set(data) == {"id", "results", "meta"} and data["meta"]["api_version"]["version"] == version
            assert data["results"] == [{"index": i, "relevance_score": want[i]} for i in best_first]
        r = c.post("/v2/rerank", json={"query": "q", "documents": docs, "return_documents": True})
        assert r.json()["results"][0]["document"] == {"text": docs[best_first[0]]}
        # vLLM /score: input order, one query to many or pairwise.
        for path in ("/score", "/v1/score"):
            r = c.post(path, json={"model": "m", "text_1": "q", "text_2": docs})
            data = r.json()
            assert data["object"] == "list" and data["usage"]["prompt_tokens"] == data["usage"]["total_tokens"] > 0
            assert data["data"] == [{"index": i, "object": "score", "score": want[i]} for i in range(3)]
        r = c.post("/score", json={"text_1": ["q", "p"], "text_2": ["alpha", "beta"]})
        assert [x["score"] for x in r.json()["data"]] == [FakeReranker.expected("q", "alpha"),
                                                           FakeReranker.expected("p", "beta")]
        r = c.post("/score", json={"text_1": "q", "text_2": "alpha"})
        assert [x["score"] for x in r.json()["data"]] == [want[0]]


@pytest.mark.parametrize("path,body,status,words", [
    ("/score", {"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, 422, "text_1 has 2 items and text_2 3"),
    ("/score", {"text_1": "q"}, 422, "text_2: is required"),
    ("/score", {"text_1": "", "text_2": ["x"]}, 422, "text_1[0] is empty"),
    ("/rerank", {"query": "q", "texts": "abc"}, 422, "texts: expected an array"),
    ("/rerank", {"query": "q", "texts": ["a", 3]}, 422, "texts[1]: expected a string"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, 422, "raw_scores: expected true or false"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncate": True, "truncation_direction": "Left"}, 422, "Right"),
    ("/v2/rerank", {"query": "q"}, 422, "documents: is required"),
    ("/v1/rerank", b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}", 422,
     "top_n: expected a non-negative integer, got a 5000-digit number"),
])
def test_dialect_errors(path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with client() as c:
        r = c.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == status and words in r.json()["detail"], r.text
        assert "set_int_max_str_digits" not in r.text


def test_tei_truncate_false_refuses_what_the_model_would_cut():
    # max_length 64, max_query_length 16: a document is read whole below 48 tokens (the fake counts chars).
    with client(max_length=64, max_query_length=16) as c:
        body = {"query": "q", "texts": ["short", "x" * 100]}
        r = c.post("/rerank", json=body)
        assert r.status_code == 413 and r.json()["detail"].startswith("texts[1]: 100 tokens"), r.text
        assert "truncate=true" in r.json()["detail"]
        assert c.post("/rerank", json={**body, "truncate": True}).status_code == 200
        assert c.post("/v1/rerank", json={"query": "q", "documents": body["texts"]}).status_code == 200


def test_tei_honours_top_n():
    # litellm's TEI provider sends top_n and cuts nothing itself.
    with client() as c:
        body = {"query": "q", "texts": ["a", "bb", "ccc", "dddd"]}
        everything = c.post("/rerank", json=body).json()
        assert len(everything) == 4
        for key in ("top_n", "top_k"):
            r = c.post("/rerank", json={**body, key: 2})
            assert r.status_code == 200 and r.json() == everything[:2], r.text
        assert c.post("/rerank", json={**body, "top_n": 0}).json() == everything
        assert c.post("/rerank", json={**body, "top_n": -1}).status_code == 422


def test_tiny_model_scores_equal_rank_in_every_dialect(tiny_reranker):
    docs = DEMO_DOCUMENTS
    ranked = tiny_reranker.rank(QUERY, docs)
    raw, _ = tiny_reranker.score_pairs([(QUERY, d) for d in docs], normalize=False)
    want = {x["index"]: x["relevance_score"] for x in ranked}
    with client(tiny_reranker) as c:
        jina = c.post("/v1/rerank", json={"query": QUERY, "documents": docs}).json()["results"]
        assert [(x["index"], x["relevance_score"]) for x in jina] == [(x["index"], x["relevance_score"]) for x in ranked]
        tei = c.post("/rerank", json={"query": QUERY, "texts": docs, "truncate": True}).json()
        assert [(x["index"], x["score"]) for x in tei] == [(x["index"], x["relevance_score"]) for x in ranked]
        tei_raw = c.post("/rerank", json={"query": QUERY, "texts": docs, "raw_scores": True, "truncate": True}).json()
        assert {x["index"]: x["score"] for x in tei_raw} == dict(enumerate(raw))
        score = c.post("/score", json={"text_1": QUERY, "text_2": docs}).json()["data"]
        assert [x["score"] for x in score] == [want[i] for i in range(len(docs))]


# --- fairness, budgets, metrics, request ids ---------------------------------------


def test_small_request_overtakes_a_large_one():
    fake = FakeReranker(delay=0.05)
    app = build_app(fake, ServerSettings(max_batch_pairs=4, batch_wait_ms=0))
    big = {"query": "q", "documents": [f"big-{i}" for i in range(40)]}
    small = {"query": "q", "documents": ["small-0", "small-1"]}

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
            big_task = asyncio.ensure_future(c.post("/v1/rerank", json=big))
            await asyncio.sleep(0.12)  # the large request is running
            r = await c.post("/v1/rerank", json=small)
            assert not big_task.done()  # answered while the large one still runs
            return r, await big_task

    try:
        r_small, r_big = asyncio.run(go())
    finally:
        app.state.scheduler.stop()
    assert r_small.status_code == 200 and r_big.status_code == 200
    first = next(k for k, call in enumerate(fake.calls) if "small-0" in call)
    assert first <= 3, fake.calls  # within a pass or two of arriving, not after the 10 passes of the big one
    assert "small-1" in fake.calls[first]  # both its pairs in one pass
    assert sum(len(call) for call in fake.calls) == 42 and max(len(call) for call in fake.calls) <= 4


def test_scheduler_fills_a_pass_shortest_first_under_the_token_budget():
    from m0lite.server.scheduler import Cost, Scheduler

    calls, first_pass = [], threading.Event()

    def score(pairs):
        calls.append(list(pairs))
        first_pass.wait(10)  # the first pass runs until the other requests have queued
        return [0.0] * len(pairs), [1] * len(pairs)

    sched = Scheduler(score, max_pass_pairs=8, max_pass_tokens=100, batch_wait_s=0)

    async def go():
        deadline = time.monotonic() + 20
        a = asyncio.ensure_future(sched.score([f"a{i}" for i in range(6)], deadline, [Cost(40)] * 6))
        while not calls:
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(sched.score(["b0", "b1"], deadline, [Cost(10), Cost(10)]))
        c = asyncio.ensure_future(sched.score(["c0"], deadline, [Cost(5)]))
        while sched.queued < 3:
            await asyncio.sleep(0.01)
        first_pass.set()
        await asyncio.gather(a, b, c)

    try:
        asyncio.run(go())
    finally:
        sched.stop()
    assert calls[0] == ["a0", "a1"]  # 80 tokens: a third pair would pass the budget of 100
    # Shortest request first, within the budget.
    assert calls[1] == ["c0", "b0", "b1", "a2"], calls
    assert calls[2:] == [["a3", "a4"], ["a5"]], calls


def test_scheduler_starves_no_request():
    from m0lite.server.scheduler import Cost, Scheduler

    calls = []

    def score(pairs):
        calls.append(list(pairs))
        time.sleep(0.02)
        return [0.0] * len(pairs), [1] * len(pairs)

    sched = Scheduler(score, max_pass_pairs=8, max_pass_tokens=100, batch_wait_s=0.01)

    async def go():
        deadline = time.monotonic() + 30
        big = asyncio.ensure_future(sched.score([f"big{i}" for i in range(3)], deadline, [Cost(90)] * 3))

        async def chain(name):  # a client sending small requests back to back
            for k in range(15):
                await sched.score([f"{name}{k}"], deadline, [Cost(20)])

        # Two such clients keep a small request waiting at every pass; each is cheaper than the large
        # request's pairs, and a pass cannot hold both, so shortest-first alone would starve it.
        await asyncio.gather(chain("s"), chain("t"), big)

    try:
        asyncio.run(go())
    finally:
        sched.stop()
    big_passes = [k for k, call in enumerate(calls) if any(p.startswith("big") for p in call)]
    small_passes = [k for k, call in enumerate(calls) if not any(p.startswith("big") for p in call)]
    assert len(big_passes) == 3 and big_passes[-1] < small_passes[-1] - 5, calls  # done while the others ran
    assert all(b - a <= 3 for a, b in zip([-1, *big_passes], big_passes)), calls


def test_request_budgets_answer_413():
    with client(max_request_tokens=100) as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["x" * 200, "y" * 200]})
        assert r.status_code == 413 and "--max-request-tokens" in r.json()["detail"], r.text
        assert "prompt tokens over its 2 pairs" in r.json()["detail"]
        assert c.post("/v1/rerank", json={"query": "q", "documents": ["x" * 20]}).status_code == 200
    with client(max_request_pixels=64 * 48 * 2 - 1) as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": [{"image": PNG_B64}, {"image": "data:image/png;base64,"
                                                                                       + base64.b64encode(png(64, 48, (1, 2, 3))).decode()}]})
        assert r.status_code == 413 and "--max-request-pixels" in r.json()["detail"], r.text
        assert c.post("/v1/rerank", json={"query": "q", "documents": [{"image": PNG_B64}]}).status_code == 200


def test_image_errors_say_what_is_wrong():
    with client(max_image_pixels=50 * 50) as c:
        r = c.post("/v1/rerank", json={"query": "q", "documents": [{"image": base64.b64encode(bomb_png()).decode()}]})
        assert r.status_code == 413 and "over the limit of 2,500 (--max-image-pixels)" in r.json()["detail"], r.text
        assert "178" not in r.json()["detail"]
        for path in ("/etc/passwd", "page_1.png", "./scans/a.jpg"):
            r = c.post("/v1/rerank", json={"query": "q", "documents": [{"image": path}]})
            assert r.status_code == 422 and "looks like a file path" in r.json()["detail"], r.text
            assert "bytes of image data" not in r.json()["detail"]


def test_openapi_states_every_route_and_refuses_an_empty_query():
    with client() as c:
        schema = c.get("/openapi.json").json()
    for path in ("/v1/rerank", "/rerank", "/v2/rerank", "/score", "/v1/score", "/reranking", "/v1/reranking"):
        assert "post" in schema["paths"][path], path
    components = schema["components"]["schemas"]
    for name in ("RerankRequest", "CohereRerankRequest", "TEIRerankRequest", "ScoreRequest"):
        assert name in components
    variants = components["RerankRequest"]["properties"]["query"]["anyOf"]
    text = next(v for v in variants if v.get("type") == "string")
    assert text["minLength"] == 1 and text["pattern"] == "\\S"
    obj = next(v for v in variants if v.get("type") == "object" and "text" in v["properties"])
    assert obj["properties"]["text"]["minLength"] == 1


def _metrics(c) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_what_was_sent(tiny_reranker):
    with client(tiny_reranker) as c:
        before = _metrics(c)
        sizes = [1, 2, 3]
        for n in sizes:
            assert c.post("/v1/rerank", json={"query": "q", "documents": [f"d{i}" for i in range(n)]}).status_code == 200
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200
        assert c.post("/v1/rerank", json={"query": "", "documents": ["a"]}).status_code == 422
        image = {"image": PNG_B64}
        for _ in range(2):  # the second time the visual tokens come from the cache
            assert c.post("/v1/rerank", json={"query": "q", "documents": [image]}).status_code == 200
        m = _metrics(c)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m.get(key, 0) - before.get(key, 0)

    assert delta("m0lite_requests_total", route="/v1/rerank", status="200") == 5
    assert delta("m0lite_requests_total", route="/v1/rerank", status="422") == 1
    assert delta("m0lite_requests_total", route="/rerank", status="200") == 1
    assert delta("m0lite_request_duration_seconds_count", route="/v1/rerank") == 6
    assert delta("m0lite_pairs_scored_total") == sum(sizes) + 1 + 2
    assert delta("m0lite_batch_pairs_sum") == sum(sizes) + 1 + 2
    assert delta("m0lite_batch_pairs_count") >= 6  # one pass a request at least (they came one by one)
    assert delta("m0lite_tokens_scored_total") > 0
    assert delta("m0lite_patches_scored_total") == 2 * 16  # 64x48 is resized to 56x56: 4x4 patches
    assert delta("m0lite_images_loaded_total") == 2
    assert delta("m0lite_cache_hits_total", cache="vision") >= 1
    assert m[("m0lite_cache_bytes", (("cache", "vision"),))] > 0
    assert m[("m0lite_queue_depth", ())] == 0


def test_request_id_is_echoed_and_logged(caplog):
    import logging

    with client() as c, caplog.at_level(logging.INFO, logger="m0lite.access"):
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = c.post("/v1/rerank", json={"query": "q"}, headers={"X-Request-Id": "bad id\twith spaces"})
        generated = r.headers["x-request-id"]
        assert len(generated) == 32 and int(generated, 16) >= 0
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "m0lite.access"]
    by_id = {line["request_id"]: line for line in lines}
    assert by_id["abc-123"]["status"] == 200 and by_id["abc-123"]["path"] == "/v1/rerank"
    assert by_id[generated]["status"] == 422 and by_id[generated]["ms"] >= 0


def test_image_budget_holds_decodes_to_its_bytes():
    from m0lite.server.memory import ImageBudget

    budget = ImageBudget(100)
    order = []

    def decode(name, n, seconds):
        with budget.hold(n):
            order.append(("start", name))
            time.sleep(seconds)
            order.append(("end", name))

    threads = [threading.Thread(target=decode, args=("a", 60, 0.3))]
    threads[0].start()
    time.sleep(0.05)
    threads += [threading.Thread(target=decode, args=("b", 60, 0.0)),  # waits: 120 > 100
                threading.Thread(target=decode, args=("c", 30, 0.0))]  # fits beside a
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(5)
    assert order.index(("start", "b")) > order.index(("end", "a")), order
    assert order.index(("start", "c")) < order.index(("end", "a")), order
    assert budget.peak <= 100 and budget.used == 0
    with budget.hold(500):  # larger than the whole budget: it goes alone
        assert budget.used == 500
