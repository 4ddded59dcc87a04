"""m0lite's kernels: fused RMSNorm and packed variable-length flash attention.

Each op has a Triton kernel (`*_triton`) and a torch twin (`*_torch`) with the same
signature. `rms_norm` and `attention` pick one per call: Triton for CUDA tensors,
the twin otherwise. M0LITE_KERNELS=triton|torch forces a choice (read at call
time); with TRITON_INTERPRET=1 set before import, Triton also runs on CPU tensors.
"""

import importlib
import os

from .reference import attention_torch, rms_norm_torch

# The Triton kernels load on first use: importing triton takes ~0.15 s, which a CPU-only process
# (running the torch twins) should not pay at start-up.
_TRITON = {"attention_triton": ".triton_attention", "rms_norm_triton": ".triton_rms_norm"}


def __getattr__(name):
    if name in _TRITON:
        fn = getattr(importlib.import_module(_TRITON[name], __name__), name)
        globals()[name] = fn  # later lookups find it without coming here
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _triton(name):
    return globals().get(name) or __getattr__(name)


__all__ = ["rms_norm", "attention", "rms_norm_torch", "attention_torch", "rms_norm_triton", "attention_triton"]


def _use_triton(x):
    mode = os.environ.get("M0LITE_KERNELS", "").strip().lower()
    if mode in ("", "auto"):
        return x.is_cuda
    if mode not in ("triton", "torch"):
        raise ValueError(f"M0LITE_KERNELS must be 'triton' or 'torch', got {mode!r}")
    return mode == "triton"


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm over the last dim; with `residual`, returns (norm(x + residual), x + residual)."""
    fn = _triton("rms_norm_triton") if _use_triton(x) else rms_norm_torch
    return fn(x, weight, eps, residual)


def attention(q, k, v, cu_seqlens, max_seqlen, causal, scale=None):
    """Attention over packed sequences: q (total, n_heads, d), k, v (total, n_kv_heads, d)."""
    fn = _triton("attention_triton") if _use_triton(q) else attention_torch
    return fn(q, k, v, cu_seqlens, max_seqlen, causal, scale)
