"""Request and response models of the HTTP API (the differences between dialects: `dialects.py`).

The main shape is Jina's (https://api.jina.ai/v1/rerank):

    request   {model, query, documents, top_n?, return_documents?, explain?, explain_method?, pdf_text?,
               max_chunks_per_doc?, chunk_overlap?}
    response  {id, model, usage: {total_tokens, prompt_tokens},
               results: [{index, relevance_score, pages?, window?, document?, explanation?}]}

`query` and each document are a string (text), `{"text": ...}` or `{"image": src}`,
where src is an http(s) URL, a data URI or bare base64; a document may also be both,
`{"image": src, "text": ...}` (the prompt puts the image's tokens before the text). Requests written for the
vLLM or Cohere APIs are accepted where they differ only in spelling:
`top_k` for `top_n`, `top_n: 0` for "all", OpenAI-style content parts
(`{"type": "text", "text": ...}`, `{"type": "image_url", "image_url": {"url": ...}}`),
vLLM's `documents: {"content": [parts]}`, and unknown extra fields are ignored.
The response has Jina's shape (with vLLM's `id`); an echoed document is `{"text": ...}` for a
text document and `{"image": src}` (the source exactly as given) for an image, with its `text` if it has one.
`explain` and `explain_method` are m0lite's own (`explanations.py`), in this shape only.

The validators below write their own messages, each naming the offending field
("documents[3]: ..."), because pydantic's messages for a union of three shapes
are three errors about shapes the client never meant.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

EXPLAIN_METHODS = ("attention", "occlusion")  # m0lite.explain's; the first is the default (one pass a result)


class HugeNumber:
    """An integer in the body with too many digits to convert (Python refuses over 4300): kept as its
    digit count, so that the field it sits in can be named in the error."""

    def __init__(self, digits: int):
        self.digits = digits


def parse_int(text: str) -> int | HugeNumber:
    """json.loads' parse_int: no field takes an integer of more than a few digits."""
    return int(text) if len(text) <= 64 else HugeNumber(len(text))


class TextInput(BaseModel):
    """A text query or document."""

    model_config = ConfigDict(extra="ignore")
    text: str


class ImageInput(BaseModel):
    """An image query or document: an http(s) URL, a data URI, or bare base64."""

    model_config = ConfigDict(extra="ignore")
    image: str


class ImageTextInput(ImageInput):
    """A document of an image and the text that goes with it."""

    text: str


class PdfInput(BaseModel):
    """A PDF document: an http(s) URL, a data URI or bare base64, and optionally the pages to score ("1-20")."""

    model_config = ConfigDict(extra="ignore")
    pdf: str
    pages: str | None = None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, HugeNumber):
        return f"a {value.digits}-digit number"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _check_unicode(text: str, where: str) -> str:
    # JSON escapes can smuggle in lone surrogates ("\ud800"), which no tokenizer
    # or UTF-8 encoder accepts; refuse them here rather than fail later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: text is not valid Unicode ({e.reason} at position {e.start})") from None
    return text


def _parse_input(value: Any, where: str, both: bool = False) -> TextInput | ImageInput:
    """One query or document, in any accepted spelling, as TextInput or ImageInput; with `both` (a
    document), {'image': ..., 'text': ...} as ImageTextInput."""
    if isinstance(value, (TextInput, ImageInput, PdfInput)):
        return value
    if isinstance(value, str):
        return TextInput(text=_check_unicode(value, where))
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a string, {{'text': ...}} or {{'image': ...}}, got {json_type(value)}")
    if value.get("type") == "image_url":  # OpenAI/vLLM content part
        inner = value.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
        if not isinstance(url, str):
            raise ValueError(f"{where}: 'image_url' must be a string or {{'url': string}}")
        value = {"image": url}
    if both and "pdf" in value:
        return _parse_pdf(value, where)
    keys = [k for k in ("text", "image") if k in value]
    if not keys or (len(keys) == 2 and not both):
        also = " (or, for a document, both)" if both else ""
        raise ValueError(f"{where}: give exactly one of 'text' or 'image'{also}, got keys {sorted(value)[:8]}")
    for key in keys:
        if not isinstance(value[key], str):
            raise ValueError(f"{where}.{key}: expected a string, got {json_type(value[key])}")
    if "image" in value and not value["image"].strip():
        raise ValueError(f"{where}.image: is empty")
    if keys == ["text"]:
        return TextInput(text=_check_unicode(value["text"], f"{where}.text"))
    image = _check_unicode(value["image"], f"{where}.image")
    if len(keys) == 2:
        return ImageTextInput(image=image, text=_check_unicode(value["text"], f"{where}.text"))
    return ImageInput(image=image)


