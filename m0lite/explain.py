"""Why a document scored as it did: attributions over its text tokens and its image's regions.

`explain(reranker, query, document, method)` scores one pair and gives each part of the document a
number: each text token, with its (start, end) character offsets into the document text, and each
image region, one visual token of the merged grid (a 2x2 window of 14-pixel patches, 28x28 pixels of
the resized image), with its pixel box in the original image.

The three methods measure different things:

- "occlusion" measures what a part does to the score. A part's attribution is the raw score minus
  the raw score of the prompt without that part: a text token deleted from the prompt, a region's
  visual token replaced by the mean of the image's visual tokens. Positive: the part raises the
  score. It is exactly the change it reports. It costs one decoder pass per token and region,
  run in ragged batches; attention is causal, so the keys and values of the prompt before the
  removed part are those of the whole prompt, computed once, and each variant runs only from the
  removed part on. The image is encoded once (through the vision cache).
- "attention" measures where the score token looks: the attention probability of the score token
  (the prompt's last token) on each document token, averaged over heads and layers, from one
  forward pass. Non-negative; it does not say whether a token raises or lowers the score.
- "contribution" measures, to first order, what a part adds to the score through the score token's
  reading of it: the derivative of the raw score with respect to a bias added to the score token's
  attention logit on that token, in every layer and head, every other token's hidden states held fixed.
  That is, summed over layers and heads, the attention weight on the token times how far its value
  lies from the head's attention output, along the gradient of the score at that output. Positive: the
  part raises the score (taking the token out of the score token's view lowers it by about as much).
  It leaves out what a token does through other tokens' states. It costs one forward pass (the keys and
  values of the prompt before the score token, as occlusion's) and passes of the score token alone over
  those keys and values: one for the score, one forward and backward for the derivatives. The backward
  runs through the decoder's plain linears, so it needs a decoder that is not packed (pack_weights) nor
  int8.

A visual token already mixes in the rest of its image (the vision tower attends over the whole
image), so a region's attribution is that of what the decoder reads at the region's place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .batching import Prepared, budget_groups
from .decoder import DecoderLayer
from .errors import InputError
from .images.preprocess import FACTOR, PATCH_SIZE
from .kernels.ops import rms_norm_torch
from .model import RaggedBatch
from .prompt import (DOC_HEAD, IMAGE_PLACEHOLDER, QUERY_HEAD, build_prompt, default_max_doc_length, document_string,
                     expand_images)
from .rope import apply_rotary, mrope_positions

METHODS = ("occlusion", "attention", "contribution")
MAX_VARIANTS_PER_PASS = 64  # occluded prompts per decoder pass (each also bounded by the reranker's token budget)


@dataclass
class Layout:
    """One pair's prompt and where the document's parts sit in it."""

    ids: list[int]
    positions: torch.Tensor  # (3, len(ids)) M-RoPE positions
    grids: list[tuple[int, int, int]]  # images in prompt order
    images: list[Prepared]  # the same images, the document's first
    text: str | None  # the document text as the prompt holds it (its start, if it was cut)
    text_rows: list[int]  # prompt rows of the document's text tokens
    offsets: list[tuple[int, int]]  # each text token's (start, end) in `text`
    image_rows: list[int]  # prompt rows of the document image's visual tokens, row-major over the merged grid
    image_size: tuple[int, int] | None  # the original image's (width, height)
    grid: tuple[int, int, int] | None  # the document image's patch grid (t, h, w)


def layout(rr, query, document, *, max_length: int = 10240, max_query_length: int = 512) -> Layout:
    """The pair's prompt as the reranker scores it, with the document's text tokens and visual tokens located."""
    q = rr.prepare(query, None, "query", document=False)
    doc = rr.prepare(document, None, "document", document=True)  # the forms rank reads, read by the same code
    tok, merge = rr.tokenizer, rr.model.cfg.vision.spatial_merge_size
    size = doc.size
    max_doc_length = default_max_doc_length(max_length, max_query_length)
    prompt = build_prompt(tok, q.side, doc.side, max_length=max_length, max_doc_length=max_doc_length, merge=merge)
    ids = prompt.input_ids
    images = [im for im in (doc, q) if im.pixels is not None]

    # Locate the document text's tokens by their character offsets in the prompt string.
    doc_str = document_string(tok, doc.side, max_doc_length, merge)
    held = doc_str[len(IMAGE_PLACEHOLDER):] if doc.side.is_image else doc_str
    start = len(DOC_HEAD) + len(doc_str) - len(held)
    end = start + len(held)
    query_str = IMAGE_PLACEHOLDER if q.side.is_image else q.side.text
    raw_ids, raw_offsets = tok.encode_with_offsets(DOC_HEAD + doc_str + QUERY_HEAD + query_str)
    if expand_images(raw_ids, prompt.grids, tok.image_pad_id, merge)[: len(ids) - 1] != ids[:-1]:
        raise RuntimeError("explain: the prompt's tokens differ from build_prompt's")  # the two must tokenize alike
    text_rows, offsets, image_rows, row, pads = [], [], [], 0, iter(prompt.grids)
    for i, (s, e) in zip(raw_ids, raw_offsets):
        if i == tok.image_pad_id:
            n = math.prod(next(pads)) // merge**2
            if doc.side.is_image and not image_rows:  # the document's image comes first
                image_rows = list(range(row, row + n))
            row += n
            continue
        # A token at the text's edge may also hold template characters (BPE merges "text \n"); it counts as text.
        if s < end and e > start and row < len(ids) - 1:
            text_rows.append(row)
            offsets.append((max(s, start) - start, min(e, end) - start))
        row += 1
    positions = mrope_positions(ids, prompt.grids, rr.model.cfg.image_token_id, merge)
    return Layout(ids, positions, prompt.grids, images, held if doc.side.text is not None else None, text_rows, offsets,
                  image_rows, size, doc.side.grid)


def region_box(row: int, col: int, image_size: tuple[int, int], grid: tuple[int, int, int]) -> tuple[float, ...]:
    """(x0, y0, x1, y1) in the original image of merged-grid region (row, col): its 28x28-pixel window of
    the resized image (grid h x w patches of 14 pixels), scaled back to the original's size."""
    width, height = image_size
    sx, sy = width / (grid[2] * PATCH_SIZE), height / (grid[1] * PATCH_SIZE)
    return (col * FACTOR * sx, row * FACTOR * sy, (col + 1) * FACTOR * sx, (row + 1) * FACTOR * sy)


