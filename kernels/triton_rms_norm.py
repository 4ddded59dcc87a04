"""Fused RMSNorm (optionally with the residual add before it) in Triton.

One program normalises BLOCK_ROWS rows: each row sits whole in registers, so x is read
once and y written once; with a residual, h = x + residual is also written once,
which saves the separate add kernel and its extra round trip through memory. Several
rows per program keep each thread busy with a few vector loads per row without
launching one small program per row.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _rms_norm_fwd(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, n_rows, n_cols, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Row i: h = x[i] (+ r[i], rounded to x's dtype); y[i] = w * (h * rsqrt(mean(h**2) + eps)).

    Statistics are in fp32; the normalised row is rounded to x's dtype before the
    multiply by w, as transformers' Qwen2RMSNorm does. Grid: cdiv(n_rows, BLOCK_ROWS).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # BLOCK is the next power of two >= n_cols
    # Elementwise math is done in fp32 and rounded back explicitly: it matches torch,
    # which also computes fp16/bf16 adds in fp32, and it keeps the interpreter honest
    # (its bf16 arithmetic is wrong).
    h = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (h + r).to(X.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)  # masked lanes are 0: they add nothing
    y = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], w[None, :] * y, mask=mask)


def pick_config(n_cols, n_rows):
    """(BLOCK_ROWS, num_warps) for rows of n_cols: up to 8K elements a program (4 rows of 1536 or
    1280, padded to 2048) over 8 warps, at most 32 fp32 values a thread; fewer rows a program when
    there are too few rows for two programs per SM (132 SMs on an H200)."""
    block = triton.next_power_of_2(n_cols)
    rows = max(1, min(8192 // block, 16))
    while rows > 1 and triton.cdiv(n_rows, rows) < 264:
        rows //= 2
    return rows, min(max(block * rows // 256, 1), 8)


def rms_norm_triton(x, weight, eps, residual=None, *, config=None):
    """Triton RMSNorm over the last dim of x (..., hidden); see `rms_norm_torch` for the math.

    Returns y, or (y, x + residual) when `residual` is given. y has the dtype of
    `weight * x` (torch's promotion), h has x's dtype. `config` = (BLOCK_ROWS, num_warps)
    overrides the choice of `pick_config`, for benchmark sweeps.
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

    n_rows = x2.shape[0]
    block_rows, num_warps = config or pick_config(n, n_rows)
    if n_rows > 0:
        _rms_norm_fwd[(triton.cdiv(n_rows, block_rows),)](
            x2, r2, weight, y2, h2, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), n_rows, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK=triton.next_power_of_2(n),
            num_warps=num_warps)
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
