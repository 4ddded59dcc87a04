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
from pathlib import Path

import torch

from . import cpu, transforms
from .batching import Prepared, Prefix, budget_groups, ragged, sequence
from .caches import TensorLRU, through_cache
from .errors import InputError
from .images import MAX_PIXELS, MIN_PIXELS, load_image, num_visual_tokens, preprocess
from .memory import trim_heap
from .model import JinaReranker
from .prompt import Side, Tokenizer, build_prompt, check_text, default_max_doc_length
from .transforms import int8

# Packing a tower's weights (transforms.pack_weights) costs a one-time copy of its weights and makes every
# later pass faster (bench/RESULTS.md has both). So, as one rents skis until the rent would have bought them,
# a tower is packed once it has run this many rows (tokens or patches) in all: a short-lived process scoring a
# few pairs never pays for it, a server pays it once.
PACK_AFTER_ROWS = 4096
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
                 pack_weights: bool | None = None, int8_compute: str | None = None):
        """vision_cache_bytes bounds the cache of images' visual tokens; doc_cache_bytes (0: off) the
        cache of documents' keys and values (about 28 KiB per token for the 2B model in bf16).
        pack_weights: the CPU fast path for bf16 (transforms.pack_weights): None packs each tower once
        it has run PACK_AFTER_ROWS rows, True at once, False never. int8_compute ("dynamic" or
        "weight-only"; see from_pretrained's `quantize`): the lean mode, which puts each tower in its int8
        form before its first pass (the decoder at once), so that a text-only process never reads the
        vision tower's weights; it takes no packing."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_batch_tokens = max_batch_tokens  # tokens per forward pass (bounds activation memory)
        self.max_vision_patches = max_vision_patches  # patches per vision-tower pass
        self.vision_cache = TensorLRU(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.doc_cache = TensorLRU(doc_cache_bytes) if doc_cache_bytes > 0 else None
        self.int8_compute = int8_compute
        self.quantized = int8_compute is not None
        can_pack = transforms.packable(model.device, model.dtype) and not self.quantized
        if pack_weights and not can_pack:
            why = "an int8 model" if self.quantized else f"{model.dtype} on {model.device}"
            raise InputError(f"pack_weights=True needs bf16 on a CPU with native bf16, not {why}")
        self._packing = self.quantized or (can_pack and pack_weights is not False)
        self._rows_run = {model.model: 0, model.visual: 0}  # per tower not yet in its fast form, the rows it has run
        if pack_weights or self.quantized:
            self.pack(["decoder", "vision"] if pack_weights else ["decoder"])

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
        rr = cls(model, Tokenizer(folder / "tokenizer.json"), name=str(name_or_path), **kwargs)
        trim_heap()  # what parsing the tokenizer and the config left free
        return rr

    def _towers(self) -> dict[str, torch.nn.Module]:
        return {"decoder": self.model.model, "vision": self.model.visual}

    @property
    def packed(self) -> list[str]:
        """Which towers ("decoder", "vision") run in their fast form so far: on packed weights (see
        pack_weights), or in the lean mode on prepared int8 weights."""
        return [name for name, t in self._towers().items() if self._packing and t not in self._rows_run]

    def pack(self, towers=("decoder", "vision")) -> list[str]:
        """Put these towers in their fast form now, where there is one (bf16 on CPU with pack_weights not
        False, or the lean mode): a server packs the decoder at start rather than in its first large
        request. Returns `packed`."""
        for name in towers if self._packing else []:
            self._pack(self._towers()[name])
        return self.packed

    def _pack(self, tower: torch.nn.Module) -> None:
        if tower in self._rows_run:
            if self.quantized:
                int8.prepare(tower, self.int8_compute)
            else:
                transforms.pack_weights(tower)
            del self._rows_run[tower]
            trim_heap()  # the packing's temporaries (a layer's weights side by side, reordered copies)

    def _before_pass(self, tower: torch.nn.Module, rows: int) -> None:
        """Before a pass of `rows` rows through a tower: put it in its fast form once it has run enough (see
        PACK_AFTER_ROWS), or, in the lean mode, before its first pass."""
        if not self._packing or tower not in self._rows_run:
            return
        self._rows_run[tower] += rows
        if self.quantized or self._rows_run[tower] >= PACK_AFTER_ROWS:
            self._pack(tower)

    # ---- inputs -------------------------------------------------------------------------------

    def _prepare(self, x, kind: str | None, what: str, document: bool) -> Prepared:
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
                pixels, grid = self._load(x["image"], f"{what}.image")
                return Prepared(Side(text=text, grid=grid), pixels)
            else:
                both = ", {'image': ..., 'text': ...}" if document else ""
                raise InputError(f"{what}: a dict must be {{'text': ...}} or {{'image': ...}}{both}, got keys {sorted(x)}")
        elif kind is None:
            kind = "text" if isinstance(x, str) else "image"
        if kind == "text":
            return Prepared(Side(text=check_text(x, what, allow_empty=document)))
        if kind != "image":
            raise InputError(f"{what}: type must be 'text' or 'image', got {kind!r}")
        pixels, grid = self._load(x, what)
        return Prepared(Side(grid=grid), pixels)

    def _load(self, src, what: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """An image source's patches and grid; errors name `what`."""
        try:
            pixels, grid = preprocess(load_image(src), min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except InputError as e:
            raise type(e)(f"{what}: {e}") from None
        # The vision tower casts its input to the model's dtype first: casting now gives the same visual
        # tokens and halves what a bf16 model holds of each image until its pass (3 MiB a megapixel).
        return pixels.to(self.model.dtype), grid

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
            self._before_pass(self.model.model, batch.input_ids.numel())
            for i, score in zip(idx, self.model(batch, self._visual_tokens([im for s in seqs for im in s.images]), past).tolist()):
                scores[i] = score
        return scores, [len(p.input_ids) for p in prompts]

    def _visual_tokens(self, images: list[Prepared]) -> torch.Tensor | None:
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
            self._before_pass(self.model.visual, sum(im.pixels.shape[0] for im in group))
            tokens = self.model.visual(torch.cat([im.pixels for im in group]).to(self.model.device), [im.side.grid for im in group])
            out += tokens.split([num_visual_tokens(im.side.grid, merge) for im in group])
        return out

    def _prefixes(self, prefixes: list[Prefix | None]) -> list[torch.Tensor]:
        """Keys/values of each pair's document prefix (an empty one where there is none), from the cache
        or computed in one ragged pass (each distinct document once)."""
        def prefill(todo: list[Prefix]) -> list[torch.Tensor]:
            batch = ragged(todo)
            self._before_pass(self.model.model, batch.input_ids.numel())
            return self.model.prefill(batch, self._visual_tokens([im for p in todo for im in p.images]))

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
                      normalize_scores: bool = True, show_progress: bool = False):
        """Scores of [query, document] pairs, as the original's compute_score: one pair (a 2-list or
        2-tuple of inputs) returns a float, a list of pairs a list."""
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
        prepared = []
        for i, p in enumerate(pairs):
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise InputError(f"pairs[{i}] must be a [query, document] pair")
            prepared.append((self._prepare(p[0], query_type, f"pairs[{i}] query", document=False),
                             self._prepare(p[1], doc_type, f"pairs[{i}] document", document=True)))
        raw, _ = self._score(prepared, batch_size=batch_size, max_length=max_length, max_doc_length=max_doc_length,
                             show_progress=show_progress)
        scores = [self.normalize(s) for s in raw] if normalize_scores else raw
        return scores[0] if single else scores

    def score_pairs(self, pairs, normalize: bool = True, *, max_length: int = 10240, max_query_length: int = 512,
                    batch_size: int = 32) -> tuple[list[float], list[int]]:
        """Scores and prompt token counts of (query, document) pairs whose sides may each be text or
        image (str = text; PIL image, {"text": ...} or {"image": ...}), a document also both ({"image": ...,
        "text": ...}). For servers batching many requests."""
        max_doc_length = default_max_doc_length(max_length, max_query_length)
        prepared = [(self._prepare(q, None, f"pairs[{i}] query", document=False),
                     self._prepare(d, None, f"pairs[{i}] document", document=True))
                    for i, (q, d) in enumerate(pairs)]
        raw, lengths = self._score(prepared, batch_size=batch_size, max_length=max_length, max_doc_length=max_doc_length)
        return ([self.normalize(s) for s in raw] if normalize else raw), lengths

    def rank(self, query, documents, top_n: int | None = None, return_documents: bool = False, *,
             batch_size: int = 32, max_length: int = 10240, max_query_length: int = 512, show_progress: bool = False) -> list[dict]:
        """Documents (texts, images and {"image": ..., "text": ...} pairs of both, mixed) ranked for a text
        or image query, best first:
        [{"index": i, "relevance_score": s, ("document": d)}]."""
        if not isinstance(documents, (list, tuple)) or not documents:
            raise InputError("documents must be a non-empty list")
        if top_n is not None and (not isinstance(top_n, int) or top_n < 1):
            raise InputError(f"top_n must be a positive int, got {top_n!r}")
        q = self._prepare(query, None, "query", document=False)
        prepared = [(q, self._prepare(d, None, f"documents[{i}]", document=True)) for i, d in enumerate(documents)]
        max_doc_length = default_max_doc_length(max_length, max_query_length)
        raw, _ = self._score(prepared, batch_size=batch_size, max_length=max_length, max_doc_length=max_doc_length,
                             show_progress=show_progress)
        scores = [self.normalize(s) for s in raw]
        results = [{"index": i, "relevance_score": scores[i]} for i in rank_order(scores)[:top_n]]
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