def _parse_pdf(value: dict, where: str) -> PdfInput:
    if "text" in value or "image" in value:
        raise ValueError(f"{where}: a PDF document is {{'pdf': src, 'pages': '1-20'}}; 'text' or 'image' does not go "
                         f"with 'pdf' (send pdf_text: true to score each page with its text)")
    if not isinstance(value["pdf"], str) or not value["pdf"].strip():
        raise ValueError(f"{where}.pdf: expected a non-empty string (an http(s) URL, a data URI or base64), "
                         f"got {json_type(value['pdf'])}")
    pages = value.get("pages")
    if isinstance(pages, int) and not isinstance(pages, bool):
        pages = str(pages)
    if pages is not None and not isinstance(pages, str):
        raise ValueError(f"{where}.pages: expected a string such as '1-20' or '1,3,5-7', got {json_type(pages)}")
    return PdfInput(pdf=_check_unicode(value["pdf"], f"{where}.pdf"), pages=pages)


def _parse_query(value: Any) -> TextInput | ImageInput:
    query = _parse_input(value, "query")
    if isinstance(query, TextInput) and not query.text.strip():
        raise ValueError("query: is empty")
    return query


def _parse_documents(value: Any) -> list[TextInput | ImageInput]:
    if isinstance(value, dict) and isinstance(value.get("content"), list):  # vLLM multimodal form
        value = value["content"]
    if not isinstance(value, list):
        raise ValueError(f"documents: expected an array, got {json_type(value)}")
    if not value:
        raise ValueError("documents: is empty; give at least one document")
    return [_parse_input(doc, f"documents[{i}]", both=True) for i, doc in enumerate(value)]


def _parse_top_n(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, HugeNumber):
        raise ValueError(f"top_n: expected a non-negative integer, got {json_type(value)}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"top_n: expected a non-negative integer, got {value!r}"[:200])
    return value or None  # vLLM's top_n = 0 means "all"


def _bool(name: str):
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {json_type(value)}")
        return value
    return parse


_parse_bool = _bool("return_documents")


def _count(name: str, least: int):
    """An optional integer of at least `least`."""
    def parse(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            got = json_type(value) if not isinstance(value, int) or isinstance(value, bool) else repr(value)
            raise ValueError(f"{name}: expected an integer of at least {least}, got {got}"[:200])
        return value
    return parse


def _parse_method(value: Any) -> str:
    if value not in EXPLAIN_METHODS:
        got = repr(value) if isinstance(value, str) else json_type(value)
        raise ValueError(f"explain_method: expected one of {', '.join(map(repr, EXPLAIN_METHODS))}, got {got}"[:200])
    return value


def _parse_model(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"model: expected a string, got {json_type(value)}")
    return value


Input = Union[str, TextInput, ImageTextInput, ImageInput, PdfInput]

# The query as the OpenAPI schema states it: what the validator accepts, a blank text excluded.
_NONBLANK = {"type": "string", "minLength": 1, "pattern": "\\S"}
_QUERY_SCHEMA = {"anyOf": [_NONBLANK, {"type": "object", "properties": {"text": _NONBLANK}, "required": ["text"]},
                           {"type": "object", "properties": {"image": {"type": "string", "minLength": 1}},
                            "required": ["image"]}]}
Query = Annotated[Input, BeforeValidator(_parse_query), WithJsonSchema(_QUERY_SCHEMA)]
Model = Annotated[str | None, BeforeValidator(_parse_model)]
TopN = Annotated[int | None, BeforeValidator(_parse_top_n)]


def _model_field():
    return Field(None, description="Accepted for compatibility and otherwise ignored: the server scores with its one model.")


def _top_n_field():
    return Field(None, ge=0, validation_alias=AliasChoices("top_n", "top_k"),
                 description="Return only the best top_n results (all when absent or 0). Alias: top_k.")


class RerankFields(BaseModel):
    """What Jina's and Cohere's rerank requests share."""

    model_config = ConfigDict(extra="ignore")

    model: Model = _model_field()
    query: Query
    documents: Annotated[list[Input], BeforeValidator(_parse_documents)] = Field(min_length=1)
    top_n: TopN = _top_n_field()
    return_documents: Annotated[bool, BeforeValidator(_parse_bool)] = Field(
        True, description="Echo each document in its result: {'text': ...} or {'image': src as given}."
    )
    pdf_text: Annotated[bool, BeforeValidator(_bool("pdf_text"))] = Field(
        False, description="Score each page of a PDF document with its extracted text (else its image alone).")
    max_chunks_per_doc: Annotated[int | None, BeforeValidator(_count("max_chunks_per_doc", 1))] = Field(
        None, description="Score a text document longer than the model reads as up to this many windows of what it "
                          "reads; it scores as its best window, which its result names ('window'). Absent: cut.")
    chunk_overlap: Annotated[int | None, BeforeValidator(_count("chunk_overlap", 0))] = Field(
        None, description="Tokens consecutive windows share (default 128, at most a quarter of a window).")


class RerankRequest(RerankFields):
    """POST /v1/rerank (Jina, vLLM, llama.cpp), with m0lite's explanations of the results."""

    explain: Annotated[bool, BeforeValidator(_bool("explain"))] = Field(
        False, description="Give each result returned an 'explanation': Reranker.explain's attributions "
                           "over its text tokens and image regions, the strongest of each kept (see README).")
    explain_method: Annotated[Literal[EXPLAIN_METHODS], BeforeValidator(_parse_method)] = Field(
        EXPLAIN_METHODS[0], description="'attention' (the score token's attention, one pass per result) or "
                                        "'occlusion' (the score lost without each part, one pass per part; "
                                        "for few, short documents: --max-occlusion-parts).")


class CohereRerankRequest(RerankFields):
    """POST /v1/rerank from Cohere's SDK, and POST /v2/rerank: documents are not echoed unless asked."""

    return_documents: Annotated[bool, BeforeValidator(_parse_bool)] = Field(
        False, description="Echo each document in its result (Cohere's default: false).")


def _parse_texts(value: Any) -> list[TextInput]:
    if not isinstance(value, list):
        raise ValueError(f"texts: expected an array of strings, got {json_type(value)}")
    if not value:
        raise ValueError("texts: is empty; give at least one text")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}]: expected a string, got {json_type(t)}")
        out.append(TextInput(text=_check_unicode(t, f"texts[{i}]")))
    return out


