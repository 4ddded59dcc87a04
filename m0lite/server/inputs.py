"""A task's inputs made ready for the model thread: limits checked, images loaded in bounded memory,
each pair's cost estimated.

An image is fetched (or its base64 decoded) and its header read first, so that
a request's pixel budget is checked before anything is decoded; then it is
decoded under the shared `ImageBudget` and resized at once to the model's
resolution, which is all that waits for the model (the resize is the one
`preprocess` does, so the pixels the model sees are unchanged). Text costs
are estimated from the text's UTF-8 size: counting tokens exactly would hold
the interpreter lock for seconds on a large request, stalling every other.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from m0lite.documents import check_windows, split_text
from m0lite.errors import ImageError, ImageTooLargeError, InputError, M0liteError, PdfError, PdfTooLargeError
from m0lite.images import MAX_PIXELS, MIN_PIXELS, parse_image_source, smart_resize
from m0lite.images.decode import decode, image_size
from m0lite.images.fetch import fetch
from m0lite.images.preprocess import PATCH_SIZE, resize_for_model
from m0lite.pdf import is_pdf_header
from m0lite.prompt import check_text

from .dialects import Task
from .memory import ImageBudget, decode_cost
from .scheduler import Cost
from .pdfs import PdfRenderer
from .schema import ImageInput, ImageTextInput, PdfInput, TextInput

BYTES_PER_TOKEN = 4  # a rough mean for byte-level BPE over mixed scripts; a token is at least one byte
TEMPLATE_TOKENS = 12  # "**Document**:\n", "\n**Query**:\n" and the score token


class RequestTooLarge(InputError):
    """Over a per-request budget (answered 413)."""


class LoadTimeout(Exception):
    """The request's deadline passed while its images were loading."""


def doc_token_cap(settings) -> int:
    """Tokens the model reads of one document (prompt.py's max_doc_length as the reranker sets it)."""
    return max(settings.max_length - settings.max_query_length, settings.max_query_length)


def check_texts(task: Task, settings) -> None:
    """Counts and text limits, before anything is loaded (413, or 422 naming the input)."""
    sides = _distinct_sides(task)
    images = sum(isinstance(x, ImageInput) for x, _, _ in sides)
    if images > settings.max_images:
        raise RequestTooLarge(f"request has {images} images (query and documents), over the limit of "
                              f"{settings.max_images} per request (--max-images)")
    for x, where, is_query in sides:
        if isinstance(x, (TextInput, ImageTextInput)):
            where = f"{where}.text" if isinstance(x, ImageTextInput) else where
            if len(x.text) > settings.max_text_chars:
                raise RequestTooLarge(f"{where}: text is {len(x.text)} characters, over the limit of "
                                      f"{settings.max_text_chars} (--max-text-chars)")
            check_text(x.text, where, allow_empty=not is_query)  # e.g. no <|image_pad|> in text
    if task.max_chunks_per_doc is not None:
        task.chunk_overlap = check_windows(task.max_chunks_per_doc, task.chunk_overlap, doc_token_cap(settings))


def _distinct_sides(task: Task) -> list[tuple[Any, str, bool]]:
    """Each input once (a rerank's query is shared by its pairs): (input, where, is_query)."""
    seen: dict[int, tuple[Any, str, bool]] = {}
    for (q, d), (wq, wd) in zip(task.pairs, task.wheres):
        seen.setdefault(id(q), (q, wq, True))
        seen.setdefault(id(d), (d, wd, False))
    return list(seen.values())


