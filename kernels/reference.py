"""Torch twins of the Triton kernels: same signatures, same math.

They are the model's CPU path and the oracle the kernel tests compare against,
so they follow the transformers Qwen2 code exactly (dtype casts included).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Past(NamedTuple):
    """The cached prefixes of a ragged batch: k, v (prefix tokens, n_kv_heads, d), packed side by side;
    sequence i's prefix is rows cu_seqlens[i]:cu_seqlens[i+1] (int32, batch+1), possibly none."""
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor


def rms_norm_torch(x, weight, eps, residual=None):
    """RMSNorm over the last dim, as transformers' Qwen2RMSNorm computes it.

    y = weight * (h / sqrt(mean(h**2) + eps)).to(h.dtype), with the statistics in fp32.
    Without `residual`, h = x and y is returned. With it, h = x + residual (in x's
    dtype, like the decoder's `residual + hidden_states`) and (y, h) is returned.
    """
    h = x if residual is None else x + residual
    h32 = h.float()
    y = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)


def attention_torch(q, k, v, cu_seqlens, max_seqlen, causal, scale=None):
    """softmax(q k^T * scale [+ causal mask]) v over variable-length sequences side by side (a ragged batch).

    q: (total, n_heads, d); k, v: (total, n_kv_heads, d); cu_seqlens: int32 (batch+1,),
    sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] and attends only to itself.
    Query head h reads kv head h // (n_heads // n_kv_heads), as transformers' repeat_kv.
    `max_seqlen` is unused here (the Triton launcher sizes its grid with it).
    Returns (total, n_heads, d) in q's dtype.
    """
    # Row-major whatever q's layout (m0lite stores q heads-major): the caller flattens the heads, which is
    # then a view, not a copy.
    out = q.new_empty(q.shape)
    gqa = q.shape[1] != k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, L, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    return out


def attention_with_past_torch(q, k, v, cu_seqlens, max_seqlen, past, scale=None):
    """Causal attention of each sequence's tokens over its cached prefix and itself (the document cache).

    q: (total, n_heads, d); k, v: (total, n_kv_heads, d), sequences delimited by cu_seqlens as in
    `attention_torch`; past: a `Past`, whose rows past.cu_seqlens[i]:past.cu_seqlens[i+1] of past.k,
    past.v, (P_i, n_kv_heads, d), are the keys and values of the P_i tokens that come before
    sequence i. Query j of sequence i sees all P_i past keys and its own keys 0..j. `max_seqlen` is
    unused here (the Triton launcher sizes its grid with it). Returns (total, n_heads, d) in q's dtype.
    """
    out = q.new_empty(q.shape)  # row-major, as attention_torch
    bounds, past_bounds = cu_seqlens.tolist(), past.cu_seqlens.tolist()
    for s, e, ps, pe in zip(bounds[:-1], bounds[1:], past_bounds[:-1], past_bounds[1:]):
        n, p = e - s, pe - ps
        ks, vs = torch.cat([past.k[ps:pe], k[s:e]]), torch.cat([past.v[ps:pe], v[s:e]])
        mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(p)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=ks.shape[1] != q.shape[1])
        out[s:e] = o.transpose(0, 1)
    return out
