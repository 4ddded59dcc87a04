"""Every reranking dialect the server speaks, and how each differs: one table, one scoring path.

    route            dialect     request                         answer
    /v1/rerank       jina        {query, documents, top_n,       {id, model, usage, results: [{index,
    /rerank          (vLLM,       return_documents=true,          relevance_score, pages?, window?,
    /reranking       llama.cpp)   explain=false, explain_method,  document?, explanation?}]} best first
    /v1/reranking                 pdf_text, max_chunks_per_doc,
                                  chunk_overlap}
    /v1/rerank       cohere-v1   as jina, return_documents=false {id, results, meta: {api_version: 1,
                                 (Cohere's SDK, or rank_fields /   billed_units}}
                                 max_chunks_per_doc /
                                 max_tokens_per_doc in the body)
    /v2/rerank       cohere-v2   as cohere-v1                    as cohere-v1, api_version 2
    /rerank          tei         {query, texts, raw_scores,      [{index, score, text?}] best first
                                 return_text, truncate=false,
                                 top_n (litellm sends it)}
                                 (told apart by `texts`)
    /score           vllm-score  {text_1, text_2}: one query to  {id, object: list, created, model,
    /v1/score                    many, or pairwise                data: [{index, object: score, score}],
                                                                 usage} in input order

Every dialect turns its request into a `Task` (pairs to score and how to
answer); the app scores every task the same way, and the dialect writes the
answer. Errors are `{"detail": "..."}` in every dialect. Explanations
(`explain`, m0lite's own) come in the Jina shape only; the other dialects
refuse a request that asks for them (422) rather than answer without.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from m0lite.reranker import rank_order

from .schema import (CohereRerankRequest, ImageInput, RerankRequest, ScoreRequest, TEIRerankRequest, TextInput,
                     describe_validation_error)

Input = TextInput | ImageInput


class DialectError(ValueError):
    """A request that fits no dialect of its route, or breaks one of the dialect's own rules."""


@dataclass
class Task:
    """What any dialect asks of the model."""

    pairs: list[tuple[Input, Input]]  # (query, document)
    wheres: list[tuple[str, str]]  # how errors name each pair's sides ("query", "documents[3]")
    documents: list[Input]  # what `return_documents` echoes, by pair index
    top_n: int | None = None
    return_documents: bool = False
    raw_scores: bool = False  # scores before the sigmoid
    truncate: bool = True  # False: a document the model would cut is refused (413)
    explain: str | None = None  # the method of the explanations asked for, or None
    explanations: dict[int, dict] = field(default_factory=dict)  # set after scoring: result index -> explanation
    pdf_text: bool = False  # a PDF's pages are scored with their text
    max_chunks_per_doc: int | None = None  # a long text document is scored in up to this many windows
    chunk_overlap: int | None = None  # tokens consecutive windows share (None: documents.check_windows' default)
    parts: dict[int, dict] = field(default_factory=dict)  # set after scoring: by pair index, what a result says of
    # the document's parts (documents.result_fields: a PDF's best pages, a text's best window)


@dataclass(frozen=True)
class Dialect:
    name: str
    request: type[BaseModel]  # validates the body; its JSON schema goes in the OpenAPI document
    task: Callable[[Any], Task]
    answer: Callable[[Task, list[float], int, str], Any]  # (task, scores, total tokens, model name) -> JSON
    explains: bool = False  # takes `explain` (the others refuse it)


# -- requests -> tasks -------------------------------------------------------------


def _rerank_task(req: CohereRerankRequest | RerankRequest) -> Task:
    docs = list(req.documents)
    return Task(pairs=[(req.query, d) for d in docs], wheres=[("query", f"documents[{i}]") for i in range(len(docs))],
                documents=docs, top_n=req.top_n, return_documents=req.return_documents, pdf_text=req.pdf_text,
                max_chunks_per_doc=req.max_chunks_per_doc, chunk_overlap=req.chunk_overlap)


def _jina_task(req: RerankRequest) -> Task:
    task = _rerank_task(req)
    task.explain = req.explain_method if req.explain else None
    return task


def _tei_task(req: TEIRerankRequest) -> Task:
    if req.truncate and req.truncation_direction != "Right":
        raise DialectError("truncation_direction: only 'Right' is supported (the model keeps a document's start)")
    docs = list(req.texts)
    return Task(pairs=[(req.query, d) for d in docs], wheres=[("query", f"texts[{i}]") for i in range(len(docs))],
                documents=docs, top_n=req.top_n, return_documents=req.return_text, raw_scores=req.raw_scores,
                truncate=req.truncate)


