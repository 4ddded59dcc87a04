"""`m0lite serve`: a Jina-compatible /v1/rerank HTTP API.

    POST /v1/rerank   {model, query, documents, top_n?, return_documents?}
                      -> {model, usage: {total_tokens}, results: [{index, relevance_score, document?}]}
    GET  /health      {"status": "ok", "queued": n}
    GET  /v1/models   OpenAI-style model list (one model)

The request and response shapes, and the vLLM/Cohere spellings also accepted,
are described in `server_schema.py`. A request goes through, in order:

1. `_Guard` (raw ASGI): bearer-token check, then the body is read with a byte cap
   (413 as soon as Content-Length or the bytes received pass the cap; a chunked
   body is never held beyond the cap).
2. `rerank`: JSON parse (400), validation (422, naming the field), limits (413),
   images fetched and decoded on a thread pool (422/413 naming the document),
   so one slow URL never stalls the model.
3. `Batcher`: one model thread scores the pairs of all waiting requests
   together; a full queue answers 503 with Retry-After, a passed deadline 504.

Every error is `{"detail": "..."}`; a 500 means a bug in m0lite and is logged
with its traceback, never sent to the client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from m0lite.batcher import Batcher, DeadlineExceeded, Overloaded
from m0lite.errors import ImageError, ImageTooLargeError, InputError, M0liteError
from m0lite.images import load_image, smart_resize
from m0lite.prompt import check_text

try:  # the `serve` extra (FastAPI brings pydantic); add_serve_arguments works without it
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    from m0lite.server_schema import (
        ErrorResponse,
        ImageInput,
        ModelCard,
        ModelList,
        RerankRequest,
        RerankResponse,
        TextInput,
        describe_validation_error,
        json_type,
    )
except ImportError:  # pragma: no cover
    FastAPI = None

log = logging.getLogger("m0lite.server")

_ARRIVAL = "m0lite.arrival"  # scope key: time.monotonic() when the request arrived


@dataclass
class ServerSettings:
    """Everything the app enforces; each field is a `m0lite serve` flag of the same name."""

    served_model_name: str = "jina-reranker-m0"  # reported in responses and /v1/models
    api_key: str | None = None  # bearer token for /v1/*; None = no auth
    max_documents: int = 1024  # per request
    max_images: int = 32  # per request, query included (decoded images wait in memory for the model)
    max_body_bytes: int = 32 * 1024 * 1024  # raw request body, checked before JSON parsing
    max_text_chars: int = 100_000  # query or one document; the model reads at most ~10k tokens anyway
    max_image_bytes: int = 20 * 1024 * 1024  # one image, after base64 decoding or download
    max_image_pixels: int = 4096 * 4096  # one image, checked from its header before decoding
    image_timeout: float = 10.0  # seconds, per URL fetch
    allow_private_urls: bool = False  # let image URLs reach loopback/private/link-local hosts
    image_threads: int = 16  # concurrent image fetches/decodes, all requests together
    max_queue: int = 64  # requests waiting for the model; beyond it: 503
    max_batch_pairs: int = 16  # (query, document) pairs per model call
    batch_wait_ms: float = 2.0  # how long the model thread waits for more requests to batch
    request_timeout: float = 60.0  # seconds from arrival to answer; then 504


# -- errors ----------------------------------------------------------------------


class _HTTPError(Exception):
    """An error answer decided by the app: status, message, extra headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _send_error(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error answer from raw ASGI (the guard runs before FastAPI)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


# -- auth and body cap -----------------------------------------------------------


class _Guard:
    """Raw ASGI middleware: auth on /v1/*, then the whole body read under a byte cap.

    It runs before anything parses the body, so an unauthenticated or oversized
    request costs at most `max_body_bytes` of memory and is answered without
    reading the rest (the connection is then closed).
    """

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.token = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[_ARRIVAL] = time.monotonic()
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value

        if self.token is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.token)):
                why = "missing Authorization header" if not given else "invalid API key"
                return await _send_error(send, 401, f"{why}: send 'Authorization: Bearer <key>'",
                                         [(b"www-authenticate", b"Bearer")])

        cap = self.settings.max_body_bytes
        too_big = f"request body is over the limit of {cap} bytes (--max-body-bytes)"
        close = [(b"connection", b"close")]
        if b"content-length" in headers:
            try:
                declared = int(headers[b"content-length"])
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header", close)
            if declared > cap:
                return await _send_error(send, 413, too_big, close)

        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone; nobody to answer
            body += message.get("body", b"")
            if len(body) > cap:
                return await _send_error(send, 413, too_big, close)
            more = message.get("more_body", False)

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


