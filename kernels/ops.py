"""m0lite's kernels: fused RMSNorm and variable-length flash attention (with or without a cached prefix).

Each op has a Triton kernel (`*_triton`) and a torch twin (`*_torch`) with the same
signature. `rms_norm`, `attention` and `attention_with_past` pick one per call: Triton for CUDA tensors,
the twin otherwise. M0LITE_KERNELS=triton|torch forces a choice (read once, at import, into `MODE`, which
tests and benchmarks may set); with TRITON_INTERPRET=1 set before import, Triton also runs on CPU tensors.
"""

import functools
import importlib
import os

import torch
import torch.nn.functional as F

from .reference import Past, attention_torch, attention_with_past_torch, rms_norm_torch

# The Triton kernels load on first use: importing triton is a large part of start-up, which a CPU-only process
# (running the torch twins) should not pay at start-up.
_TRITON = {"attention_triton": ".triton_attention", "attention_with_past_triton": ".triton_attention",
           "rms_norm_triton": ".triton_rms_norm"}


MODE = os.environ.get("M0LITE_KERNELS", "").strip().lower() or "auto"  # auto, triton or torch


@functools.cache
def _load(name):
    return getattr(importlib.import_module(_TRITON[name], __package__), name)


def __getattr__(name):  # `ops.attention_triton` and the others, loaded when first named
    if name in _TRITON:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _triton(name):
    return globals().get(name) or _load(name)  # a global of that name: a test's or a benchmark's stand-in


__all__ = ["Past", "cu_seqlens", "rms_norm", "attention", "attention_with_past", "causal_attention", "rms_norm_torch", "attention_torch",
           "attention_with_past_torch", "rms_norm_triton", "attention_triton", "attention_with_past_triton"]


def cu_seqlens(lengths: list[int], device=None) -> torch.Tensor:
    """The kernels' sequence boundaries: int32 (len(lengths) + 1,) offsets, 0 first."""
    return F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)


def _use_triton(x):
    if MODE == "auto":
        return x.is_cuda
    if MODE not in ("triton", "torch"):
        raise ValueError(f"M0LITE_KERNELS must be 'triton' or 'torch', got {MODE!r}")
    return MODE == "triton"


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last dim; with `residual`, returns (norm(x + residual), x + residual)."""
    fn = _triton("rms_norm_triton") if _use_triton(x) else rms_norm_torch
    return fn(x, weight, eps, residual)


def attention(q, k, v, cu_seqlens, max_seqlen, causal, scale=None):
    """Attention over a ragged batch (sequences side by side): q (total, n_heads, d), k, v (total, n_kv_heads, d)."""
    fn = _triton("attention_triton") if _use_triton(q) else attention_torch
    return fn(q, k, v, cu_seqlens, max_seqlen, causal, scale)


def attention_with_past(q, k, v, cu_seqlens, max_seqlen, past, scale=None):
    """Causal attention of each sequence over its cached prefix (`past`, a `Past`), then itself."""
    fn = _triton("attention_with_past_triton") if _use_triton(q) else attention_with_past_torch
    return fn(q, k, v, cu_seqlens, max_seqlen, past, scale)


def causal_attention(q, k, v, cu_seqlens, max_seqlen, past=None):
    """The decoder's attention: causal within each sequence, after its cached prefix's keys/values if
    `past` (a `Past`) is given."""
    if past is None:
        return attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
    return attention_with_past(q, k, v, cu_seqlens, max_seqlen, past)
