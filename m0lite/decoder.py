"""The Qwen2 decoder of Qwen2-VL: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm.

It runs on ragged batches: all tokens of a batch side by side in one
(tokens, hidden) tensor, sequence boundaries in `cu_seqlens`, causal attention
inside each sequence. No padding, so a sequence's result never depends on what
else is in its batch. Module names equal the checkpoint's tensor names
(`model.layers.N.self_attn.q_proj`, ...).

For the document cache a batch can also be run in two steps: `prefill` of the
document prefixes (keeping each layer's keys and values), then `forward` of the
rest of each prompt with those as `past`. Attention is causal, so the result is
the same as one pass over the whole prompt.

This file is the math, once. Faster forms of a layer (m0lite/transforms) replace
layers of a loaded model; they keep the signatures below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import ops
from .config import TextConfig
from .context import Context
from .memory import LookupPages
from .rope import apply_rotary


class Embedding(nn.Module):
    """Token embedding table. Not nn.Embedding: its random init (normal_) costs a second even on
    the meta device, and the weights come from the checkpoint anyway. A table mapped from the
    checkpoint does not stay resident: a pass reads a few of its rows (memory.LookupPages)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        self.hand_back = LookupPages()

    def forward(self, ids):
        rows = F.embedding(ids, self.weight)
        self.hand_back(self.weight)
        return rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with `residual`: (rms_norm(x + residual), x + residual), fused."""
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def kv(self, x, cos, sin):
        """Rotated keys and values (T, nkv, hd) of rows x."""
        T = x.shape[0]
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        return apply_rotary(k, cos, sin), v

    def forward(self, x, ctx: Context):
        """(T, hidden) -> (T, hidden) and this layer's rotated keys and values (T, nkv, hd); each sequence
        attends to its cached prefix (`ctx.past`) first."""
        T = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(T, self.n_heads, self.head_dim), ctx.cos, ctx.sin)  # (T, nh, hd)
        k, v = self.kv(x, ctx.cos, ctx.sin)  # (T, nkv, hd)
        out = ops.causal_attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, ctx.past)  # (T, nh, hd)
        return self.o_proj(out.flatten(1)), k, v  # (T, nh * hd) -> (T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        """down(silu(gate(x)) * up(x)), SwiGLU."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, ctx: Context):
        """(T, hidden) -> (T, hidden), or (len(ctx.out_rows), hidden): the output only of those token rows
        (the last layer needs only each sequence's last token; attention still reads every token)."""
        return self.prefill(x, ctx)[0]

    def prefill(self, x, ctx: Context):
        """`forward`'s output, and this layer's rotated keys and values (T, nkv, hd) of every row."""
        a, k, v = self.self_attn(self.input_layernorm(x), ctx)
        if ctx.out_rows is not None:
            x, a = x[ctx.out_rows], a[ctx.out_rows]
        n, h = self.post_attention_layernorm(a, residual=x)  # h = x + a, n = norm(h): one kernel on CUDA
        return h + self.mlp(n), k, v

    def kv(self, x, ctx: Context):
        """This layer's rotated keys and values of rows x, without its output (the last layer's prefill)."""
        return self.self_attn.kv(self.input_layernorm(x), ctx.cos, ctx.sin)


class Decoder(nn.Module):
    """`model.*` of the checkpoint."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, ctx: Context, past=None):
        """Embeddings (tokens, hidden) -> final-norm hidden state of each sequence's last token
        (batch, hidden). `past`: per sequence, the (layers, 2, P, nkv, hd) keys and values of its prefix."""
        last = ctx.cu_seqlens[1:].long() - 1
        if past is not None:  # the prefixes' offsets, known on the host: no device read per layer
            cu_past = ops.cu_seqlens([p.shape[2] for p in past], h.device)
        for i, layer in enumerate(self.layers):
            # This layer's prefixes side by side (one copy a layer, freed after it, as the twin's own copies).
            layer_past = None if past is None else ops.Past(torch.cat([p[i, 0] for p in past]),
                                                            torch.cat([p[i, 1] for p in past]), cu_past)
            # The score reads only the last token of each sequence; the last layer computes nothing else.
            h = layer(h, ctx.at(past=layer_past, out_rows=last if i == len(self.layers) - 1 else None))
        return self.norm(h)

    def prefill(self, h, ctx: Context) -> list[torch.Tensor]:
        """Keys and values of every layer for a ragged batch of prefixes: per sequence (layers, 2, P, nkv, hd)."""
        kvs = []
        for layer in self.layers[:-1]:
            h, k, v = layer.prefill(h, ctx)
            kvs.append((k, v))
        kvs.append(self.layers[-1].kv(h, ctx))  # the last layer's output is not needed
        bounds = ctx.cu_seqlens.tolist()
        kv = torch.stack([torch.stack(pair) for pair in kvs])  # (layers, 2, T, nkv, hd)
        return [kv[:, :, s:e].clone() for s, e in zip(bounds[:-1], bounds[1:])]