# -- images ----------------------------------------------------------------------

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _image_source(src: str, where: str, settings: ServerSettings) -> str | bytes:
    """What a client may send as an image: an http(s) URL (returned as is), or a data URI or
    bare base64 (returned decoded). Never a path: a client must not read the server's files,
    so no string other than an http(s) URL reaches `load_image`."""
    s = src.strip()
    if s[:8].lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(s)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError as e:
            raise ImageError(f"{where}: invalid image URL: {e}") from None
        if not parts.hostname:
            raise ImageError(f"{where}: image URL has no host")
        return s
    if s[:5].lower() == "data:":
        header, comma, s = s.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageError(f"{where}: only base64 data URIs are supported, got {header[:60]!r}")
    elif "://" in s[:32]:
        raise ImageError(f"{where}: unsupported URL scheme {s.split('://', 1)[0][:16]!r}; "
                         f"give an http(s) URL, a data URI or base64")
    b64 = "".join(s.split()).translate(str.maketrans("-_", "+/")).rstrip("=")  # URL-safe alphabet too
    if not _BASE64.fullmatch(b64) or len(b64) % 4 == 1:
        raise ImageError(f"{where}: image is not an http(s) URL, a data URI or valid base64")
    if len(b64) * 3 // 4 > settings.max_image_bytes:
        raise ImageTooLargeError(f"{where}: image is {len(b64) * 3 // 4} bytes, over the limit of "
                                 f"{settings.max_image_bytes} (--max-image-bytes)")
    return base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)


def _load_image(src: str, where: str, settings: ServerSettings):
    """Fetch (if a URL) and decode one image, under every limit; errors name `where`.

    With --allow-private-urls off, `load_image` refuses hosts that resolve to
    non-public addresses before connecting, on every redirect hop."""
    source = _image_source(src, where, settings)
    try:
        image = load_image(source, timeout=settings.image_timeout, max_bytes=settings.max_image_bytes,
                           max_pixels=settings.max_image_pixels, allow_private_urls=settings.allow_private_urls)
        smart_resize(image.height, image.width)  # refuses what the model cannot take (aspect ratio > 200)
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{where}: {e}") from None
    except M0liteError as e:
        raise ImageError(f"{where}: {e}") from None
    return image


# -- the app ---------------------------------------------------------------------


