"""Flash-attention forward over variable-length sequences side by side (a ragged batch), in Triton.

After Triton's fused-attention tutorial (FlashAttention-2, Dao 2023,
https://arxiv.org/abs/2307.08691): a program owns BLOCK_M query rows of one head of
one sequence, keeps them and the running output in registers, and streams the
sequence's keys and values through in blocks of BLOCK_N with an online softmax, so
the (L, L) score matrix never exists in memory.

Sequences lie back to back (no padding) and are delimited by `cu_seqlens`; each
attends only to itself (block-diagonal), causally for the decoder and bidirectionally
for the vision tower. With `cu_seqlens_k` the keys have offsets of their own: sequence
i's queries are the last of its keys (a cached prefix comes first), and query j sees
keys 0 .. len_k - len_q + j. head_dim need not be a power of two (the vision tower's is 80):
the tile is padded to the next power of two with masked loads and stores.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .triton_rms_norm import check_device


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi,
                    offs_m, offs_n, d_mask, seqlen, causal_shift, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys/values [lo, hi) into the running softmax state (m_i, l_i, acc).

    m_i: running row max of the scaled scores (log2 units), l_i: running sum of
    2**(s - m_i), acc: running sum of 2**(s - m_i) * v. When the max grows, the old
    sums are rescaled by alpha = 2**(m_old - m_new). MASKED blocks may hold keys past
    the sequence end or (CAUSAL) after the query; blocks below the diagonal skip masking.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_kn = start_n + offs_n
        if MASKED:
            kv_mask = (offs_kn[:, None] < seqlen) & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), fp32
        if MASKED:
            keep = offs_kn[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_m[:, None] + causal_shift >= offs_kn[None, :])
            # A row's first visited block always holds a key it may see (key 0, or its
            # own position), so m_ij is finite and masked scores give exp2(-inf) = 0, not NaN.
            qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        # p is rounded to v's dtype so the second matmul runs on fp16/bf16 tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, cu_seqlens, cu_seqlens_k, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[i, h] = sum_j softmax_j(q[i, h] . k[j, h // GROUP] * scale) v[j, h // GROUP],

    j over the keys of i's sequence (and j <= i + len_k - len_q when CAUSAL). qk_scale = scale * log2(e), so
    the softmax uses exp2. Grid: (query blocks, sequences, query heads).
    """
    start_m = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + seq).to(tl.int64)
    seqlen_q = (tl.load(cu_seqlens + seq + 1) - seq_start).to(tl.int32)
    if start_m >= seqlen_q:  # the grid is sized for the longest sequence
        return
    k_start = tl.load(cu_seqlens_k + seq).to(tl.int64)
    seqlen = (tl.load(cu_seqlens_k + seq + 1) - k_start).to(tl.int32)  # keys
    causal_shift = seqlen - seqlen_q  # a cached prefix's keys come before the sequence's own
    kv_head = head // GROUP  # the GROUP consecutive query heads of a kv group share it

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # BLOCK_D is HEAD_DIM rounded up to a power of two
    q_ptrs = Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
    k_ptrs = K + (k_start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :]
    v_ptrs = V + (k_start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :]
    q_mask = (offs_m[:, None] < seqlen_q) & d_mask[None, :]

    # The query block and the running state stay in registers for the whole loop.
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong, so compute in fp32
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Stage 1: key blocks that every row of the block may see in full, no masks.
    # Stage 2: the rest, masked: the diagonal blocks (causal) or the ragged tail.
    # Causal blocks past the diagonal are never visited.
    if CAUSAL:
        full_hi = (start_m + causal_shift) // BLOCK_N * BLOCK_N  # every row sees keys below its first row's
        masked_hi = tl.minimum(start_m + causal_shift + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        masked_hi = seqlen
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, full_hi,
                                    offs_m, offs_n, d_mask, seqlen, causal_shift, qk_scale,
                                    False, CAUSAL, BLOCK_N, UPCAST, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, full_hi, masked_hi,
                                    offs_m, offs_n, d_mask, seqlen, causal_shift, qk_scale,
                                    True, CAUSAL, BLOCK_N, UPCAST, DOT_PRECISION)

    # Epilogue: normalise once at the end instead of every step.
    acc = acc / l_i[:, None]
    o_ptrs = Out + (seq_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=q_mask)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M must be a multiple of BLOCK_N.
