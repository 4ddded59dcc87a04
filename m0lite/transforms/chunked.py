"""The CPU fast forms of a decoder layer and a vision block: row-wise chunks and fused epilogues.

Everything in a block but attention is row-wise (row i of the output depends only
on row i of the input), so on CPU it runs in chunks. In 16 bits, chunks of CHUNK_ROWS
rows, whose activations, (256, 8960) in the decoder's MLP, stay in cache; the wide
matmuls and the elementwise work between them then run faster than over thousands of
rows at once. fp32's matmuls run faster over many rows (MKL; oneDNN's AVX2 int8 kernel
lays the weight out again on every call), so fp32 is cut only for memory, into chunks of
at most FP32_CHUNK_ROWS rows; the lean mode runs the work between its MLP's matmuls in
cache-sized stages itself (int8.swiglu_add). The linears are `EpilogueLinear`s
(onednn.py, int8.py), so SiLU, the SwiGLU multiply and the residual adds run inside the
matmuls where the kernel can fuse them.

The vision block also rewrites two steps into its weights, for any EpilogueLinear:
- QuickGELU(u) = swish(1.702 u) / 1.702, and oneDNN fuses swish (silu) into a matmul
  but has no QuickGELU. So fc1 computes 1.702 u (weight and bias scaled by 1.702) with
  swish fused, and fc2 takes the 1/1.702 into its weight. The scaled weights are
  rounded once, which moves a block's output by about as much as the fused epilogues do.
- qkv emits the query and key features of each rotary pair side by side, so that the
  rotation is one complex multiply instead of the seven passes of `apply_rotary`.
  Queries and keys are permuted alike, so their dot products, and attention, are unchanged.

Each fast form keeps its block's submodules under the checkpoint's names and its
block's forward signature, so the towers' loops run it unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ..kernels import ops
from ..context import Context
from ..decoder import DecoderLayer
from ..rope import apply_rotary
from ..vision import QUICK_GELU, VisionBlock
from .epilogue import EpilogueLinear
from .onednn import CHUNK_ROWS

# Activation dtypes chunked for speed, CHUNK_ROWS rows a chunk: the activations stay in cache.
CHUNK_DTYPES = (torch.bfloat16, torch.float16)
# fp32 runs its matmuls faster over many rows (MKL; oneDNN's AVX2 int8 kernel, which lays the weight out again on
# each call); it is cut, into equal chunks of at most this many rows, to bound a long batch's activations:
# (16k, 17,920) fp32 alone is 1.1 GiB. 1024: the lean mode's text8 peak 1,762-1,785 MiB, against 1,887-1,912 at
# 2048 and 1,940-1,979 whole, for about 4% of its speed (bench/RESULTS.md, "The lean mode in fp32").
FP32_CHUNK_ROWS = 1024

# Turns a model's nn.Linear (or a layer already converted, such as Int8Linear) into an EpilogueLinear,
# with the vision rewrites' output order `out_order` and scales.
MakeLinear = Callable[..., EpilogueLinear]


ROW_MULTIPLE = 32  # every matmul of the fast forms runs a multiple of this many rows (see rowwise)


def chunk_rows(n: int, dtype: torch.dtype) -> int:
    """Rows per chunk of a pass of n rows on CPU: CHUNK_ROWS in 16 bits; in fp32 n cut into as few equal chunks
    as hold at most FP32_CHUNK_ROWS rows each, each a multiple of ROW_MULTIPLE."""
    if dtype in CHUNK_DTYPES:
        return CHUNK_ROWS
    chunks = max(-(-n // FP32_CHUNK_ROWS), 1)
    return max(-(-n // (chunks * ROW_MULTIPLE)) * ROW_MULTIPLE, ROW_MULTIPLE)


def rowwise(fn, *xs: torch.Tensor):
    """fn(*xs) for a row-wise fn (row i of each output depends only on row i of each input), computed
    on CPU in bf16, fp16 and fp32 in chunks of chunk_rows rows. fn returns a tensor or a tuple of tensors.

    A chunk of fewer rows (the last one, or a small pass) is padded with zero rows to a multiple of
    ROW_MULTIPLE, and the padding's outputs dropped: oneDNN keeps state for every row count it has seen
    (about half a MiB each, never freed), and a server would otherwise meet a new count on almost every
    pass."""
    first, n = xs[0], xs[0].shape[0]
    if first.device.type != "cpu" or first.dtype not in (*CHUNK_DTYPES, torch.float32):
        return fn(*xs)
    rows_per = chunk_rows(n, first.dtype)
    outs, one = None, True
    for s in range(0, n, rows_per):
        part = [x[s:s + rows_per] for x in xs]
        rows = part[0].shape[0]
        pad = -rows % ROW_MULTIPLE
        if pad:
            part = [torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in part]
        ys = fn(*part)
        one = isinstance(ys, torch.Tensor)
        ys = (ys,) if one else ys
        if n <= rows_per:  # one chunk: its outputs are the result
            return ys[0][:rows] if one else tuple(y[:rows] for y in ys)
        if outs is None:
            # 3-D outputs, the (rows, heads, head_dim) queries, keys and values, are stored heads-major:
            # attention then reads each head's rows as one block.
            outs = [y.new_empty((y.shape[1], n, y.shape[2])).transpose(0, 1) if y.dim() == 3 else
                    y.new_empty((n, *y.shape[1:])) for y in ys]
        for out, y in zip(outs, ys):
            out[s:s + rows] = y[:rows]
    if outs is None:  # no rows
        return fn(*xs)
    return outs[0] if one else tuple(outs)


def swiglu_add(mlp: nn.Module, h, res):
    """res + down(silu(gate h) * up h): the decoder's MLP and its residual, on EpilogueLinears."""
    return mlp.down_proj.add(mlp.up_proj.mul(h, mlp.gate_proj.silu(h)), res)