def _parse_direction(value: Any) -> str:
    if value not in ("Right", "Left"):
        raise ValueError(f"truncation_direction: expected 'Right' or 'Left', got {value!r}"[:120])
    return value


class TEIRerankRequest(BaseModel):
    """POST /rerank in Hugging Face text-embeddings-inference's shape (told apart by `texts`)."""

    model_config = ConfigDict(extra="ignore")

    query: Query
    texts: Annotated[list[TextInput], BeforeValidator(_parse_texts),
                     WithJsonSchema({"type": "array", "items": {"type": "string"}, "minItems": 1})] = Field(min_length=1)
    raw_scores: Annotated[bool, BeforeValidator(_bool("raw_scores"))] = Field(
        False, description="Scores before the sigmoid (the model's logits, shifted as the score head gives them).")
    return_text: Annotated[bool, BeforeValidator(_bool("return_text"))] = Field(
        False, description="Echo each text in its result.")
    truncate: Annotated[bool, BeforeValidator(_bool("truncate"))] = Field(
        False, description="Cut texts the model cannot read whole; when false such a text is refused (413).")
    truncation_direction: Annotated[Literal["Right", "Left"], BeforeValidator(_parse_direction)] = "Right"
    # Not in TEI's own schema, but clients that speak it send it (litellm's TEI provider) and cut nothing
    # themselves: honoured as in the Jina shape.
    top_n: TopN = _top_n_field()


def _parse_side(name: str):
    def parse(value: Any) -> list[TextInput | ImageInput]:
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a string or an array, got {json_type(value)}")
        if not value:
            raise ValueError(f"{name}: is empty")
        return [_parse_input(x, f"{name}[{i}]") for i, x in enumerate(value)]
    return parse


class ScoreRequest(BaseModel):
    """POST /score and /v1/score in vLLM's shape: text_1 against text_2, one to one or one to many."""

    model_config = ConfigDict(extra="ignore")

    model: Model = _model_field()
    text_1: Annotated[list[Input], BeforeValidator(_parse_side("text_1"))] = Field(
        description="The query, or one query per text_2 item.")
    text_2: Annotated[list[Input], BeforeValidator(_parse_side("text_2"))] = Field(
        description="The documents (a string, or an array).")


class Usage(BaseModel):
    total_tokens: int = Field(description="Prompt tokens over all (query, document) pairs, image tokens included.")


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request's list.")
    relevance_score: float = Field(description="sigmoid-normalised score in (0, 1); higher is more relevant.")
    document: TextInput | ImageInput | PdfInput | None = None
    pages: list[dict] | None = Field(None, description=(
        "A PDF document's best pages, [{page, relevance_score}] best first (1-based); its score is the first's."))
    window: dict | None = Field(None, description=(
        "With max_chunks_per_doc, a text document's best window, {start, end} (character offsets); its score is "
        "that window's."))
    explanation: dict | None = Field(None, description=(
        "With explain: {method, score, raw_score, text: [{token, start, end, score}], text_omitted, image: null "
        "or {width, height, rows, cols, regions: [{row, col, box, score}], regions_omitted}}."))


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[RerankResult] = Field(description="Best first.")


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    detail: str


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "m0lite"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


def _where(loc: tuple) -> str:
    """('documents', 3, 'text') -> 'documents[3].text'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """One readable line for a pydantic ValidationError, first `limit` problems."""
    messages: list[str] = []
    for err in exc.errors(include_url=False):
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # ours, already names the field
        elif err["type"] == "missing":
            msg = f"{_where(err['loc'])}: is required"
        else:
            msg = f"{_where(err['loc'])}: {err['msg']}"
        if msg not in messages:
            messages.append(msg)
    extra = len(messages) - limit
    return "; ".join(messages[:limit]) + (f"; and {extra} more" if extra > 0 else "")