@torch.inference_mode()
def scores_without(rr, lay: Layout, removals: list[tuple[list[int], list[int]]]) -> list[float]:
    """Raw score of the pair with, for each removal (text tokens, regions) (indices into lay.text_rows and
    lay.image_rows), those text tokens deleted and those regions' visual tokens replaced by the image's
    mean visual token. An empty removal scores the whole prompt."""
    model, cfg = rr.model, rr.model.cfg
    visual = rr.visual_tokens(lay.images)
    full = RaggedBatch.of([lay.ids], [lay.positions], [lay.grids])
    rr.fast.before_pass(model.model, len(lay.ids))
    kv = model.prefill(full, visual)[0]  # (layers, 2, tokens, kv_heads, head_dim), the whole prompt's
    slots = [r for r, i in enumerate(lay.ids) if i == cfg.image_token_id]  # row of each visual token
    mean = visual[: len(lay.image_rows)].mean(0) if lay.image_rows else None
    variants = []
    for text, regions in removals:
        drop = {lay.text_rows[i] for i in text}
        swap = {lay.image_rows[i] for i in regions}
        # Rows before the first change keep the whole prompt's keys and values.
        start = min(drop | swap, default=len(lay.ids) - 1)
        ids = [t for r, t in enumerate(lay.ids) if r not in drop]
        pos = mrope_positions(ids, lay.grids, cfg.image_token_id, cfg.vision.spatial_merge_size) if drop else lay.positions
        first = sum(r < start for r in slots)  # visual tokens before `start` are in the kept keys and values
        variants.append((start, ids[start:], pos[:, start:], first, {k for k, r in enumerate(slots) if r in swap}))

    def embeds(first: int, swap: set[int]) -> torch.Tensor:
        """The visual tokens a variant runs (those from `first` on), with its swapped regions' replaced."""
        vis = visual[first:]
        if swap:
            vis = vis.clone()
            vis[[k - first for k in sorted(swap)]] = mean
        return vis

    scores = []
    for idx in budget_groups([len(v[1]) for v in variants], MAX_VARIANTS_PER_PASS, rr.max_batch_tokens):
        group = [variants[i] for i in idx]
        with_images = [v for v in group if v[3] < len(slots)]
        batch = RaggedBatch.of([v[1] for v in group], [v[2] for v in group], [lay.grids if with_images else []])
        vis = torch.cat([embeds(v[3], v[4]) for v in with_images]) if with_images else None
        rr.fast.before_pass(model.model, batch.input_ids.numel())
        scores += model(batch, image_embeds=vis, past=[kv[:, :, : v[0]] for v in group]).tolist()
    return scores


