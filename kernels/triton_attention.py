"""Flash-attention forward over variable-length sequences side by side (a ragged batch), in Triton.

After Triton's fused-attention tutorial (FlashAttention-2, Dao 2023,
https://arxiv.org/abs/2307.08691): a program owns BLOCK_M query rows of one head of
one sequence, keeps them and the running output in registers, and streams the
sequence's keys and values through in blocks of BLOCK_N with an online softmax, so
the (L, L) score matrix never exists in memory.

Sequences lie back to back (no padding) and are delimited by `cu_seqlens`; each
attends only to itself (block-diagonal), causally for the decoder and bidirectionally
for the vision tower. With a cached prefix (the document cache), sequence i first
reads the keys/values of its prefix from a second packed tensor, delimited by its own
offsets, all of them visible to every query, then its own keys.

head_dim need not be a power of two: it is split into a power-of-two part D1 and a
rest D2 (the vision tower's 80 = 64 + 16), and each product is the sum of one dot per
part, so no lane of a 128-wide tile is padding. A rest that is not itself a power of
two is padded with masked loads.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import Past  # noqa: F401  (the prefixes' container, shared with the twin)
from .triton_rms_norm import check_device


@triton.jit
def _attn_fwd_inner(acc, acc2, l_i, m_i, q, q2, k_ptrs, v_ptrs, k2_ptrs, v2_ptrs, d2_mask,
                    stride_kt, stride_vt, lo, hi, offs_m, offs_n, seqlen, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys/values [lo, hi) into the running softmax state (m_i, l_i, acc, acc2).

    m_i: running row max of the scaled scores (log2 units), l_i: running sum of
    2**(s - m_i), acc (acc2): running sum of 2**(s - m_i) * v over head dims [0, D1)
    ([D1, d)). When the max grows, the old sums are rescaled by alpha = 2**(m_old - m_new).
    MASKED blocks may hold keys past `seqlen` or (CAUSAL) after the query; other blocks
    skip masking.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if MASKED:
            kv_rows = (start_n + offs_n)[:, None] < seqlen
            k = tl.load(k_ptrs + start_n * stride_kt, mask=kv_rows, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N), fp32
        if SPLIT:
            if MASKED:
                k2 = tl.load(k2_ptrs + start_n * stride_kt, mask=kv_rows & d2_mask[None, :], other=0.0)
            else:
                k2 = tl.load(k2_ptrs + start_n * stride_kt, mask=d2_mask[None, :], other=0.0)
            if UPCAST:
                k2 = k2.to(tl.float32)
            qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PRECISION)
        if MASKED:
            offs_kn = start_n + offs_n
            keep = offs_kn[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_kn[None, :])
            # A row's first visited block always holds a key it may see (key 0, or its
            # own position), so m_ij is finite and masked scores give exp2(-inf) = 0, not NaN.
            qk = tl.where(keep, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=kv_rows, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        if UPCAST:
            v = v.to(tl.float32)
        # p is rounded to v's dtype so the second matmul runs on fp16/bf16 tensor cores.
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        if SPLIT:
            if MASKED:
                v2 = tl.load(v2_ptrs + start_n * stride_vt, mask=kv_rows & d2_mask[None, :], other=0.0)
            else:
                v2 = tl.load(v2_ptrs + start_n * stride_vt, mask=d2_mask[None, :], other=0.0)
            if UPCAST:
                v2 = v2.to(tl.float32)
            acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, acc2, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, cu_seqlens, PK, PV, cu_past, qk_scale,
              stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
              stride_pkt, stride_pkh, stride_pvt, stride_pvh,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAST: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[i, h] = sum_j softmax_j(q[i, h] . k[j, h // GROUP] * scale) v[j, h // GROUP],

    j over the keys of i's sequence (j <= i when CAUSAL), preceded when HAS_PAST by all
    keys of its prefix in PK/PV. qk_scale = scale * log2(e), so the softmax uses exp2.
    Head dims [0, D1) and [D1, HEAD_DIM) are separate tiles (D2 = 0: no second part).
    Grid: (query blocks, sequences, query heads).
    """
    SPLIT: tl.constexpr = D2 > 0
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows (the last blocks) start first, so no long block is left for the end
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + seq).to(tl.int64)
    seqlen = (tl.load(cu_seqlens + seq + 1) - seq_start).to(tl.int32)
    if start_m >= seqlen:  # the grid is sized for the longest sequence
        return
    kv_head = head // GROUP  # the GROUP consecutive query heads of a kv group share it

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D1)
    # The rest of the head dim; its tile is at least 16 wide (tl.dot's minimum) and masked.
    offs_d2 = D1 + tl.arange(0, D2 if SPLIT else 16)
    d2_mask = offs_d2 < HEAD_DIM
    m_mask = offs_m[:, None] < seqlen
    q_rows = Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh

    # The query block and the running state stay in registers for the whole loop.
    q = tl.load(q_rows + offs_d[None, :], mask=m_mask, other=0.0)
    if SPLIT:
        q2 = tl.load(q_rows + offs_d2[None, :], mask=m_mask & d2_mask[None, :], other=0.0)
    else:  # never read: SPLIT=False compiles every use out
        q2 = tl.zeros([BLOCK_M, 16], dtype=q.dtype)
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong, so compute in fp32
        q = q.to(tl.float32)
        q2 = q2.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2 if SPLIT else 16], dtype=tl.float32)

    # Stage 0: the cached prefix. Every query sees all of it: only its ragged tail is masked.
    if HAS_PAST:
        p_start = tl.load(cu_past + seq).to(tl.int64)
        p_len = (tl.load(cu_past + seq + 1) - p_start).to(tl.int32)
        pk_rows = PK + (p_start + offs_n[:, None]) * stride_pkt + kv_head * stride_pkh
        pv_rows = PV + (p_start + offs_n[:, None]) * stride_pvt + kv_head * stride_pvh
        p_full = (p_len // BLOCK_N) * BLOCK_N
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, pk_rows + offs_d[None, :], pv_rows + offs_d[None, :],
            pk_rows + offs_d2[None, :], pv_rows + offs_d2[None, :], d2_mask, stride_pkt, stride_pvt,
            0, p_full, offs_m, offs_n, p_len, qk_scale, False, False, BLOCK_N, SPLIT, UPCAST, DOT_PRECISION)
        acc, acc2, l_i, m_i = _attn_fwd_inner(
            acc, acc2, l_i, m_i, q, q2, pk_rows + offs_d[None, :], pv_rows + offs_d[None, :],
            pk_rows + offs_d2[None, :], pv_rows + offs_d2[None, :], d2_mask, stride_pkt, stride_pvt,
            p_full, p_len, offs_m, offs_n, p_len, qk_scale, True, False, BLOCK_N, SPLIT, UPCAST, DOT_PRECISION)

    # Stage 1: key blocks that every row of the block may see in full, no masks.
    # Stage 2: the rest, masked: the diagonal blocks (causal) or the ragged tail.
    # Causal blocks past the diagonal are never visited.
    if CAUSAL:
        full_hi = start_m  # BLOCK_M is a multiple of BLOCK_N: every row sees the keys before its block
        masked_hi = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
        masked_hi = seqlen
    k_rows = K + (seq_start + offs_n[:, None]) * stride_kt + kv_head * stride_kh
    v_rows = V + (seq_start + offs_n[:, None]) * stride_vt + kv_head * stride_vh
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_rows + offs_d[None, :], v_rows + offs_d[None, :],
        k_rows + offs_d2[None, :], v_rows + offs_d2[None, :], d2_mask, stride_kt, stride_vt,
        0, full_hi, offs_m, offs_n, seqlen, qk_scale, False, CAUSAL, BLOCK_N, SPLIT, UPCAST, DOT_PRECISION)
    acc, acc2, l_i, m_i = _attn_fwd_inner(
        acc, acc2, l_i, m_i, q, q2, k_rows + offs_d[None, :], v_rows + offs_d[None, :],
        k_rows + offs_d2[None, :], v_rows + offs_d2[None, :], d2_mask, stride_kt, stride_vt,
        full_hi, masked_hi, offs_m, offs_n, seqlen, qk_scale, True, CAUSAL, BLOCK_N, SPLIT, UPCAST, DOT_PRECISION)

    # Epilogue: normalise once at the end instead of every step.
    o_rows = Out + (seq_start + offs_m[:, None]) * stride_ot + head * stride_oh
    tl.store(o_rows + offs_d[None, :], (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=m_mask)
    if SPLIT:
        tl.store(o_rows + offs_d2[None, :], (acc2 / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=m_mask & d2_mask[None, :])


# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for fp16/bf16 on Hopper, by (head-dim tile
# width, causal, length bucket). BLOCK_M must be a multiple of BLOCK_N (the causal split).
# Short sequences (max_seqlen <= SHORT: rerank documents, small images) take 64-row query
# tiles, so a batch of them still makes enough programs to fill every SM; long causal ones take
# 128-row tiles, which reuse each K/V block for twice as many queries. Long bidirectional ones (page
# images, up to 3,136 patches) stay at 64x64: on an H200 it beat 128x64 and 128x128 on two pages
# (bench/RESULTS.md, the sweep before tuning).
SHORT = 2048
_HALF = {
    (128, True, "short"): (64, 64, 4, 3), (128, True, "long"): (128, 64, 8, 3),
    (128, False, "short"): (64, 64, 4, 3), (128, False, "long"): (128, 64, 8, 3),
    (80, True, "short"): (64, 64, 4, 3), (80, True, "long"): (128, 64, 8, 3),
    (80, False, "short"): (64, 64, 4, 3), (80, False, "long"): (64, 64, 4, 3),
    (64, True, "short"): (64, 64, 4, 3), (64, True, "long"): (128, 64, 8, 3),
    (64, False, "short"): (64, 64, 4, 3), (64, False, "long"): (64, 64, 4, 3),
}
# fp32 runs exact (non-tensor-core) products, which need far more registers: small
# tiles keep the spills small; fp32 is for tests, not speed. The interpreter gets fixed
# mid-size tiles: it runs each block op in numpy, and they still leave ragged edges.
# Head dims wider than 128 take the small tile too.
FP32, INTERPRET = (32, 16, 4, 2), (64, 32, 4, 1)


def head_dim_split(d):
    """(D1, D2): D1 the largest power of two <= d, D2 the rest rounded up to a power of two >= 16
    (0 when there is no rest); e.g. 128 -> (128, 0), 80 -> (64, 16), 96 -> (64, 32), 72 -> (64, 16)."""
    d1 = 1 << (d.bit_length() - 1)
    return (d1, 0) if d == d1 else (d1, max(triton.next_power_of_2(d - d1), 16))


def pick_config(head_dim, causal, dtype, max_seqlen, interpret=False):
    """The tile for one call: deterministic, from the table above."""
    if interpret:
        return INTERPRET
    d1, d2 = head_dim_split(head_dim)
    width = d1 + d2
    if dtype == torch.float32 or width > 128:
        return FP32
    return _HALF[(128 if width > 96 else 80 if width > 64 else 64, bool(causal),
                  "short" if max_seqlen <= SHORT else "long")]


def _check(q, k, v, cu_seqlens, past):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: q, k, v must be (tokens, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    total, n_heads, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if k.shape[0] != total:
        raise ValueError(f"attention: q has {total} tokens but k, v have {k.shape[0]}")
    if k.shape[2] != d:
        raise ValueError(f"attention: head_dim of q ({d}) and k, v ({k.shape[2]}) differ")
    if n_heads % k.shape[1]:
        raise ValueError(f"attention: {n_heads} query heads are not a multiple of {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 16 <= d <= 256:
        raise ValueError(f"attention: head_dim {d} outside 16..256 (tl.dot's minimum; the tile must fit in registers)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"attention: cu_seqlens must be a 1-D int32 tensor of batch+1 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    tensors = [("q", q), ("k", k), ("v", v)]
    if past is not None:
        if past.k.shape != past.v.shape or past.k.shape[1:] != k.shape[1:] or past.k.dtype != k.dtype \
                or past.v.dtype != k.dtype:
            raise ValueError(f"attention: past k {tuple(past.k.shape)} {past.k.dtype}, v {tuple(past.v.shape)} "
                             f"{past.v.dtype} must match k, v in heads, head_dim and dtype ({tuple(k.shape)} {k.dtype})")
        if past.cu_seqlens.shape != cu_seqlens.shape or past.cu_seqlens.dtype != torch.int32:
            raise ValueError(f"attention: past.cu_seqlens must be int32 of shape {tuple(cu_seqlens.shape)}, got "
                             f"{past.cu_seqlens.dtype} of shape {tuple(past.cu_seqlens.shape)}")
        tensors += [("past k", past.k), ("past v", past.v)]
    for name, t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in head_dim, got strides {t.stride()}")
    check_device(_attn_fwd, q, k, v, cu_seqlens, *(() if past is None else past))


def _launch(q, k, v, cu_seqlens, max_seqlen, causal, scale, past, config):
    _check(q, k, v, cu_seqlens, past)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    total, n_heads, d = q.shape
    if total == 0:
        return out
    if int(max_seqlen) < 1:
        raise ValueError(f"attention: max_seqlen must be >= 1 for {total} tokens, got {max_seqlen}")
    interpret = isinstance(_attn_fwd, InterpretedFunction)
    block_m, block_n, num_warps, num_stages = config or pick_config(d, causal, q.dtype, int(max_seqlen), interpret)
    if block_m % block_n:
        raise ValueError(f"attention: BLOCK_M {block_m} must be a multiple of BLOCK_N {block_n} (the causal split)")
    has_past = past is not None and past.k.shape[0] > 0
    pk, pv, cu_past = (past.k, past.v, past.cu_seqlens) if has_past else (k, v, cu_seqlens)  # unused if not has_past
    d1, d2 = head_dim_split(d)
    scale = d**-0.5 if scale is None else scale
    grid = (triton.cdiv(int(max_seqlen), block_m), cu_seqlens.numel() - 1, n_heads)
    _attn_fwd[grid](
        q, k, v, out, cu_seqlens, pk, pv, cu_past, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1),
        GROUP=n_heads // k.shape[1], HEAD_DIM=d, D1=d1, D2=d2,
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), HAS_PAST=has_past,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 in, fp32-exact products out
        num_warps=num_warps, num_stages=num_stages)
    return out


def attention_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale=None, *, config=None):
    """Triton flash attention; same contract as `attention_torch`.

    q: (total, n_heads, d), k, v: (total, n_kv_heads, d), fp16/bf16/fp32, each
    contiguous in d; cu_seqlens: int32 (batch+1,) on q's device, with
    cu_seqlens[-1] == total and max_seqlen >= every sequence length (not checked:
    reading cu_seqlens back would stall the GPU). `config` = (BLOCK_M, BLOCK_N, num_warps,
    num_stages) overrides the table's tile, for benchmark sweeps.
    """
    return _launch(q, k, v, cu_seqlens, max_seqlen, causal, scale, None, config)


def attention_with_past_triton(q, k, v, cu_seqlens, max_seqlen, past, scale=None, *, config=None):
    """Triton flash attention of each sequence over its cached prefix (`past`, a `Past`) and itself,
    causal within itself; same contract as `attention_with_past_torch`. One launch, no host sync:
    the prefixes are read in place from `past`, and max_seqlen (of the new tokens) comes from the caller."""
    return _launch(q, k, v, cu_seqlens, max_seqlen, True, scale, past, config)