def build_app(reranker: Any, settings: ServerSettings | None = None) -> "FastAPI":
    """The ASGI app around any object with `score_pairs(pairs) -> (scores, tokens)`."""
    if FastAPI is None:
        raise ImportError("the server needs FastAPI and uvicorn: pip install 'm0lite[serve]'")
    settings = settings or ServerSettings()
    batcher = Batcher(reranker.score_pairs, max_queue=settings.max_queue,
                      max_batch_pairs=settings.max_batch_pairs, batch_wait_s=max(settings.batch_wait_ms, 0) / 1000)
    image_pool = ThreadPoolExecutor(settings.image_threads, thread_name_prefix="m0lite-image")
    started = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.stop)
        image_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="m0lite", version="0.1.0", lifespan=lifespan,
                  description="Jina-compatible reranking API for jina-reranker-m0.")
    app.state.batcher = batcher
    app.add_middleware(_Guard, settings=settings)

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 413, 422, 503, 504)}

    @app.get("/health")
    async def health():
        if not batcher.alive:
            return _error(503, "model worker is not running")
        return {"status": "ok", "queued": batcher.queued}

    @app.get("/v1/models", response_model=ModelList, responses={401: errors[401]})
    async def models():
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=started)])

    @app.post("/v1/rerank", response_model=RerankResponse, responses=errors, openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/RerankRequest"}}}}})
    async def rerank(request: Request):
        raw = await request.body()
        # A big body takes a while to parse: do that off the event loop, which serves everyone.
        req = _parse(raw, settings) if len(raw) < 1 << 20 else await asyncio.to_thread(_parse, raw, settings)
        _check_limits(req, settings)
        deadline = request.scope.get(_ARRIVAL, time.monotonic()) + settings.request_timeout
        inputs = [req.query, *req.documents]
        wheres = ["query", *(f"documents[{i}]" for i in range(len(req.documents)))]
        loaded = await _load_images(inputs, wheres, deadline)
        query, docs = loaded[0], loaded[1:]
        try:
            scores, tokens = await batcher.score([(query, doc) for doc in docs], deadline)
        except Overloaded as e:
            raise _HTTPError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
        except DeadlineExceeded:
            raise _HTTPError(504, f"request not answered within {settings.request_timeout:g} s "
                                  f"(--request-timeout); the server is busy, retry later") from None
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))[: req.top_n]
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                result["document"] = req.documents[i].model_dump()
            results.append(result)
        return JSONResponse({"model": settings.served_model_name,
                             "usage": {"total_tokens": int(sum(tokens))}, "results": results})

    async def _load_images(inputs: list, wheres: list[str], deadline: float) -> list:
        """Text stays a str; each image becomes a decoded PIL image, fetched concurrently."""
        loop = asyncio.get_running_loop()
        out: list[Any] = [x.text if isinstance(x, TextInput) else None for x in inputs]
        jobs = {k: loop.run_in_executor(image_pool, _load_image, x.image, wheres[k], settings)
                for k, x in enumerate(inputs) if isinstance(x, ImageInput)}
        if not jobs:
            return out
        try:
            images = await asyncio.wait_for(asyncio.gather(*jobs.values()), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise _HTTPError(504, f"images not loaded within {settings.request_timeout:g} s "
                                  f"(--request-timeout)") from None
        finally:
            for job in jobs.values():
                job.cancel()  # no-op for finished ones; frees the pool of the others
        for k, image in zip(jobs, images):
            out[k] = image
        return out

    # Every error has the same shape: {"detail": "..."}.
    @app.exception_handler(_HTTPError)
    async def _on_http_error(request, exc: _HTTPError):
        return _error(exc.status, exc.detail, exc.headers)

    @app.exception_handler(HTTPException)
    async def _on_starlette_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request, exc: RequestValidationError):
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]))

    @app.exception_handler(ImageTooLargeError)
    async def _on_too_large(request, exc: ImageTooLargeError):
        return _error(413, str(exc))

    @app.exception_handler(InputError)
    async def _on_input_error(request, exc: InputError):
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def _on_bug(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error (logged on the server)")

    def openapi() -> dict:
        # The body is parsed by hand (for our own 400/422 messages), so add its schema here.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            body = RerankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["RerankRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _parse(raw: bytes, settings: ServerSettings) -> RerankRequest:
    """Body bytes -> RerankRequest, or a 400/413/422 that says what is wrong."""
    if not raw.strip():
        raise _HTTPError(400, "request body is empty: expected a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _HTTPError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise _HTTPError(400, f"malformed JSON: {e}"[:300]) from None
    if not isinstance(data, dict):
        raise _HTTPError(422, f"request body must be a JSON object, got {json_type(data)}")
    docs = data.get("documents")
    docs = docs.get("content") if isinstance(docs, dict) else docs
    if isinstance(docs, list) and len(docs) > settings.max_documents:  # before validating each one
        raise _HTTPError(413, f"documents: {len(docs)} documents, over the limit of "
                              f"{settings.max_documents} per request (--max-documents)")
    try:
        return RerankRequest.model_validate(data)
    except ValidationError as e:
        raise _HTTPError(422, describe_validation_error(e)) from None
    except RecursionError:
        raise _HTTPError(422, "request nested too deeply") from None


def _check_limits(req: RerankRequest, settings: ServerSettings) -> None:
    images = sum(isinstance(x, ImageInput) for x in [req.query, *req.documents])
    if images > settings.max_images:
        raise _HTTPError(413, f"request has {images} images (query and documents), over the limit of "
                              f"{settings.max_images} per request (--max-images)")
    for where, x in [("query", req.query), *((f"documents[{i}]", d) for i, d in enumerate(req.documents))]:
        if isinstance(x, TextInput):
            if len(x.text) > settings.max_text_chars:
                raise _HTTPError(413, f"{where}: text is {len(x.text)} characters, over the limit of "
                                      f"{settings.max_text_chars} (--max-text-chars)")
            check_text(x.text, where, allow_empty=where != "query")  # e.g. no <|image_pad|> in text


# -- command line ----------------------------------------------------------------


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # for argparse's "invalid int value" message
    return parse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `m0lite serve`; every ServerSettings field has one."""
    d, pint, pfloat = ServerSettings(), _positive(int), _positive(float)
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: the reranker's choice for the device)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id in responses and /v1/models (default: the --model's last path part)")
    parser.add_argument("--api-key", default=os.environ.get("M0LITE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: env M0LITE_API_KEY)")
    parser.add_argument("--max-documents", type=pint, default=d.max_documents, help="documents per request")
    parser.add_argument("--max-images", type=pint, default=d.max_images, help="images per request")
    parser.add_argument("--max-body-bytes", type=pint, default=d.max_body_bytes, help="raw request body")
    parser.add_argument("--max-text-chars", type=pint, default=d.max_text_chars, help="query or one document")
    parser.add_argument("--max-image-bytes", type=pint, default=d.max_image_bytes, help="one image, encoded")
    parser.add_argument("--max-image-pixels", type=pint, default=d.max_image_pixels, help="one image, decoded")
    parser.add_argument("--image-timeout", type=pfloat, default=d.image_timeout, help="seconds per image URL")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let image URLs reach loopback, private and link-local addresses")
    parser.add_argument("--image-threads", type=pint, default=d.image_threads, help="concurrent image loads")
    parser.add_argument("--max-queue", type=pint, default=d.max_queue, help="waiting requests; beyond: 503")
    parser.add_argument("--max-batch-pairs", type=pint, default=d.max_batch_pairs, help="pairs per model call")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="how long to wait for more requests to batch")
    parser.add_argument("--request-timeout", type=pfloat, default=d.request_timeout,
                        help="seconds from arrival to answer; then 504")
    parser.add_argument("--doc-cache-mb", type=float, default=0,
                        help="MiB of document keys/values kept to rescore known documents cheaply (0: off)")
    parser.add_argument("--vision-cache-mb", type=float, default=256, help="MiB of images' visual tokens kept")
    parser.add_argument("--pack-weights", choices=["start", "auto", "never"], default="start",
                        help="bf16 on CPU: lay the decoder's weights out for oneDNN at start (about 1.2x faster "
                             "passes, a second more to start; the vision tower's once 4,096 image patches have "
                             "run, so a text-only server never maps it), both after some work (auto), or never")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: torch.compile the blocks instead of packing weights (the first request compiles)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in fields(ServerSettings) if getattr(args, f.name, None) is not None}
    values["served_model_name"] = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    values["api_key"] = args.api_key or None
    return ServerSettings(**values)


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve until interrupted."""
    import torch

    from m0lite.reranker import Reranker

    if FastAPI is None:
        raise SystemExit("the server needs FastAPI and uvicorn: pip install 'm0lite[serve]'")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    reranker = Reranker.from_pretrained(args.model, device=device, dtype=dtype,
                                        doc_cache_bytes=int(args.doc_cache_mb * 2**20),
                                        vision_cache_bytes=int(args.vision_cache_mb * 2**20), compile=args.compile,
                                        pack_weights=False if args.pack_weights == "never" or args.compile else None)
    if args.pack_weights == "start" and not args.compile:
        log.info("weights packed for: %s", ", ".join(reranker.pack(["decoder"])) or "nothing (packing is for bf16 on CPU)")
    log.info("loaded %s on %s in %.1f s", args.model, device, time.perf_counter() - t0)
    app = build_app(reranker, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m0lite.server", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