class InputLoader:
    """Loads tasks' images on a thread pool, under the image memory budget, and prices their pairs."""

    def __init__(self, settings, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                 count_tokens=None, tokenizer=None, metrics=None):
        self.settings = settings
        self.bounds = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        self.count_tokens = count_tokens
        self.tokenizer = tokenizer  # the model's (prompt.Tokenizer), to cut long texts into windows
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(settings.image_threads, thread_name_prefix="m0lite-image")
        gauge = metrics.image_bytes_held.set if metrics is not None else None
        self.budget = ImageBudget(int(settings.image_memory_mb * 2**20), on_change=gauge)
        self.pdfs = PdfRenderer(settings.pdf_timeout)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pdfs.close()

    async def prepare(self, task: Task, deadline: float
                      ) -> tuple[list[tuple[Any, Any]], list[Cost], list[tuple[int, int] | None], list[tuple[int, dict]]]:
        """The pairs to score with images as model-sized PIL images, each pair's cost, the size (width,
        height) of each task pair's document image as sent (None for a text document), for explanations,
        and each pair scored's owner: (task pair index, part info as m0lite.documents.Part has it: {} for a
        whole document). A PDF document is rendered (in the worker process) into one pair per page; with
        max_chunks_per_doc, a text document is one pair per window, as Reranker.rank cuts it."""
        sides = _distinct_sides(task)
        pdfs = {id(x): (x, where) for x, where, _ in sides if isinstance(x, PdfInput)}
        rendered = dict(zip(pdfs, await self._run(
            [(self._pdf, x, where, task.pdf_text) for x, where in pdfs.values()], deadline))) if pdfs else {}
        pdf_pixels = sum(p.image.width * p.image.height for pages in rendered.values() for p in pages)
        if pdf_pixels > self.settings.max_request_pixels:
            raise RequestTooLarge(f"request's PDF pages have {pdf_pixels:,} pixels in all, over the limit of "
                                  f"{self.settings.max_request_pixels:,} per request (--max-request-pixels)")
        # Each distinct source once: a request repeating one image decodes it once.
        images: dict[str, str] = {}
        for x, where, _ in sides:
            if isinstance(x, ImageInput):
                images.setdefault(x.image, where)
        by_source: dict[str, Image.Image] = {}
        sizes: dict[str, tuple[int, int]] = {}
        if images:
            heads = await self._run([(self._head, src, where) for src, where in images.items()], deadline)
            pixels = sum(w * h for _, _, (w, h) in heads) + pdf_pixels
            if pixels > self.settings.max_request_pixels:
                raise RequestTooLarge(f"request's images and PDF pages have {pixels:,} pixels in all, over the limit of "
                                      f"{self.settings.max_request_pixels:,} per request (--max-request-pixels)")
            sizes = {src: size for src, (_, _, size) in zip(images, heads)}
            jobs = [(self._decode, data, name, where, size)
                    for (data, name, size), where in zip(heads, images.values())]
            del heads
            by_source = dict(zip(images, await self._run(jobs, deadline)))
        loaded = {id(x): by_source[x.image] for x, _, _ in sides if isinstance(x, ImageInput)}
        if not task.truncate:
            await self._refuse_cut(task, deadline)

        def side(x):
            if isinstance(x, ImageTextInput):
                return {"image": loaded[id(x)], "text": x.text}
            return loaded.get(id(x), x.text if isinstance(x, TextInput) else None)

        windows = await self._windows(task, sides, deadline)
        pairs, costs, owners = [], [], []
        for k, (q, d) in enumerate(task.pairs):
            if isinstance(d, PdfInput):
                docs = [({"image": p.image, "text": p.text} if task.pdf_text else p.image, {"page": p.number})
                        for p in rendered[id(d)]]
            elif id(d) in windows:
                docs = [(d.text[a:b], {"window": {"start": a, "end": b}}) for a, b in windows[id(d)]]
            else:
                docs = [(side(d), {})]
            for doc, info in docs:
                pairs.append((side(q), doc))
                costs.append(self._cost(*pairs[-1]))
                owners.append((k, info))
        tokens = sum(c.tokens for c in costs)
        if tokens > self.settings.max_request_tokens:
            raise RequestTooLarge(f"request needs about {tokens:,} prompt tokens over its {len(pairs)} pairs "
                                  f"(text counted at {BYTES_PER_TOKEN} bytes a token, each prompt cut at "
                                  f"{self.settings.max_length}), over the limit of "
                                  f"{self.settings.max_request_tokens:,} (--max-request-tokens)")
        return pairs, costs, [sizes.get(d.image) if isinstance(d, ImageInput) else None for _, d in task.pairs], owners

    async def _windows(self, task: Task, sides, deadline: float) -> dict[int, list[tuple[int, int]]]:
        """With max_chunks_per_doc, each text document's windows (character spans), by id: the whole text
        for one shorter in bytes than the document budget in tokens (it cannot be cut), else
        documents.split_text's, tokenized on the pool."""
        if task.max_chunks_per_doc is None:
            return {}
        cap = doc_token_cap(self.settings)
        texts = {id(x): x.text for x, _, is_query in sides if isinstance(x, TextInput) and not is_query}
        windows = {k: [(0, len(text))] for k, text in texts.items()}
        long = [k for k, text in texts.items() if len(text.encode()) >= cap]
        if long and self.tokenizer is None:
            raise InputError("max_chunks_per_doc: this server's model has no tokenizer to cut texts into windows")
        spans = await self._run([(split_text, self.tokenizer, texts[k], cap, task.max_chunks_per_doc,
                                  task.chunk_overlap) for k in long], deadline) if long else []
        windows.update(zip(long, spans))
        return windows

    def _pdf(self, x: PdfInput, where: str, with_text: bool) -> list:
        """Fetch or base64-decode one PDF and render its pages in the worker process (pool thread)."""
        s = self.settings
        with _naming_pdf(where):
            source = parse_image_source(x.pdf, allow_paths=False, max_bytes=s.max_pdf_bytes, noun="PDF",
                                        recognise=is_pdf_header)
            data = source.value if source.kind == "bytes" else fetch(
                source.value, source.name, timeout=s.image_timeout, max_bytes=s.max_pdf_bytes,
                allow_private_urls=s.allow_private_urls)
            if not is_pdf_header(data):
                raise PdfError(f"{source.name}: not a PDF (no %PDF- header in its first 1024 bytes)")
            pages = self.pdfs.render(data, source.name, x.pages, max_pages=s.max_pdf_pages,
                                     max_render_pixels=s.max_image_pixels, with_text=with_text, **self.bounds)
            for p in pages if with_text else []:
                check_text(p.text, f"page {p.number} text", allow_empty=True)
        return pages

    async def _run(self, jobs: list[tuple], deadline: float) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.pool, fn, *args) for fn, *args in jobs]
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise LoadTimeout() from None
        finally:
            for f in futures:
                f.cancel()  # no-op for finished ones; frees the pool of the others

    def _head(self, src: str, where: str) -> tuple[bytes, str, tuple[int, int]]:
        """Fetch or base64-decode one image and read its size from the header (pool thread)."""
        s = self.settings
        with _naming(where):
            source = parse_image_source(src, allow_paths=False, max_bytes=s.max_image_bytes)
            data = source.value if source.kind == "bytes" else fetch(
                source.value, source.name, timeout=s.image_timeout, max_bytes=s.max_image_bytes,
                allow_private_urls=s.allow_private_urls)
            w, h = image_size(data, source.name, s.max_image_pixels)
            smart_resize(h, w, **self.bounds)  # refuses what the model cannot take (aspect ratio > 200)
            return data, source.name, (w, h)

    def _decode(self, data: bytes, name: str, where: str, size: tuple[int, int]) -> Image.Image:
        """Decode one image under the memory budget and keep it at the model's resolution (pool thread)."""
        with _naming(where), self.budget.hold(decode_cost(*size)):
            image = decode(data, name, self.settings.max_image_pixels)
            del data
            small = resize_for_model(image, **self.bounds)
            del image
        if self.metrics is not None:
            self.metrics.images.inc()
            self.metrics.image_pixels.inc(size[0] * size[1])
        return small

    async def _refuse_cut(self, task: Task, deadline: float) -> None:
        """truncate=false (TEI): a document of max_doc_length tokens or more would be cut; refuse it.
        Only a text of at least that many bytes can be that long, so only those are counted."""
        cap = doc_token_cap(self.settings)
        long = [(d.text, wd) for (_, d), (_, wd) in zip(task.pairs, task.wheres)
                if isinstance(d, TextInput) and len(d.text.encode()) >= cap]
        if not long or self.count_tokens is None:
            return
        counts = await self._run([(self.count_tokens, text) for text, _ in long], deadline)
        for (_, where), n in zip(long, counts):
            if n >= cap:
                raise RequestTooLarge(f"{where}: {n} tokens, over the {cap - 1} the model reads of a document "
                                      f"whole; send truncate=true to have it cut")

    def _cost(self, q, d) -> Cost:
        cap = doc_token_cap(self.settings)
        tokens, patches = TEMPLATE_TOKENS, 0
        for side, side_cap in ((q, None), (d, cap)):
            for part in (side["image"], side["text"]) if isinstance(side, dict) else (side,):  # an image and its text
                if isinstance(part, Image.Image):
                    n = (part.height // PATCH_SIZE) * (part.width // PATCH_SIZE)
                    patches += n
                    tokens += n // 4
                else:
                    n = math.ceil(len(part.encode()) / BYTES_PER_TOKEN)
                    tokens += min(n, side_cap) if side_cap else n
        return Cost(min(tokens, self.settings.max_length), patches)


class _naming:
    """Errors raised while loading one image name it ("documents[3]: ...")."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        if isinstance(exc, ImageTooLargeError):
            # The loader's limits are the server's flags: name the flag that refused the image.
            msg = str(exc).replace("(decompression-bomb guard)", "(--max-image-pixels)")
            if msg == str(exc) and "bytes" in msg:
                msg += " (--max-image-bytes)"
            raise ImageTooLargeError(f"{self.where}: {msg}") from None
        if isinstance(exc, M0liteError):
            raise ImageError(f"{self.where}: {exc}") from None
        return False


class _naming_pdf(_naming):
    """Errors raised while loading one PDF name it, and the flag of a limit it is over (413)."""

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, M0liteError):
            return False
        msg = str(exc).replace("(max_pdf_pages)", "(--max-pdf-pages)")
        msg = msg.replace("(decompression-bomb guard)", "(--max-image-pixels)")
        if isinstance(exc, (ImageTooLargeError, PdfTooLargeError)):
            if "bytes" in msg and "--max" not in msg:
                msg += " (--max-pdf-bytes)"
            raise PdfTooLargeError(f"{self.where}: {msg}") from None
        raise PdfError(f"{self.where}: {msg}") from None