def last_token_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (heads, T) of the last of one sequence's T rows over all of them in one
    decoder layer, recomputed from the layer's input x (T, hidden) and its cos/sin (T, head_dim) as the
    layer's attention computes them (GQA: query head j reads key head j // (heads / kv_heads))."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = apply_rotary(attn.q_proj(h[-1:]).view(1, attn.n_heads, attn.head_dim), cos[-1:], sin[-1:])[0]  # (nh, hd)
    k, _ = attn.kv(h, cos, sin)  # (T, nkv, hd)
    return score_token_logits(attn, q, k).softmax(-1)


def score_token_logits(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention logits (heads, T) in fp32 of one token's queries q (heads, head_dim) over keys k (T, kv_heads,
    head_dim); GQA: query head j reads key head j // (heads / kv_heads)."""
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (T, nh, hd)
    return torch.einsum("hd,thd->ht", q.float(), k.float()) * attn.head_dim**-0.5


@torch.inference_mode()
def attention_weights(rr, lay: Layout) -> tuple[float, torch.Tensor]:
    """The raw score and the score token's attention (tokens,) over the prompt, averaged over heads and layers,
    from one forward pass (a pre-hook on each layer reads its input; the layers run unchanged)."""
    probs = []

    def hook(layer, args):
        x, ctx = args
        probs.append(last_token_attention(layer, x, ctx.cos, ctx.sin).mean(0))

    layers = rr.model.model.layers
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        batch = RaggedBatch.of([lay.ids], [lay.positions], [lay.grids])
        rr.fast.before_pass(rr.model.model, len(lay.ids))
        raw = rr.model(batch, image_embeds=rr.visual_tokens(lay.images)).item()
    finally:
        for h in handles:
            h.remove()
    return raw, torch.stack(probs).mean(0)


