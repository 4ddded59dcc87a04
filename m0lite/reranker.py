"""The public API: `Reranker.from_pretrained(...)`, `compute_score(...)`, `rank(...)`.

A pair goes: inputs (text, or an image loaded and cut into patches) -> prompt
token ids (prompt.py) -> sequences grouped into ragged batches under a token
budget (batching.py), document prefixes and visual tokens looked up in their
caches (caches.py) -> model -> raw score -> optionally sigmoid(raw - 2.65).
Ragged batches have no padding, so each pair's score is independent of its
batch, of batch_size and of order.

The model's faster forms (m0lite/transforms) are chosen here, once, from the
options `pack_weights`, `quantize` and `compile`.
"""

from __future__ import annotations

import math
import warnings
from itertools import chain
from pathlib import Path

import torch

from . import cpu, transforms
from .batching import Prepared, Prefix, budget_groups, ragged, sequence
from .caches import TensorLRU, through_cache
from .documents import Part, best_parts, check_windows, in_passes, is_pdf, result_fields, split_text
from .errors import InputError, PdfError, WeightsError
from .images import MAX_PIXELS, MIN_PIXELS, load_image, num_visual_tokens, preprocess
from .images.preprocess import FACTOR
from .memory import trim_heap
from .model import JinaReranker
from .prompt import Side, Tokenizer, build_prompt, check_text, default_max_doc_length
from .transforms import int8
from .transforms.fast_forms import FastForms

SCORE_SHIFT = 2.65  # the published normalised score is sigmoid(raw - 2.65)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class EmulatedBF16Warning(UserWarning):
    """bf16 asked for on a CPU that has no bf16 matmul instructions: it runs, far slower than fp32."""


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None picks bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere. bf16 asked for on a CPU that
    emulates it runs, with an EmulatedBF16Warning (every interface loads through here)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" or cpu.native_bf16() else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        resolved = dtype
    elif isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        resolved = DTYPES[dtype.lower().removeprefix("torch.")]
    else:
        raise InputError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    if resolved == torch.bfloat16 and device.type == "cpu" and not cpu.native_bf16():
        warnings.warn(
            f"{resolved} asked for on a CPU without native bf16 ({' or '.join(cpu.NATIVE_BF16)} missing: "
            f"{cpu.describe()}): its matmuls are emulated here, tens of times slower than float32. Use float32 "
            "(the default on this CPU: same scores, exact), or quantize='int8' (--quantize int8) for the lean "
            "mode's speed and memory.", EmulatedBF16Warning, stacklevel=3)
    return resolved


def resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def rank_order(scores: list[float]) -> list[int]:
    """Indices of `scores` best first; ties keep their input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


class Reranker:
    def __init__(self, model: JinaReranker, tokenizer: Tokenizer, *, name: str = "jina-reranker-m0",
                 min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, max_batch_tokens: int = 16384,
                 max_vision_patches: int = 4096, vision_cache_bytes: int = 256 * 2**20, doc_cache_bytes: int = 0,
                 pack_weights: bool | None = None, int8_compute: str | None = None,
                 max_pdf_pages: int | None = None, max_pdf_bytes: int | None = None):
        """vision_cache_bytes bounds the cache of images' visual tokens; doc_cache_bytes (0: off) the
        cache of documents' keys and values (about 28 KiB per token for the 2B model in bf16).
        pack_weights (the CPU fast path for bf16) and int8_compute ("dynamic" or "weight-only"; see
        from_pretrained's `quantize`: the lean mode) choose the towers' fast forms: `self.fast`, a
        transforms.FastForms, says when each tower takes its own. max_pdf_pages and max_pdf_bytes bound a PDF document
        (pages to render, file size; None: m0lite.pdf's MAX_PDF_PAGES, MAX_PDF_BYTES), checked before
        any page is rendered."""
        from .pdf import MAX_PDF_BYTES, MAX_PDF_PAGES

        self.max_pdf_pages = MAX_PDF_PAGES if max_pdf_pages is None else max_pdf_pages
        self.max_pdf_bytes = MAX_PDF_BYTES if max_pdf_bytes is None else max_pdf_bytes
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_batch_tokens = max_batch_tokens  # tokens per forward pass (bounds activation memory)
        self.max_vision_patches = max_vision_patches  # patches per vision-tower pass
        self.vision_cache = TensorLRU(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.doc_cache = TensorLRU(doc_cache_bytes) if doc_cache_bytes > 0 else None
        self.fast = FastForms(model, pack_weights=pack_weights, int8_compute=int8_compute)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device="cpu", dtype=None, *, compile: bool = False,
                        quantize: str | None = None, int8_compute: str = "auto", **kwargs) -> "Reranker":
        """Load from a local checkpoint folder or a hub repo id (downloaded once, then cached).
        compile=True (CPU only): torch.compile the blocks; faster images, a slower first call.
        quantize="int8": int8 weights in every linear of both towers, a lossy mode (see
        transforms/int8.py and README); a checkpoint written by `m0lite quantize` loads as int8
        without it. int8_compute: "auto" (int8 x int8 on x86 CPUs with AVX2 or more, else weight-only),
        "dynamic" or "weight-only"."""
        from .weights.hub import resolve
        from .weights.loader import load_model

        dev = resolve_device(device)
        if compile and dev.type != "cpu":
            raise InputError("compile=True is for the CPU path; on CUDA the Triton kernels already fuse attention and norms")
        if quantize not in (None, "int8"):
            raise InputError(f"quantize must be None or 'int8', got {quantize!r}")
        folder = resolve(name_or_path)
        model = load_model(folder, resolve_dtype(dtype, dev), dev, quantize=bool(quantize))
        if quantize or int8.is_quantized(model):
            if compile:
                raise InputError("compile=True does not take an int8 model; choose one")
            kwargs["int8_compute"] = int8.resolve_compute(int8_compute, dev)
        if compile:
            # Compiled graphs fuse the elementwise work themselves and cannot take packed (opaque) weights.
            if kwargs.get("pack_weights"):
                raise InputError("compile=True and pack_weights=True do not go together; choose one")
            kwargs["pack_weights"] = False
            transforms.compile_blocks(model)
        tokenizer = Tokenizer(folder / "tokenizer.json")
        if tokenizer.image_pad_id != model.cfg.image_token_id:  # prompts are written with one, the model reads the other
            raise WeightsError(f"{folder}: tokenizer.json's <|image_pad|> is id {tokenizer.image_pad_id}, config.json's "
                               f"image_token_id is {model.cfg.image_token_id}: they come from different checkpoints")
        rr = cls(model, tokenizer, name=str(name_or_path), **kwargs)
        trim_heap()  # what parsing the tokenizer and the config left free
        return rr

    @property
    def quantized(self) -> bool:
        """Whether the model runs in the lean mode (int8)."""
        return self.fast.quantized

    @property
    def int8_compute(self) -> str | None:
        """How the lean mode multiplies ("dynamic" or "weight-only"); None in the exact mode."""
        return self.fast.int8_compute

    @property
    def packed(self) -> list[str]:
        """Which towers ("decoder", "vision") run in their fast form so far: on packed weights (see
        pack_weights), or in the lean mode on prepared int8 weights."""
        return self.fast.packed

    def pack(self, towers=("decoder", "vision")) -> list[str]:
        """Put these towers in their fast form now, where there is one (bf16 on CPU with pack_weights not
        False, or the lean mode): a server packs the decoder at start rather than in its first large
        request. Returns `packed`."""
        return self.fast.pack(towers)

    # ---- inputs -------------------------------------------------------------------------------

    def prepare(self, x, kind: str | None, what: str, document: bool) -> Prepared:
        """A query or document -> text or preprocessed image, or (a document only) an image and its text,
        given as {"image": ..., "text": ...}. kind "text"/"image" forces the reading of a str
        (compute_score's query_type/doc_type); with kind None a str is text."""
        if isinstance(x, dict):
            if set(x) == {"text"}:
                x, kind = x["text"], "text"
            elif set(x) == {"image"}:
                x, kind = x["image"], "image"
            elif set(x) == {"image", "text"} and document:
                text = check_text(x["text"], f"{what}.text", allow_empty=True)
                pixels, grid, size = self._load(x["image"], f"{what}.image")
                return Prepared(Side(text=text, grid=grid), pixels, size)
            else:
                both = ", {'image': ..., 'text': ...}" if document else ""
                raise InputError(f"{what}: a dict must be {{'text': ...}} or {{'image': ...}}{both}, got keys {sorted(map(str, x))}")
        elif kind is None:
            kind = "text" if isinstance(x, str) else "image"
        if kind == "text":
            return Prepared(Side(text=check_text(x, what, allow_empty=document)))
        if kind != "image":
            raise InputError(f"{what}: type must be 'text' or 'image', got {kind!r}")
        pixels, grid, size = self._load(x, what)
        return Prepared(Side(grid=grid), pixels, size)

    def _parts(self, index: int, query: Prepared, doc, kind: str | None, what: str, *, pdf_text: bool,
               max_chunks_per_doc: int | None, chunk_overlap: int, max_doc_length: int):
        """The parts document `doc` is scored in (documents.py): a PDF's pages, opened and counted now and
        rendered as they are iterated; a long text's windows; else the document itself. All but a PDF's
        pages are prepared now, so that a bad document fails before anything is scored."""
        if is_pdf(doc):
            return self._pdf_parts(index, query, doc, what, pdf_text)
        text = doc if isinstance(doc, str) and kind in (None, "text") else (
            doc["text"] if isinstance(doc, dict) and set(doc) == {"text"} else None)
        if max_chunks_per_doc is None or text is None:
            return [Part(index, (query, self.prepare(doc, kind, what, document=True)))]
        check_text(text, what, allow_empty=True)
        spans = split_text(self.tokenizer, text, max_doc_length, max_chunks_per_doc, chunk_overlap)
        return [Part(index, (query, Prepared(Side(text=text[a:b]))), {"window": {"start": a, "end": b}})
                for a, b in spans]

    def _pdf_parts(self, index: int, query: Prepared, doc: dict, what: str, pdf_text: bool):
        from .pdf import read_pdf, render_pages

        if set(doc) - {"pdf", "pages"}:
            raise InputError(f"{what}: a PDF document is {{'pdf': src, 'pages': '1-20' (optional)}}, got keys {sorted(doc)}")
        try:
            data, name = read_pdf(doc["pdf"], max_bytes=self.max_pdf_bytes)
            pages = render_pages(data, name, doc.get("pages"), max_pages=self.max_pdf_pages, min_pixels=self.min_pixels,
                                 max_pixels=self.max_pixels, with_text=pdf_text)
        except PdfError as e:
            raise type(e)(f"{what}: {e}") from None
        del data

        def part(page) -> Part:
            where = f"{what} page {page.number}"
            pixels, grid, size = self._load(page.image, where)
            text = check_text(page.text, f"{where} text", allow_empty=True) if pdf_text else None
            return Part(index, (query, Prepared(Side(text=text, grid=grid), pixels, size)), {"page": page.number}, True)

        def parts():
            # Each part is made by a call, so that this generator, suspended, holds no page's patches: a pass's
            # pages are let go as soon as the pass is scored (documents.in_passes).
            try:
                for page in pages:
                    yield part(page)
            except PdfError as e:
                raise type(e)(f"{what}: {e}") from None
            finally:
                pages.close()
        return parts()

    def _pages_per_pass(self) -> int:
        """PDF pages rendered and held at a time: about one decoder pass of full-budget pages."""
        return max(1, self.max_batch_tokens // max(1, self.max_pixels // (FACTOR * FACTOR)))

    def _load(self, src, what: str) -> tuple[torch.Tensor, tuple[int, int, int], tuple[int, int]]:
        """An image source's patches, grid and decoded (width, height); errors name `what`."""
        try:
            image = load_image(src)
            pixels, grid = preprocess(image, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except InputError as e:
            raise type(e)(f"{what}: {e}") from None
        # The vision tower casts its input to the model's dtype first: casting now gives the same visual
        # tokens and halves what a bf16 model holds of each image until its pass (3 MiB a megapixel).
        return pixels.to(self.model.dtype), grid, image.size

    # ---- scoring ------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[Prepared, Prepared]], *, batch_size: int, max_length: int, max_doc_length: int,
               show_progress: bool = False) -> tuple[list[float], list[int]]:
        """Raw scores and prompt lengths of prepared pairs, in order."""
        if max_length < 2:
            raise InputError(f"max_length must be at least 2, got {max_length}")
        cfg = self.model.cfg
        merge = cfg.vision.spatial_merge_size
        use_doc_cache = self.doc_cache is not None
        prompts = [build_prompt(self.tokenizer, q.side, d.side, max_length=max_length, max_doc_length=max_doc_length,
                                merge=merge, split_prefix=use_doc_cache) for q, d in pairs]
        images = [[i for i in (d, q) if i.pixels is not None] for q, d in pairs]  # document first, as in the prompt
        scores: list[float] = [math.nan] * len(pairs)
        # Every pass reads all the weights once, so few large passes beat many small ones (most of all
        # when cached documents leave only the queries' tokens to run).
        batches = list(budget_groups([len(p.input_ids) for p in prompts], batch_size, self.max_batch_tokens))
        if show_progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="scoring", unit="batch")
        for idx in batches:
            seqs = [sequence(prompts[i], images[i], pairs[i][1].pixels is not None, cfg.image_token_id, merge)
                    for i in idx]
            past = self._prefixes([s.prefix for s in seqs]) if use_doc_cache else None
            batch = ragged(seqs)
            self.fast.before_pass(self.model.model, batch.input_ids.numel())
            for i, score in zip(idx, self.model(batch, image_embeds=self.visual_tokens([im for s in seqs for im in s.images]), past=past).tolist()):
                scores[i] = score
        return scores, [len(p.input_ids) for p in prompts]

    def _score_parts(self, parts, n_docs: int, **kwargs) -> list[list[tuple[float, dict, int]]]:
        """Each document's scored parts, (raw score, part info, prompt length) in part order. PDF pages are
        rendered, scored and let go in groups (documents.in_passes), so that a long PDF is never held whole;
        without PDFs all parts go to `_score` at once. `parts` must hold no part it has handed out (so
        itertools.chain, not a generator expression, which keeps the last), or a pass's last page outlives it."""
        out: list[list[tuple[float, dict, int]]] = [[] for _ in range(n_docs)]
        for group in in_passes(parts, self._pages_per_pass()):
            raw, lengths = self._score([p.pair for p in group], **kwargs)
            for p, r, n in zip(group, raw, lengths):
                out[p.doc].append((r, p.info, n))
            if any(p.is_page for p in group):
                del group, p
                trim_heap()  # hand the pass's pages back to the system before the next pass renders its own
        return out

    def _document_options(self, pdf_text, max_chunks_per_doc, chunk_overlap, max_doc_length) -> dict:
        if not isinstance(pdf_text, bool):
            raise InputError(f"pdf_text must be True or False, got {pdf_text!r}")
        chunk_overlap = check_windows(max_chunks_per_doc, chunk_overlap, max_doc_length)
        return {"pdf_text": pdf_text, "max_chunks_per_doc": max_chunks_per_doc, "chunk_overlap": chunk_overlap,
                "max_doc_length": max_doc_length}

    def visual_tokens(self, images: list[Prepared]) -> torch.Tensor | None:
        """Visual tokens of the images, in order: from the cache, else encoded (each distinct image once)."""
        if not images:
            return None
        return torch.cat(through_cache(images, lambda im: im.key, self.vision_cache, self._encode))

    def _encode(self, images: list[Prepared]) -> list[torch.Tensor]:
        """Each image's visual tokens, images grouped up to max_vision_patches per tower pass (a larger image
        goes alone): each image attends only to itself, so grouping changes no result, and on CPU smaller
        passes keep the (patches, 5120) activations in cache."""
        merge, out = self.model.cfg.vision.spatial_merge_size, []
        for idx in budget_groups([im.pixels.shape[0] for im in images], len(images), self.max_vision_patches):
            group = [images[i] for i in idx]
            self.fast.before_pass(self.model.visual, sum(im.pixels.shape[0] for im in group))
            tokens = self.model.visual(torch.cat([im.pixels for im in group]).to(self.model.device), [im.side.grid for im in group])
            out += tokens.split([num_visual_tokens(im.side.grid, merge) for im in group])
        return out

    def _prefixes(self, prefixes: list[Prefix | None]) -> list[torch.Tensor]:
        """Keys/values of each pair's document prefix (an empty one where there is none), from the cache
        or computed in one ragged pass (each distinct document once)."""
        def prefill(todo: list[Prefix]) -> list[torch.Tensor]:
            batch = ragged(todo)
            self.fast.before_pass(self.model.model, batch.input_ids.numel())
            return self.model.prefill(batch, self.visual_tokens([im for p in todo for im in p.images]))

        known = [p for p in prefixes if p is not None]
        kv = iter(through_cache(known, lambda p: p.key, self.doc_cache, prefill))
        cfg = self.model.cfg.text
        empty = torch.empty(cfg.num_hidden_layers, 2, 0, cfg.num_key_value_heads, cfg.head_dim, dtype=self.model.dtype, device=self.model.device)
        return [next(kv) if p is not None else empty for p in prefixes]

    @staticmethod
    def normalize(raw: float) -> float:
        return 1.0 / (1.0 + math.exp(-(raw - SCORE_SHIFT)))

    def compute_score(self, pairs, batch_size: int = 8, max_length: int = 10240, max_query_length: int = 512,
                      max_doc_length: int | None = None, query_type: str = "text", doc_type: str = "text",
                      normalize_scores: bool = True, show_progress: bool = False, *, pdf_text: bool = False,
                      max_chunks_per_doc: int | None = None, chunk_overlap: int | None = None):
        """Scores of [query, document] pairs, as the original's compute_score: one pair (a 2-list or
        2-tuple of inputs) returns a float, a list of pairs a list. A document may also be a PDF,
        {"pdf": src, "pages": "1-20"}, scored as its best page (see `rank` for pdf_text and the windows
        of max_chunks_per_doc)."""
        single = isinstance(pairs, (list, tuple)) and len(pairs) == 2 and not isinstance(pairs[0], (list, tuple))
        pairs = [pairs] if single else pairs
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise InputError("pairs must be a non-empty list of [query, document] pairs")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_doc_length is None:
            max_doc_length = default_max_doc_length(max_length, max_query_length)
        elif max_doc_length + max_query_length > max_length:
            raise InputError(f"max_doc_length ({max_doc_length}) + max_query_length ({max_query_length}) exceeds max_length ({max_length})")
        options = self._document_options(pdf_text, max_chunks_per_doc, chunk_overlap, max_doc_length)
        streams = []
        for i, p in enumerate(pairs):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise InputError(f"pairs[{i}] must be a [query, document] pair")
            q = self.prepare(p[0], query_type, f"pairs[{i}] query", document=False)
            streams.append(self._parts(i, q, p[1], doc_type, f"pairs[{i}] document", **options))
        scored = self._score_parts(chain.from_iterable(streams), len(pairs), batch_size=batch_size,
                                   max_length=max_length, max_doc_length=max_doc_length, show_progress=show_progress)
        raw = [max(r for r, _, _ in parts) for parts in scored]
        scores = [self.normalize(s) for s in raw] if normalize_scores else raw
        return scores[0] if single else scores

    def score_pairs(self, pairs, normalize: bool = True, *, max_length: int = 10240, max_query_length: int = 512,
                    batch_size: int = 32, pdf_text: bool = False, max_chunks_per_doc: int | None = None,
                    chunk_overlap: int | None = None, details: bool = False) -> tuple[list, list[int]]:
        """Scores and prompt token counts of (query, document) pairs whose sides may each be text or
        image (str = text; PIL image, {"text": ...} or {"image": ...}), a document also both ({"image": ...,
        "text": ...}) or a PDF ({"pdf": ...}). For servers batching many requests. A document scored in parts
        (a PDF's pages, a long text's windows) scores as its best part and counts the tokens of all; with
        `details`, each score is (score, [(part score, part info), ...] best first) instead."""
        max_doc_length = default_max_doc_length(max_length, max_query_length)
        options = self._document_options(pdf_text, max_chunks_per_doc, chunk_overlap, max_doc_length)
        streams = [self._parts(i, self.prepare(q, None, f"pairs[{i}] query", document=False), d, None,
                               f"pairs[{i}] document", **options) for i, (q, d) in enumerate(pairs)]
        scored = self._score_parts(chain.from_iterable(streams), len(pairs), batch_size=batch_size,
                                   max_length=max_length, max_doc_length=max_doc_length)
        norm = self.normalize if normalize else (lambda r: r)
        lengths = [sum(n for _, _, n in parts) for parts in scored]
        if details:
            out = []
            for parts in scored:
                ordered = best_parts([(norm(r), info) for r, info, _ in parts])
                out.append((ordered[0][0], ordered))
            return out, lengths
        return [norm(max(r for r, _, _ in parts)) for parts in scored], lengths

    def rank(self, query, documents, top_n: int | None = None, return_documents: bool = False, *,
             batch_size: int = 32, max_length: int = 10240, max_query_length: int = 512, show_progress: bool = False,
             pdf_text: bool = False, pages_as_documents: bool = False, max_chunks_per_doc: int | None = None,
             chunk_overlap: int | None = None) -> list[dict]:
        """Documents (texts, images, {"image": ..., "text": ...} pairs of both, and PDFs, mixed) ranked for a
        text or image query, best first: [{"index": i, "relevance_score": s, ("document": d)}].

        A PDF, {"pdf": path | URL | base64 | data URI, "pages": "1-20" (optional)}, is scored page by page
        (each page as the image document of its rendered pixels; with pdf_text=True as the image and the
        page's extracted text) and scores as its best page; its result carries "pages": its best pages,
        [{"page": n, "relevance_score": s}, ...] (1-based, best first). pages_as_documents=True ranks the
        pages themselves: each page is a result, {"index": i, "page": n, "relevance_score": s}.
        max_chunks_per_doc=k scores a text longer than the document budget as up to k windows of that budget,
        consecutive windows sharing chunk_overlap tokens (None: 128, at most a quarter of a window); the text scores as its best window, and its result
        says which, "window": {"start": s, "end": e} (character offsets). None keeps the one truncated text."""
        if not isinstance(documents, (list, tuple)) or not documents:
            raise InputError("documents must be a non-empty list")
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise InputError(f"top_n must be a positive int, got {top_n!r}")
        if not isinstance(pages_as_documents, bool):
            raise InputError(f"pages_as_documents must be True or False, got {pages_as_documents!r}")
        max_doc_length = default_max_doc_length(max_length, max_query_length)
        options = self._document_options(pdf_text, max_chunks_per_doc, chunk_overlap, max_doc_length)
        q = self.prepare(query, None, "query", document=False)
        streams = [self._parts(i, q, d, None, f"documents[{i}]", **options) for i, d in enumerate(documents)]
        scored = self._score_parts(chain.from_iterable(streams), len(documents), batch_size=batch_size,
                                   max_length=max_length, max_doc_length=max_doc_length, show_progress=show_progress)
        if pages_as_documents:  # every part is a result
            entries = [(i, self.normalize(r), info) for i, parts in enumerate(scored) for r, info, _ in parts]
        else:
            entries = []
            for i, parts in enumerate(scored):
                ordered = best_parts([(self.normalize(r), info) for r, info, _ in parts])
                entries.append((i, ordered[0][0], result_fields(ordered)))
        results = [{"index": entries[k][0], "relevance_score": entries[k][1], **entries[k][2]}
                   for k in rank_order([e[1] for e in entries])[:top_n]]
        if return_documents:
            for r in results:
                r["document"] = documents[r["index"]]
        return results

    def explain(self, query, document, method: str = "occlusion", *, max_length: int = 10240,
                max_query_length: int = 512) -> dict:
        """Why `document` scores as it does for `query`: the raw and normalised score, and an attribution
        per document text token (with its character offsets) and per image region (with its box in the
        original image). method "occlusion": the score lost when that part is removed (one pass per
        part); "attention": the score token's attention on it (one pass); "contribution": the derivative of
        the score with respect to the score token's attention on it (one pass, then the score token's
        forward and backward; needs a decoder neither packed nor int8). See m0lite/explain.py."""
        from .explain import explain

        return explain(self, query, document, method, max_length=max_length, max_query_length=max_query_length)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))
