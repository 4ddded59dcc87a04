"""Documents as users have them, scored in parts: a PDF page by page, a long text in token windows.

A document becomes one or more parts, each scored exactly as that part alone
would be as a document (a page as the image document of its rendered pixels, a
window as the text document of its characters); the document's score is its
best part's. A document that is neither a PDF nor a windowed text is one part,
itself, so the default path is today's, unchanged.

    {"pdf": src, "pages": "1-20"}   -> a page part per selected page (rendered lazily, in passes)
    long text, max_chunks_per_doc=k -> up to k windows of the document budget, overlapping chunk_overlap tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .errors import InputError

CHUNK_OVERLAP = 128  # tokens two consecutive windows share, so that a passage cut by one is whole in the next
PAGES_SHOWN = 3  # a PDF's result lists its best pages, this many


@dataclass
class Part:
    """One scored part of document `doc` (its index in the request): the pair it is scored in (query and
    document side, both prepared) and what part it is ({} for a whole document, {"page": n} or
    {"window": {"start": s, "end": e}})."""

    doc: int
    pair: tuple
    info: dict = field(default_factory=dict)
    is_page: bool = False


def is_pdf(doc) -> bool:
    return isinstance(doc, dict) and "pdf" in doc


def check_windows(max_chunks_per_doc, chunk_overlap, max_doc_length: int) -> int:
    """The overlap in tokens the options ask for (None: CHUNK_OVERLAP, at most a quarter of a window)."""
    window = window_tokens(max_doc_length)
    if chunk_overlap is None:
        chunk_overlap = min(CHUNK_OVERLAP, window // 4)
    if max_chunks_per_doc is None:
        return chunk_overlap
    if isinstance(max_chunks_per_doc, bool) or not isinstance(max_chunks_per_doc, int) or max_chunks_per_doc < 1:
        raise InputError(f"max_chunks_per_doc must be a positive int or None, got {max_chunks_per_doc!r}")
    if isinstance(chunk_overlap, bool) or not isinstance(chunk_overlap, int) or chunk_overlap < 0:
        raise InputError(f"chunk_overlap must be a non-negative int, got {chunk_overlap!r}")
    if chunk_overlap >= window:
        raise InputError(f"chunk_overlap ({chunk_overlap}) must be smaller than a window "
                         f"({window} tokens: the document budget max_doc_length - 1)")
    return chunk_overlap


def window_tokens(max_doc_length: int) -> int:
    """Tokens in a window: one under the document budget, since a text of max_doc_length tokens or more is cut."""
    return max(max_doc_length - 1, 1)


def text_windows(offsets: list[tuple[int, int]], length: int, max_doc_length: int, max_chunks: int,
                 overlap: int) -> list[tuple[int, int]]:
    """Character spans (start, end) of a text's windows, given its tokens' character offsets: one span (the
    whole text) if it fits the document budget, else up to `max_chunks` windows of window_tokens tokens,
    each starting `overlap` tokens before the previous one ends. Spans cover the text between tokens too."""
    n, size = len(offsets), window_tokens(max_doc_length)
    if n < max_doc_length:
        return [(0, length)]
    spans, first = [], 0
    while len(spans) < max_chunks:
        last = min(first + size, n)
        start = 0 if first == 0 else offsets[first][0]
        end = length if last == n else offsets[last - 1][1]
        spans.append((start, end))
        if last == n:
            break
        first = last - overlap
    return spans


def split_text(tokenizer, text: str, max_doc_length: int, max_chunks: int, overlap: int) -> list[tuple[int, int]]:
    """`text_windows` of a text, tokenized with `tokenizer` (a prompt.Tokenizer)."""
    _, offsets = tokenizer.encode_with_offsets(text)
    return text_windows(offsets, len(text), max_doc_length, max_chunks, overlap)


def in_passes(parts: Iterable[Part], pages_per_pass: int) -> Iterator[list[Part]]:
    """Parts in groups, each closed once it holds pages_per_pass pages: what one group of scoring passes
    holds of a PDF's pages. Without PDFs, everything is one group."""
    # A group is handed out of a one-item list, never from a name of this frame: a suspended generator keeps
    # its names alive, and a name holding the last group would keep its pages' pixels for as long as the
    # consumer scores them and beyond, past the heap trim that should return them.
    full, group, pages, part = [], [], 0, None
    for part in parts:
        group.append(part)
        pages += part.is_page
        if pages >= pages_per_pass:
            full.append(group)
            group, pages, part = [], 0, None
            yield full.pop()
    part = None
    if group:
        full.append(group)
        group = None
        yield full.pop()


def best_parts(parts: list[tuple[float, dict]]) -> list[tuple[float, dict]]:
    """A document's scored parts, best first (ties in order)."""
    return sorted(parts, key=lambda p: -p[0])


def result_fields(ordered: list[tuple[float, dict]]) -> dict:
    """What a document's result says of its parts, given them best first (`best_parts`): a PDF its best pages,
    {"pages": [{"page": n, "relevance_score": s}, ...]}; a windowed text its best window, {"window": {...}};
    a whole document nothing."""
    if "page" in ordered[0][1]:
        return {"pages": [{"page": info["page"], "relevance_score": s} for s, info in ordered[:PAGES_SHOWN]]}
    return dict(ordered[0][1])