def score_path(model, token: int, position: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The raw score (a 0-d fp32 tensor) recomputed along the score token's own path: token `token` at
    M-RoPE position `position` (3, 1) run through every layer over kv (layers, 2, T - 1, kv_heads,
    head_dim), the keys and values of the T - 1 tokens before it, and its own, with `bias` (T,) added to
    its attention logits in every layer and head. The layers' math written out in plain torch (the RMSNorm
    twin, softmax attention as in last_token_attention), so that autograd runs through it on any device."""
    dec = model.model
    h, ctx = model.inputs(RaggedBatch.of([[token]], [position], [[]]), None)  # (1, hidden)
    cos, sin = ctx.cos, ctx.sin  # (1, hd)
    for layer, (past_k, past_v) in zip(dec.layers, kv):
        attn, norm, post = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        x = rms_norm_torch(h, norm.weight, norm.eps)
        q = apply_rotary(attn.q_proj(x).view(1, attn.n_heads, attn.head_dim), cos, sin)[0]  # (nh, hd)
        k, v = attn.kv(x, cos, sin)
        logits = score_token_logits(attn, q, torch.cat([past_k, k])) + bias
        v = torch.cat([past_v, v]).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (T, nh, hd)
        mixed = torch.einsum("ht,thd->hd", logits.softmax(-1), v.float()).to(h.dtype)
        h = h + attn.o_proj(mixed.reshape(1, -1))
        h = h + layer.mlp(rms_norm_torch(h, post.weight, post.eps))
    return model.score(rms_norm_torch(h, dec.norm.weight, dec.norm.eps)).float()[0, 0]


def plain_decoder(decoder) -> bool:
    """Whether every decoder layer runs decoder.py's math on nn.Linear weights, which autograd runs through
    (not the packed or int8 forms of m0lite/transforms)."""
    return all(isinstance(layer, DecoderLayer)
               and all(isinstance(m, nn.Linear) for m in (*layer.self_attn.children(), *layer.mlp.children()))
               for layer in decoder.layers)


def contributions(rr, lay: Layout) -> tuple[float, torch.Tensor]:
    """The raw score and the derivative (tokens,) of the raw score with respect to a bias on the score
    token's attention logit on each token of the prompt, in every layer and head, with the other tokens'
    keys and values held fixed: one forward pass for those keys and values, and the score token's path
    (score_path) forward and backward. The derivatives sum to zero (a bias on every logit changes nothing)."""
    model = rr.model
    if not plain_decoder(model.model):
        raise InputError("method 'contribution' runs a backward pass through the decoder's plain weights; this "
                         "reranker's decoder is packed or int8: load it with pack_weights=False and without quantize")
    visual = rr.visual_tokens(lay.images)
    prefix = RaggedBatch.of([lay.ids[:-1]], [lay.positions[:, :-1]], [lay.grids])
    # No rr.fast.before_pass: packing the decoder now would take away the weights the backward pass needs.
    # Not inference tensors: autograd saves these keys and values for the backward pass.
    with torch.inference_mode(False), torch.no_grad():
        kv = model.model.prefill(*model.inputs(prefix, visual))[0]  # (layers, 2, T - 1, kv_heads, head_dim)
    raw = model(RaggedBatch.of([lay.ids[-1:]], [lay.positions[:, -1:]], [[]]), past=[kv]).item()
    with torch.inference_mode(False), torch.enable_grad():
        bias = torch.zeros(len(lay.ids), device=model.device, requires_grad=True)
        (grad,) = torch.autograd.grad(score_path(model, lay.ids[-1], lay.positions[:, -1:], kv, bias), bias)
    return raw, grad


def explain(rr, query, document, method: str = "occlusion", *, max_length: int = 10240,
            max_query_length: int = 512) -> dict:
    """The pair's scores and its document's attributions (see the module docstring for what each method
    measures): {"method", "score" (normalised), "raw_score", "text": [{"token", "start", "end", "score"}]
    (offsets into the document text), "image": None or {"width", "height", "rows", "cols", "regions":
    [{"row", "col", "box": [x0, y0, x1, y1] (original image pixels), "score"}]}}."""
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    lay = layout(rr, query, document, max_length=max_length, max_query_length=max_query_length)
    n_text, n_regions = len(lay.text_rows), len(lay.image_rows)
    if method == "occlusion":
        removals = [([], [])] + [([i], []) for i in range(n_text)] + [([], [j]) for j in range(n_regions)]
        raw, *rest = scores_without(rr, lay, removals)
        attributions = [raw - s for s in rest]
    else:
        raw, weights = (attention_weights if method == "attention" else contributions)(rr, lay)
        attributions = weights[lay.text_rows + lay.image_rows].tolist()
    text = [{"token": lay.text[s:e], "start": s, "end": e, "score": a}
            for (s, e), a in zip(lay.offsets, attributions[:n_text])]
    image = None
    if lay.grid is not None:
        merge = rr.model.cfg.vision.spatial_merge_size
        rows, cols = lay.grid[1] // merge, lay.grid[2] // merge
        regions = [{"row": j // cols, "col": j % cols, "box": list(region_box(j // cols, j % cols, lay.image_size, lay.grid)),
                    "score": a} for j, a in enumerate(attributions[n_text:])]
        image = {"width": lay.image_size[0], "height": lay.image_size[1], "rows": rows, "cols": cols, "regions": regions}
    return {"method": method, "score": rr.normalize(raw), "raw_score": raw, "text": text, "image": image}
