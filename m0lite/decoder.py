"""The Qwen2 decoder of Qwen2-VL: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm.

It runs on packed sequences: all tokens of a batch side by side in one
(tokens, hidden) tensor, sequence boundaries in `cu_seqlens`, causal attention
inside each sequence. No padding, so a sequence's result never depends on what
else is in its batch. Module names equal the checkpoint's tensor names
(`model.layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import TextConfig
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with `residual`: (rms_norm(x + residual), x + residual), fused."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)  # (T, nh, hd)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = kernels.attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cu_seqlens, max_seqlen):
        a = self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, max_seqlen)
        x, h = self.post_attention_layernorm(a, residual=h)  # h += a, then norm, in one pass
        return h + self.mlp(x)


class Decoder(nn.Module):
    """`model.*` of the checkpoint. forward: embeddings (tokens, hidden) -> final-norm hidden states of
    the last token of each sequence (batch, hidden)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cu_seqlens, max_seqlen):
        for layer in self.layers:
            h = layer(h, cos, sin, cu_seqlens, max_seqlen)
        last = cu_seqlens[1:].long() - 1
        # The score reads only each sequence's last token; the norm is per token, so norming just those is exact.
        return self.norm(h[last])