def _score_task(req: ScoreRequest) -> Task:
    q, d = list(req.text_1), list(req.text_2)
    if len(q) == 1:
        q = q * len(d)
        wq = ["text_1[0]"] * len(d)
    elif len(q) == len(d):
        wq = [f"text_1[{i}]" for i in range(len(q))]
    else:
        raise DialectError(f"text_1 has {len(q)} items and text_2 {len(d)}: give one text_1, "
                           f"or as many as text_2")
    return Task(pairs=list(zip(q, d)), wheres=[(w, f"text_2[{i}]") for i, w in enumerate(wq)], documents=d)


# -- scores -> answers -------------------------------------------------------------


def ranked(task: Task, scores: list[float]) -> list[int]:
    """The indices of the results a task returns, best first."""
    return rank_order(scores)[: task.top_n]


def _echo(doc: Input) -> dict:
    return doc.model_dump(exclude_none=True)


def _results(task: Task, scores: list[float]) -> list[dict]:
    """Jina's and Cohere's results: best first, each with its index, score and (if asked) document."""
    results = []
    for i in ranked(task, scores):
        result = {"index": i, "relevance_score": scores[i]}
        result.update(task.parts.get(i, {}))
        if task.return_documents:
            result["document"] = _echo(task.documents[i])
        if i in task.explanations:
            result["explanation"] = task.explanations[i]
        results.append(result)
    return results


def _jina_answer(task: Task, scores: list[float], tokens: int, model: str) -> dict:
    results = _results(task, scores)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model,
            "usage": {"total_tokens": tokens, "prompt_tokens": tokens}, "results": results}


def _cohere_answer(version: str):
    def answer(task: Task, scores: list[float], tokens: int, model: str) -> dict:
        return {"id": str(uuid.uuid4()), "results": _results(task, scores),
                "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}}}
    return answer


def _tei_answer(task: Task, scores: list[float], tokens: int, model: str) -> list:
    out = []
    for i in ranked(task, scores):
        result = {"index": i, "score": scores[i]}
        if task.return_documents:
            result["text"] = task.documents[i].text
        out.append(result)
    return out


def _score_answer(task: Task, scores: list[float], tokens: int, model: str) -> dict:
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


# -- the table ---------------------------------------------------------------------

DIALECTS = {
    "jina": Dialect("jina", RerankRequest, _jina_task, _jina_answer, explains=True),
    "cohere-v1": Dialect("cohere-v1", CohereRerankRequest, _rerank_task, _cohere_answer("1")),
    "cohere-v2": Dialect("cohere-v2", CohereRerankRequest, _rerank_task, _cohere_answer("2")),
    "tei": Dialect("tei", TEIRerankRequest, _tei_task, _tei_answer),
    "vllm-score": Dialect("vllm-score", ScoreRequest, _score_task, _score_answer),
}

# Each route's dialects, the first the default; `pick` chooses among them.
ROUTES = {
    "/v1/rerank": ("jina", "cohere-v1"),
    "/rerank": ("jina", "tei"),
    "/reranking": ("jina",),
    "/v1/reranking": ("jina",),
    "/v2/rerank": ("cohere-v2",),
    "/score": ("vllm-score",),
    "/v1/score": ("vllm-score",),
}

_COHERE_ONLY_FIELDS = ("rank_fields", "max_chunks_per_doc", "max_tokens_per_doc")
EXPLAIN_FIELDS = ("explain", "explain_method")


def pick(path: str, body: dict, headers: dict[bytes, bytes]) -> Dialect:
    """The dialect of a request: by route, then (where a route has two) by client or body."""
    names = ROUTES[path]
    if "cohere-v1" in names and (b"cohere" in headers.get(b"x-fern-sdk-name", b"").lower()
                                 or any(k in body for k in _COHERE_ONLY_FIELDS)):
        return DIALECTS["cohere-v1"]
    if "tei" in names and "texts" in body and "documents" not in body:
        return DIALECTS["tei"]
    return DIALECTS[names[0]]


def refuse_explain(dialect: Dialect, body: dict) -> None:
    """A dialect that gives no explanations refuses a body that asks for them, whatever the value: answering
    without them would look like a server that ignored the question."""
    asked = [k for k in EXPLAIN_FIELDS if k in body]
    if asked and not dialect.explains:
        raise DialectError(f"{asked[0]}: explanations come in the Jina shape only (POST /v1/rerank, /rerank, "
                           f"/reranking, /v1/reranking with 'documents'); this request is read as {dialect.name}")


def list_fields(body: dict) -> list[tuple[str, Any]]:
    """The arrays in a body that become pairs, to count them before validating each item."""
    out = []
    for key in ("documents", "texts", "text_1", "text_2"):
        value = body.get(key)
        value = value.get("content") if key == "documents" and isinstance(value, dict) else value
        if isinstance(value, list):
            out.append((key, value))
    return out


__all__ = ["DIALECTS", "ROUTES", "Dialect", "DialectError", "Task", "describe_validation_error", "list_fields", "pick",
           "ranked", "refuse_explain"]