def quick_gelu_add(mlp: nn.Module, h, res):
    """res + fc2(QuickGELU(fc1 h)): the vision block's MLP and its residual, on the rewritten EpilogueLinears
    (fc1 computes 1.702 u, fc2 takes the 1 / 1.702: see the module docstring)."""
    return mlp.fc2.add(mlp.fc1.silu(h), res)


class FastDecoderLayer(nn.Module):
    """`DecoderLayer` in row-wise chunks with fused epilogues; same math, same signature. Its MLP with the
    residual is `mlp_add(mlp, h, res)` (swiglu_add, or a form of it for other linears: int8.swiglu_add)."""

    def __init__(self, layer: DecoderLayer, make: MakeLinear, mlp_add=swiglu_add):
        super().__init__()
        self.self_attn, self.mlp, self.mlp_add = layer.self_attn, layer.mlp, mlp_add
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        for m, names in ((self.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                         (self.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(m, name, make(getattr(m, name)))

    def forward(self, x, ctx: Context):
        q, k, v = rowwise(self._qkv, x, ctx.cos, ctx.sin)
        a = self._attend(q, k, v, ctx)
        del q, k, v  # not held while the output is computed (a pass's peak memory)
        return self._output(a, x, ctx)

    def prefill(self, x, ctx: Context):
        q, k, v = rowwise(self._qkv, x, ctx.cos, ctx.sin)
        a = self._attend(q, k, v, ctx)
        return self._output(a, x, ctx), k, v

    def kv(self, x, ctx: Context):
        return self.self_attn.kv(self.input_layernorm(x), ctx.cos, ctx.sin)

    def _attend(self, q, k, v, ctx: Context):
        return ops.causal_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, ctx.past).flatten(1)  # (T, nh * hd)

    def _output(self, a, x, ctx: Context):
        if ctx.out_rows is not None:
            a, x = a[ctx.out_rows], x[ctx.out_rows]
        return rowwise(self._out, a, x)

    def _qkv(self, x, cos, sin):
        """Rotated queries (T, nh, hd), keys and values (T, nkv, hd) of rows x."""
        attn, h = self.self_attn, self.input_layernorm(x)
        T = h.shape[0]
        q = apply_rotary(attn.q_proj(h).view(T, attn.n_heads, attn.head_dim), cos, sin)
        return (q, *attn.kv(h, cos, sin))

    def _out(self, a, x):
        """x + o_proj(a), then the MLP block with its residual."""
        h, res = self.post_attention_layernorm(self.self_attn.o_proj(a), residual=x)  # res = x + o, h = norm(res)
        return self.mlp_add(self.mlp, h, res)


@functools.cache  # one tuple shared by every block
def qkv_pair_order(heads: int, head_dim: int) -> tuple[int, ...]:
    """qkv's output order in the fast form: queries and keys in rotary-pair order, values as they are."""
    pairs, width = pair_order(heads, head_dim), heads * head_dim
    return (*pairs, *(width + i for i in pairs), *range(2 * width, 3 * width))


def pair_order(heads: int, head_dim: int) -> list[int]:
    """The feature order that puts each rotary pair (i, i + head_dim/2) of every head side by side."""
    half = head_dim // 2
    return [h * head_dim + i + j * half for h in range(heads) for i in range(half) for j in (0, 1)]


def apply_rotary_pairs(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` in fp32 for x (tokens, heads, head_dim) whose rotary pairs (i, i + head_dim/2) are
    stored side by side (dims 0, hd/2, 1, hd/2 + 1, ...): each pair is a complex number, rotated by one
    complex multiply with rot (tokens, head_dim/2) = cos + i sin. In x's dtype, in the same paired order."""
    t, h, d = x.shape
    pairs = torch.view_as_complex(x.float().contiguous().view(t, h, d // 2, 2))
    return torch.view_as_real(pairs * rot[:, None, :]).view(t, h, d).to(x.dtype)


SCORE_ROWS = 512  # query rows per score matrix in materialized_attention: (512, keys) of one head, 3 MiB for a page


def materialized_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None):
    """`ops.attention` without a causal mask, each head's scores materialized in q's dtype: for each
    sequence, head and SCORE_ROWS queries, S = (q * scale) k^T as one matmul, softmax(S) in place, then S v.
    This is how transformers' eager attention computes, scores rounded to q's dtype before the softmax; the
    flash kernel keeps them in fp32. On CPU it is faster over a page (torch's flash kernel spends most of
    its time outside its matmuls), for several times its error on the attention output in bf16: the lean
    mode's (int8.py) trade, not the exact mode's (bench/RESULTS.md, "Lean mode, third pass")."""
    if causal:
        raise ValueError("materialized_attention has no causal mask")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = q.new_empty(q.shape)  # row-major, as attention_torch
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for h in range(q.shape[1]):
            keys, values = k[start:end, h].t(), v[start:end, h]
            for s in range(start, end, SCORE_ROWS):
                e = min(s + SCORE_ROWS, end)
                scores = torch.mm(q[s:e, h] * scale, keys)
                torch.ops.aten._softmax.out(scores, -1, False, out=scores)
                out[s:e, h] = torch.mm(scores, values)
    return out


def lean_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None):
    """The lean mode's vision attention: `materialized_attention` in 16-bit dtypes, where it is the faster
    over a page; `ops.attention` (torch's flash kernel) in fp32, the dtype of CPUs without native bf16, where
    the materialized scores are slower (bench/RESULTS.md, "fp32 where bf16 is not native, second pass")."""
    if q.dtype == torch.float32:
        return ops.attention(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return materialized_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale)


class FastVisionBlock(nn.Module):
    """`VisionBlock` in row-wise chunks, with fused epilogues and the two weight rewrites above; its
    attention `ops.attention` or another function of the same signature (materialized_attention), its MLP
    with the residual `mlp_add` (quick_gelu_add or a form of it: int8.quick_gelu_add)."""

    def __init__(self, block: VisionBlock, make: MakeLinear, attention=ops.attention, mlp_add=quick_gelu_add):
        super().__init__()
        self.norm1, self.norm2, self.attn, self.mlp = block.norm1, block.norm2, block.attn, block.mlp
        self.attention, self.mlp_add = attention, mlp_add
        attn, mlp = self.attn, self.mlp
        attn.qkv = make(attn.qkv, out_order=qkv_pair_order(attn.n_heads, attn.head_dim))
        attn.proj = make(attn.proj)
        mlp.fc1 = make(mlp.fc1, weight_scale=QUICK_GELU, bias_scale=QUICK_GELU)
        mlp.fc2 = make(mlp.fc2, weight_scale=1 / QUICK_GELU)

    def forward(self, x, ctx: Context):
        q, k, v = rowwise(self._qkv, x, ctx.cos, ctx.sin)
        a = self.attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, causal=False).flatten(1)  # (P, nh * hd)
        del q, k, v  # as in FastDecoderLayer
        return rowwise(self._out, a, x)

    def _qkv(self, x, cos, sin):
        """Rotated queries and keys, and values, of rows x: 3 x (P, nh, hd), queries and keys in pair order."""
        attn, P = self.attn, x.shape[0]
        q, k, v = attn.qkv(self.norm1(x)).view(P, 3, attn.n_heads, attn.head_dim).unbind(1)
        half = attn.head_dim // 2
        rot = torch.complex(cos[:, :half], sin[:, :half])
        return apply_rotary_pairs(q, rot), apply_rotary_pairs(k, rot), v

    def _out(self, a, x):
        """x + proj(a), then the MLP block with its residual: fc2(swish(fc1 x)) on the scaled weights."""
        x = self.attn.proj.add(a, x)
        return self.mlp_add(self.mlp, self.norm2(x), x)


def apply(tower: nn.Module, make: MakeLinear, vision_attention=ops.attention, decoder_mlp=swiglu_add,
          vision_mlp=quick_gelu_add) -> int:
    """Put every decoder layer or vision block of `tower` (a Decoder or a VisionTower) in its fast form, and
    the vision tower's patch embedding and merger on `make`'s linears; the number of blocks replaced (0 when
    the tower is in its fast form already). The vision blocks attend with `vision_attention`; the MLPs run
    as `decoder_mlp` and `vision_mlp` say."""
    blocks = getattr(tower, "layers", None) or tower.blocks
    done = 0
    for i, block in enumerate(blocks):
        if isinstance(block, DecoderLayer):
            blocks[i] = FastDecoderLayer(block, make, decoder_mlp)
        elif isinstance(block, VisionBlock):
            blocks[i] = FastVisionBlock(block, make, vision_attention, vision_mlp)
        else:
            continue
        done += 1
    if done and hasattr(tower, "merger"):
        tower.patch_embed.proj = make(tower.patch_embed.proj)
        mlp = tower.merger.mlp
        mlp[0], mlp[2] = make(mlp[0]), make(mlp[2])
    return done
