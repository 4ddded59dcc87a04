"""Linear layers whose weights are laid out once for oneDNN, with what follows the matmul fused in.

On CPU, `F.linear` hands oneDNN the weight in its plain (out, in) layout on every
call, while oneDNN's fastest kernels want a blocked layout. `OneDNNLinear` lays the
weight out that way once (a copy; the mapped original's pages are handed back, so
resident memory does not grow) and fuses what follows the matmul into it (`silu`,
`mul`, `add`), which spares separate passes over the (rows, 8960) activations that
SwiGLU and the residual adds otherwise make.

Results differ from `F.linear` only in rounding (a fused epilogue rounds once, from
fp32), well inside bf16 noise. This is for bf16 on CPUs with native bf16 (`packable`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import cpu
from .epilogue import EpilogueLinear

CHUNK_ROWS = 256  # rows per matmul in the fast layers (chunked.py), which the blocked layout is tuned for


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can run `OneDNNLinear` for this device and dtype, and whether it pays.
    Only bf16 on a CPU with native bf16: in fp32 (the default elsewhere) plain `F.linear` on the (out, in)
    weight, which runs MKL's sgemm, is as fast as or faster than oneDNN's or MKL's packed layouts, whole or in
    chunks (bench/fp32_linears.py), so fp32 keeps the plain math."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not cpu.native_bf16() or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops (inductor's CPU path uses them): a torch build without them just runs the plain math
        ops = torch.ops.mkldnn
        return bool(ops._is_mkldnn_bf16_supported()) and all(
            hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear(EpilogueLinear):
    """`lin` with its weight in oneDNN's blocked layout. It may compute a re-parametrised layer
    (the vision tower's rewrites, chunked.py): outputs in the order `out_order` (a permutation of
    range(out)), and x (weight_scale W)^T + bias_scale b.

    `scratch`: a dict shared by layers converted together, where the reordered copy of an `out_order`
    layer is made: one buffer per shape, so that the heap is not left with a hole per layer once
    the copies are freed."""

    def __init__(self, lin: nn.Linear, *, out_order=None, weight_scale: float = 1.0, bias_scale: float = 1.0,
                 scratch: dict | None = None):
        super().__init__()
        w = lin.weight.detach()
        order = None if out_order is None else torch.tensor(out_order, device=w.device)
        if order is not None:
            scratch = {} if scratch is None else scratch
            if (w.shape, w.dtype) not in scratch:
                scratch[w.shape, w.dtype] = torch.empty_like(w)
            w = torch.index_select(w, 0, order, out=scratch[w.shape, w.dtype])
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, CHUNK_ROWS)
        if weight_scale != 1.0:
            # The blocked layout only moves elements (and pads with zeros), so scaling it in place scales the
            # weight, each element rounded once, without a temporary copy the heap would keep a hole for.
            self.packed.mul_(weight_scale)
        b = None if lin.bias is None else lin.bias.detach()
        if b is not None and order is not None:
            b = b[order]
        if b is not None and bias_scale != 1.0:
            b = b * bias_scale
        self.bias = b
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def silu(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "swish", [], "")

    def mul(self, x, other):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "mul")

    def add(self, x, other):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "add")
