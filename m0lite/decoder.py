"""The Qwen2 decoder of Qwen2-VL: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm.

It runs on packed sequences: all tokens of a batch side by side in one
(tokens, hidden) tensor, sequence boundaries in `cu_seqlens`, causal attention
inside each sequence. No padding, so a sequence's result never depends on what
else is in its batch. Module names equal the checkpoint's tensor names
(`model.layers.N.self_attn.q_proj`, ...).

For the document cache a batch can also be run in two steps: `prefill` of the
document prefixes (keeping each layer's keys and values), then `forward` of the
rest of each prompt with those as `past`. Attention is causal, so the result is
the same as one pass over the whole prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m0lite import kernels

from .config import TextConfig
from .linear import Linear, rowwise
from .rope import apply_rotary


class Embedding(nn.Module):
    """Token embedding table. Not nn.Embedding: its random init (normal_) costs a second even on
    the meta device, and the weights come from the checkpoint anyway."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with `residual`: (rms_norm(x + residual), x + residual), fused."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def attention_with_past(q, k, v, cu_seqlens, past: list[tuple[torch.Tensor, torch.Tensor]]):
    """Causal attention of each packed sequence's new tokens over its past keys/values and itself.
    q (T, nh, hd), k/v (T, nkv, hd); past[i] = (k, v) of shape (P_i, nkv, hd). Query j of a
    sequence sees all P_i past keys and new keys 0..j."""
    out = q.new_empty(q.shape)  # row-major (q may be heads-major): flattening the heads is a view
    bounds = cu_seqlens.tolist()
    for (s, e), (pk, pv) in zip(zip(bounds[:-1], bounds[1:]), past):
        n, p = e - s, pk.shape[0]
        ks, vs = torch.cat([pk, k[s:e]]), torch.cat([pv, v[s:e]])
        mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=mask, enable_gqa=ks.shape[1] != q.shape[1])
        out[s:e] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def kv(self, x, cos, sin):
        T = x.shape[0]
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        return apply_rotary(k, cos, sin), v

    def project(self, x, cos, sin):
        """Rotated queries (T, nh, hd) and keys (T, nkv, hd), and values (T, nkv, hd), of rows x."""
        T = x.shape[0]
        return (apply_rotary(self.q_proj(x).view(T, self.n_heads, self.head_dim), cos, sin), *self.kv(x, cos, sin))

    def forward(self, q, k, v, cu_seqlens, max_seqlen, past=None, keep=None):
        """Attention of each packed sequence, (T, nh * hd), before o_proj. `past`: per sequence (k, v) to
        attend to before its tokens; `keep`: a list to append this layer's (k, v) to."""
        if keep is not None:
            keep.append((k, v))
        if past is None:
            out = kernels.attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        else:
            out = attention_with_past(q, k, v, cu_seqlens, past)
        return out.flatten(1)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, residual):
        """residual + down(silu(gate(x)) * up(x)), each step fused into its matmul where the weights are
        packed (see linear.py), in place on the (tokens, intermediate) activations otherwise."""
        return self.down_proj.add(self.up_proj.mul(x, self.gate_proj.silu(x)), residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cu_seqlens, max_seqlen, past=None, keep=None, rows=None):
        """`rows`: compute the output only for these token rows (the last layer needs only each
        sequence's last token; attention still reads every token). Everything but attention is
        row-wise and runs through `rowwise` (chunks on CPU in bf16)."""
        a = self.self_attn(*rowwise(self._qkv, h, cos, sin), cu_seqlens, max_seqlen, past, keep)
        if rows is not None:
            a, h = a[rows], h[rows]
        return rowwise(self._out, a, h)

    def _qkv(self, h, cos, sin):
        return self.self_attn.project(self.input_layernorm(h), cos, sin)

    def _out(self, a, h):
        """h + o_proj(a), then the MLP block with its residual."""
        x, h = self.post_attention_layernorm(self.self_attn.o_proj(a), residual=h)  # h += o, then norm, in one pass
        return self.mlp(x, residual=h)


class Decoder(nn.Module):
    """`model.*` of the checkpoint."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cu_seqlens, max_seqlen, past=None):
        """Embeddings (tokens, hidden) -> final-norm hidden state of each sequence's last token
        (batch, hidden). `past`: per sequence, the (layers, 2, P, nkv, hd) keys and values of its prefix."""
        last = cu_seqlens[1:].long() - 1
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else [(p[i, 0], p[i, 1]) for p in past]
            # The score reads only the last token of each sequence; the last layer computes nothing else.
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, layer_past, rows=last if i == len(self.layers) - 1 else None)
        return self.norm(h)

    def prefill(self, h, cos, sin, cu_seqlens, max_seqlen) -> list[torch.Tensor]:
        """Keys and values of every layer for packed prefixes: per sequence (layers, 2, P, nkv, hd)."""
        keep: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in self.layers[:-1]:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen, keep=keep)
        last = self.layers[-1].self_attn  # only its keys and values are needed, not its output
        keep.append(last.kv(self.layers[-1].input_layernorm(h), cos, sin))
        bounds = cu_seqlens.tolist()
        kv = torch.stack([torch.stack(pair) for pair in keep])  # (layers, 2, T, nkv, hd)
        return [kv[:, :, s:e].clone() for s, e in zip(bounds[:-1], bounds[1:])]
