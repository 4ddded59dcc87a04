"""The FastAPI app: routes, one scoring path behind every dialect, and errors in one shape.

    POST /v1/rerank /rerank /reranking /v1/reranking /v2/rerank /score /v1/score
                      the dialects of `dialects.py` (Jina, Cohere v1 and v2, TEI, vLLM, llama.cpp)
    GET  /health      {"status": "ok", "queued": n}
    GET  /metrics     Prometheus text format (`metrics.py`)
    GET  /v1/models   OpenAI-style model list (one model)

A scoring request goes through, in order: `Guard` (request id, access log,
auth, body cap and timeout); JSON parse (400); its dialect's validation (422,
naming the field) and limits (413); images loaded in bounded memory
(`inputs.py`, 422/413 naming the document); the `Scheduler`'s model thread
(503 when the queue is full, 504 past the deadline); with `explain`, the
returned results' explanations, on the same thread (`explanations.py`); the
dialect's answer. A client that disconnects meanwhile has its remaining work
dropped.

Every error is `{"detail": "..."}`; a 500 means a bug in m0lite and is logged
with its traceback, never sent to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from m0lite.documents import best_parts, result_fields
from m0lite.errors import ImageTooLargeError, InputError, PdfTooLargeError
from m0lite.images import MAX_PIXELS, MIN_PIXELS

from .dialects import DIALECTS, ROUTES, DialectError, list_fields, pick, ranked, refuse_explain
from .explanations import bounded, check_occlusion, explain_cost
from .guard import ARRIVAL, REQUEST_ID, Guard
from .inputs import InputLoader, LoadTimeout, RequestTooLarge, check_texts
from .memory import Trimmer
from .metrics import Metrics
from .scheduler import DeadlineExceeded, Overloaded, Scheduler
from .schema import (ErrorResponse, ImageInput, ModelCard, ModelList, PdfInput, RerankResponse, TextInput,
                     describe_validation_error, json_type, parse_int)
from .settings import ServerSettings

log = logging.getLogger("m0lite.server")


class HTTPError(Exception):
    """An error answer decided by the app: status, message, extra headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _identity(raw: float) -> float:
    return raw


