"""From a (query, document) pair to the token ids the model scores, exactly as the original does.

    **Document**:\\n{doc}\\n**Query**:\\n{query}<score token>

An image (document or query) is written `<|vision_start|><|image_pad|><|vision_end|>`
and its `<|image_pad|>` becomes one token per visual token (grid t*h*w / 4).
A document of an image and text is the image straight followed by the text,
`<|vision_start|><|image_pad|><|vision_end|>{text}`.
A text document of `max_doc_length` tokens or more is cut to that many tokens
and decoded back to text first (an image and text document: its text, to what
the image's tokens leave of `max_doc_length`; the image is never cut). The
whole prompt is then cut to `max_length - 1` tokens (keeping its start) and the
score token (id 100) is appended. The query is never cut on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import InputError, WeightsError
from .images import num_visual_tokens

SCORE_TOKEN_ID = 100
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
DOC_HEAD, QUERY_HEAD = "**Document**:\n", "\n**Query**:\n"  # the prompt is DOC_HEAD + doc + QUERY_HEAD + query
# Special tokens that would let text smuggle in (or break) visual-token slots.
RESERVED_IN_TEXT = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class Tokenizer:
    """The checkpoint's tokenizer.json through the `tokenizers` library (byte-level BPE, no BOS/EOS added)."""

    def __init__(self, path: str | Path):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise WeightsError(f"{path}: cannot load tokenizer: {e}") from None
        self.image_pad_id = self._tok.token_to_id(IMAGE_PAD)
        if self.image_pad_id is None:
            raise WeightsError(f"{path}: tokenizer has no {IMAGE_PAD} token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character offsets into `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        # transformers' decode keeps special tokens by default; the tokenizers library skips them unless told.
        return self._tok.decode(ids, skip_special_tokens=False)


@dataclass
class Side:
    """One side of a pair: text, an image already preprocessed to its patch grid (t, h, w), or (a
    document only) both: an image and its text."""

    text: str | None = None
    grid: tuple[int, int, int] | None = None

    @property
    def is_image(self) -> bool:
        return self.grid is not None


@dataclass
class Prompt:
    input_ids: list[int]
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # images in order of appearance
    # Tokens of the document part ("**Document**:\n{doc}\n**Query**:\n") at the start of input_ids,
    # when asked for and when they tokenize the same alone as inside the prompt; else 0.
    prefix_len: int = 0


def default_max_doc_length(max_length: int, max_query_length: int) -> int:
    """The original's max_doc_length when none is given."""
    return max(max_length - max_query_length, max_query_length)


def cut_document(tok: Tokenizer, doc: str, max_doc_length: int) -> str:
    """The original's document truncation: a document of max_doc_length tokens or more is cut to
    max_doc_length tokens and decoded back to text (re-encoding inside the prompt may differ at the edge)."""
    ids = tok.encode(doc)
    return tok.decode(ids[:max_doc_length]) if len(ids) >= max_doc_length else doc


def document_string(tok: Tokenizer, doc: Side, max_doc_length: int, merge: int) -> str:
    """The document as the prompt writes it: the image placeholder, then the (cut) text."""
    if not doc.is_image:
        return cut_document(tok, doc.text, max_doc_length)
    if doc.text is None:
        return IMAGE_PLACEHOLDER
    # The text gets what the image leaves of max_doc_length (its visual tokens, <|vision_start|>, <|vision_end|>).
    room = max(max_doc_length - num_visual_tokens(doc.grid, merge) - 2, 0)
    return IMAGE_PLACEHOLDER + cut_document(tok, doc.text, room)


def expand_images(ids: list[int], grids: list[tuple[int, int, int]], image_pad_id: int, merge: int) -> list[int]:
    """Each single <|image_pad|> becomes one token per visual token of its image."""
    expanded, it = [], iter(grids)
    for i in ids:
        if i == image_pad_id:
            expanded.extend([i] * num_visual_tokens(next(it), merge))
        else:
            expanded.append(i)
    return expanded


def build_prompt(tok: Tokenizer, query: Side, doc: Side, *, max_length: int, max_doc_length: int, merge: int = 2,
                 split_prefix: bool = False) -> Prompt:
    """Token ids of one pair (score token included) and the grids of its images, document first.
    With split_prefix, also find where the document part ends (for the document cache)."""
    doc_str = document_string(tok, doc, max_doc_length, merge)
    query_str = IMAGE_PLACEHOLDER if query.is_image else query.text
    prefix_str = DOC_HEAD + doc_str + QUERY_HEAD
    ids = tok.encode(prefix_str + query_str)
    grids = [s.grid for s in (doc, query) if s.is_image]
    expanded = expand_images(ids, grids, tok.image_pad_id, merge)
    prefix_len = 0
    if split_prefix:
        prefix = expand_images(tok.encode(prefix_str), grids[:1] if doc.is_image else [], tok.image_pad_id, merge)
        # BPE may merge across the boundary (a query starting with a newline, say): then no split.
        if expanded[: len(prefix)] == prefix and len(prefix) <= max_length - 1:
            prefix_len = len(prefix)
    if len(expanded) > max_length - 1:
        expanded = expanded[: max_length - 1]
        n_image = sum(num_visual_tokens(g, merge) for g in grids)
        if sum(i == tok.image_pad_id for i in expanded) != n_image:
            raise InputError(
                f"max_length={max_length} cuts into an image's {n_image} visual tokens; raise max_length "
                f"(the prompt needs {len(ids) - len(grids) + n_image + 1} tokens) or lower the image's max_pixels"
            )
    return Prompt(expanded + [SCORE_TOKEN_ID], grids, prefix_len)


def check_text(text, what: str, allow_empty: bool = False) -> str:
    """A text query or document must be a str (a query a non-blank one) free of visual-token markers."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    if not allow_empty and not text.strip():
        raise InputError(f"{what} is empty")
    for tok in RESERVED_IN_TEXT:
        if tok in text:
            raise InputError(f"{what} contains the reserved token {tok}, which marks image slots")
    return text