# fp16/bf16: the tutorial's Hopper starting point; compiled for sm_90 it takes 214
# registers a thread (no spills) and 128 KiB of shared memory for the 3-stage K/V ring.
# fp32 runs exact (non-tensor-core) products, which need far more registers: small
# tiles keep the spills small; fp32 is for tests, not speed. The interpreter gets fixed
# mid-size tiles: it runs each block op in numpy, and they still leave ragged edges.
_CONFIGS = {"half": (128, 64, 8, 3), "fp32": (32, 16, 4, 2), "interpret": (64, 32, 4, 1)}


def attention_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale=None, *, cu_seqlens_k=None, config=None):
    """Triton flash attention; same contract as `attention_torch`. With `cu_seqlens_k`, k and v have
    their own sequence offsets (see the module docstring): `attention_with_past_triton` uses it.

    q: (total, n_heads, d), k, v: (total, n_kv_heads, d), fp16/bf16/fp32, each
    contiguous in d; cu_seqlens: int32 (batch+1,) on q's device, with
    cu_seqlens[-1] == total and max_seqlen >= every sequence length (not checked:
    reading cu_seqlens back would stall the GPU). `config` overrides the tile choice
    (BLOCK_M, BLOCK_N, num_warps, num_stages), for benchmark sweeps.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: q, k, v must be (tokens, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    total, n_heads, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if cu_seqlens_k is None and k.shape[0] != total:
        raise ValueError(f"attention: q has {total} tokens but k, v have {k.shape[0]}")
    if k.shape[2] != d:
        raise ValueError(f"attention: head_dim of q ({d}) and k, v ({k.shape[2]}) differ")
    n_kv_heads = k.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"attention: {n_heads} query heads are not a multiple of {n_kv_heads} kv heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if d > 256:
        raise ValueError(f"attention: head_dim {d} > 256 would not fit the tile in registers")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention: cu_seqlens must be a 1-D int32 tensor of batch+1 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in head_dim, got strides {t.stride()}")
    cu_seqlens_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if cu_seqlens_k.shape != cu_seqlens.shape or cu_seqlens_k.dtype != torch.int32:
        raise ValueError(f"attention: cu_seqlens_k must be int32 of shape {tuple(cu_seqlens.shape)}, got "
                         f"{cu_seqlens_k.dtype} of shape {tuple(cu_seqlens_k.shape)}")
    check_device(_attn_fwd, q, k, v, cu_seqlens, cu_seqlens_k)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if total == 0:
        return out
    if int(max_seqlen) < 1:
        raise ValueError(f"attention: max_seqlen must be >= 1 for {total} tokens, got {max_seqlen}")

    interpret = isinstance(_attn_fwd, InterpretedFunction)
    block_m, block_n, num_warps, num_stages = config or _CONFIGS[
        "interpret" if interpret else "fp32" if q.dtype == torch.float32 else "half"]
    assert block_m % block_n == 0, "the causal split needs BLOCK_M to be a multiple of BLOCK_N"
    scale = d**-0.5 if scale is None else scale
    batch = cu_seqlens.numel() - 1
    grid = (triton.cdiv(int(max_seqlen), block_m), batch, n_heads)
    _attn_fwd[grid](
        q, k, v, out, cu_seqlens, cu_seqlens_k, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=n_heads // n_kv_heads, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 in, fp32-exact products out
        num_warps=num_warps, num_stages=num_stages)
    return out


def attention_with_past_triton(q, k, v, cu_seqlens, past, scale=None):
    """Triton flash attention over each sequence's cached prefix and itself; same contract as
    `attention_with_past_torch`. The prefix keys/values are laid before each sequence's own."""
    bounds = cu_seqlens.tolist()
    ks, vs, lengths = [], [], []
    for (s, e), (pk, pv) in zip(zip(bounds[:-1], bounds[1:]), past):
        ks += [pk, k[s:e]]
        vs += [pv, v[s:e]]
        lengths.append(pk.shape[0] + e - s)
    cu_k = torch.tensor([0, *lengths], device=q.device).cumsum(0, dtype=torch.int32)
    max_q = max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)
    return attention_triton(q, torch.cat(ks), torch.cat(vs), cu_seqlens, max(max_q, 1), True, scale, cu_seqlens_k=cu_k)
