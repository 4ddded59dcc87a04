"""Fused RMSNorm (optionally with the residual add before it) in Triton.

One program normalises one row: the whole row sits in registers, so x is read
once and y written once; with a residual, h = x + residual is also written once,
which saves the separate add kernel and its extra round trip through memory.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _rms_norm_fwd(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, n_cols, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: h = x[i] (+ r[i], rounded to x's dtype); y[i] = w * (h * rsqrt(mean(h**2) + eps)).

    Statistics are in fp32; the normalised row is rounded to x's dtype before the
    multiply by w, as transformers' Qwen2RMSNorm does.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols  # BLOCK is the next power of two >= n_cols
    # Elementwise math is done in fp32 and rounded back explicitly: it matches torch,
    # which also computes fp16/bf16 adds in fp32, and it keeps the interpreter honest
    # (its bf16 arithmetic is wrong).
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)  # masked lanes are 0: they add nothing
    y = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, w * y, mask=mask)


def rms_norm_triton(x, weight, eps, residual=None):
    """Triton RMSNorm over the last dim of x (..., hidden); see `rms_norm_torch` for the math.

    Returns y, or (y, x + residual) when `residual` is given. y has the dtype of
    `weight * x` (torch's promotion), h has x's dtype.
    """
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n},) for x of shape {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"rms_norm: {name} must be contiguous in its last dim, got strides {t.stride()}")
    check_device(_rms_norm_fwd, x, weight, residual)

    x2 = x.reshape(-1, n)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    y2 = y.view(-1, n)
    if residual is None:
        r2 = h2 = x2  # unused: HAS_RESIDUAL=False compiles them out
    else:
        r2 = residual.reshape(-1, n)
        h = torch.empty_like(x)
        h2 = h.view(-1, n)

    block = triton.next_power_of_2(n)
    # Enough warps that each thread holds a handful of elements (4-8 for 1536/1280).
    num_warps = min(max(block // 256, 1), 16)
    if x2.shape[0] > 0:
        _rms_norm_fwd[(x2.shape[0],)](
            x2, r2, weight, y2, h2, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    return y if residual is None else (y, h)


def check_device(kernel, *tensors):
    """Triton needs CUDA tensors, or CPU tensors when `kernel` was built by the interpreter.

    The interpreter is chosen when @triton.jit runs, i.e. by TRITON_INTERPRET=1 at import.
    """
    tensors = [t for t in tensors if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"kernel inputs are on different devices: {[str(t.device) for t in tensors]}")
    if not tensors[0].is_cuda and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {tensors[0].device}); "
                           "set TRITON_INTERPRET=1 before importing kernels to run them on CPU")