def build_app(reranker: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app around any object with `score_pairs(pairs, normalize=False, ...) -> (scores, tokens)`
    and `normalize(raw) -> score` (a `Reranker`), and for explanations `explain(query, document, method, ...)`."""
    settings = settings or ServerSettings()
    normalize = getattr(reranker, "normalize", _identity)

    def score_fn(pairs):
        return reranker.score_pairs(pairs, normalize=False, max_length=settings.max_length,
                                    max_query_length=settings.max_query_length)

    def explain_fn(items):
        return [reranker.explain(q, d, method, max_length=settings.max_length,
                                 max_query_length=settings.max_query_length) for q, d, method in items]

    metrics = Metrics(reranker)
    scheduler = Scheduler(score_fn, explain_fn=explain_fn, max_queue=settings.max_queue,
                          max_pass_pairs=settings.max_batch_pairs,
                          max_pass_tokens=settings.max_pass_tokens, max_pass_patches=settings.max_pass_patches,
                          batch_wait_s=settings.batch_wait_ms / 1000, on_pass=metrics.on_pass,
                          on_explain=metrics.on_explain, on_drop=metrics.on_drop, on_idle=Trimmer())
    metrics.watch(scheduler)
    # Images are resized at load with the reranker's own bounds, so its preprocess resizes nothing.
    loader = InputLoader(settings, min_pixels=getattr(reranker, "min_pixels", MIN_PIXELS),
                         max_pixels=getattr(reranker, "max_pixels", MAX_PIXELS),
                         count_tokens=getattr(reranker, "count_tokens", None),
                         tokenizer=getattr(reranker, "tokenizer", None), metrics=metrics)
    started = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.stop)
        loader.shutdown()

    app = FastAPI(title="m0lite", version="0.1.0", lifespan=lifespan,
                  description="Reranking API for jina-reranker-m0: Jina, Cohere, TEI and vLLM dialects.")
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.loader = loader
    app.add_middleware(Guard, settings=settings, metrics=metrics,
                       routes=[*ROUTES, "/health", "/v1/models", "/openapi.json"])

    errors = {status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 422, 503, 504)}

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return _error(503, "model worker is not running")
        return {"status": "ok", "queued": scheduler.queued}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", response_model=ModelList, responses={401: errors[401]})
    async def models():
        return ModelList(data=[ModelCard(id=settings.served_model_name, created=started)])

    async def score(request: Request):
        raw = await request.body()
        # A big body takes a while to parse: do that off the event loop, which serves everyone.
        data = _parse_json(raw) if len(raw) < 1 << 20 else await asyncio.to_thread(_parse_json, raw)
        dialect = pick(request.url.path, data, dict(request.scope["headers"]))
        for key, items in list_fields(data):  # before validating each one
            if len(items) > settings.max_documents:
                raise HTTPError(413, f"{key}: {len(items)} items, over the limit of {settings.max_documents} "
                                     f"documents per request (--max-documents)")
        try:
            refuse_explain(dialect, data)
            task = dialect.task(dialect.request.model_validate(data))
        except ValidationError as e:
            raise HTTPError(422, describe_validation_error(e)) from None
        except DialectError as e:
            raise HTTPError(422, str(e)) from None
        except RecursionError:
            raise HTTPError(422, "request nested too deeply") from None
        check_texts(task, settings)
        if task.explain and any(isinstance(d, PdfInput) for d in task.documents):
            raise HTTPError(422, "explain: not for PDF documents; explain a page by sending it as an image")
        if task.explain and task.max_chunks_per_doc is not None:
            raise HTTPError(422, "explain: not with max_chunks_per_doc; explain a window by sending its text "
                                 "(the result's window: {start, end})")
        deadline = request.scope.get(ARRIVAL, time.monotonic()) + settings.request_timeout
        work = asyncio.ensure_future(_score(task, deadline))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left: stop its work (queued pairs are dropped)
            work.cancel()
            log.info("request %s: client disconnected, its work dropped", request.scope.get(REQUEST_ID))
            return Response(status_code=499)
        scores, tokens = work.result()
        return JSONResponse(dialect.answer(task, scores, int(sum(tokens)), settings.served_model_name))

    async def _score(task, deadline):
        """The task's scores (normalised unless it asks for raw ones) and token counts; with explain, its
        returned results' explanations set on it."""
        try:
            pairs, costs, sizes, owners = await loader.prepare(task, deadline)
        except LoadTimeout:
            raise HTTPError(504, f"images not loaded within {settings.request_timeout:g} s "
                                 f"(--request-timeout)") from None
        check_occlusion(task, costs, settings.max_occlusion_parts)
        try:
            part_scores, part_tokens = await scheduler.score(pairs, deadline, costs)
            part_scores = part_scores if task.raw_scores else [normalize(s) for s in part_scores]
            scores, tokens = _fold(task, owners, part_scores, part_tokens)
            if task.explain:
                shown = ranked(task, scores)
                items = [(*pairs[i], task.explain) for i in shown]
                explanations = await scheduler.explain(items, deadline, [
                    explain_cost(costs[i], task.explain, settings.max_pass_tokens) for i in shown])
                task.explanations = {i: bounded(e, settings.max_explanation_parts, sizes[i])
                                     for i, e in zip(shown, explanations)}
            return scores, tokens
        except Overloaded as e:
            raise HTTPError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
        except DeadlineExceeded:
            raise HTTPError(504, f"request not answered within {settings.request_timeout:g} s "
                                 f"(--request-timeout); the server is busy, retry later") from None

    for path, names in ROUTES.items():
        refs = [{"$ref": f"#/components/schemas/{DIALECTS[n].request.__name__}"} for n in dict.fromkeys(
            n for n in names if n != "cohere-v1")]  # Cohere's v1 body is Jina's; only a default differs
        app.add_api_route(path, score, methods=["POST"], responses=errors, summary=f"rerank ({', '.join(names)})",
                          openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                              "schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}}})

    # Every error has the same shape: {"detail": "..."}.
    @app.exception_handler(HTTPError)
    async def _on_http_error(request, exc: HTTPError):
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

    @app.exception_handler(PdfTooLargeError)
    async def _on_pdf_too_large(request, exc: PdfTooLargeError):
        return _error(413, str(exc))

    @app.exception_handler(RequestTooLarge)
    async def _on_request_too_large(request, exc: RequestTooLarge):
        return _error(413, str(exc))

    @app.exception_handler(InputError)
    async def _on_input_error(request, exc: InputError):
        return _error(422, str(exc))

    @app.exception_handler(Exception)
    async def _on_bug(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error (logged on the server)")

    def openapi() -> dict:
        # Bodies are parsed by hand (for our own 400/422 messages), so add their schemas here.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for dialect in DIALECTS.values():
                body = dialect.request.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[dialect.request.__name__] = body
            for model in (TextInput, ImageInput, RerankResponse):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components.setdefault(model.__name__, body)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _fold(task, owners, part_scores, part_tokens) -> tuple[list[float], list[int]]:
    """Scores and tokens of the task's pairs from those of the pairs scored: a document scored in parts (a PDF's
    pages, a text's windows) scores as its best part and counts the tokens of all; what its result says of
    its parts (documents.result_fields) goes on the task."""
    scores, tokens = [float("-inf")] * len(task.pairs), [0] * len(task.pairs)
    parts: dict[int, list[tuple[float, dict]]] = {}
    for (k, info), score, n in zip(owners, part_scores, part_tokens):
        scores[k], tokens[k] = max(scores[k], score), tokens[k] + n
        if info:
            parts.setdefault(k, []).append((score, info))
    task.parts = {k: result_fields(best_parts(scored)) for k, scored in parts.items()}
    return scores, tokens


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the guard replays the body, then passes the disconnect on)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _parse_json(raw: bytes) -> dict:
    """Body bytes -> a JSON object, or a 400/422 that says what is wrong."""
    if not raw.strip():
        raise HTTPError(400, "request body is empty: expected a JSON object")
    try:
        data = json.loads(raw, parse_int=parse_int)
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, bad UTF-8
        raise HTTPError(400, f"malformed JSON: {e}"[:300]) from None
    if not isinstance(data, dict):
        raise HTTPError(422, f"request body must be a JSON object, got {json_type(data)}")
    return data
