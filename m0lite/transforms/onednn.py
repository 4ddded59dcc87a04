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

import ctypes
import functools
import mmap
import sys

import torch
from torch import nn

from .epilogue import EpilogueLinear

CHUNK_ROWS = 256  # rows per matmul in the fast layers (chunked.py), which the blocked layout is tuned for


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        return frozenset(open("/proc/cpuinfo").read().split())
    except OSError:
        return frozenset()


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can run `OneDNNLinear` for this device and dtype."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops (inductor's CPU path uses them): a torch build without them just runs the plain math
        ops = torch.ops.mkldnn
        return bool(ops._is_mkldnn_bf16_supported()) and all(
            hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear(EpilogueLinear):
    """`lin` with its weight in oneDNN's blocked layout. It may compute a re-parametrised layer
    (the vision tower's rewrites, chunked.py): outputs in the order `rows` (a permutation of
    range(out)), and x (weight_scale W)^T + bias_scale b.

    `scratch`: a dict shared by layers converted together, where the reordered copy of a `rows`
    layer is made: one buffer per shape, so that the heap is not left with a hole per layer once
    the copies are freed."""

    def __init__(self, lin: nn.Linear, *, rows=None, weight_scale: float = 1.0, bias_scale: float = 1.0,
                 scratch: dict | None = None):
        super().__init__()
        w = lin.weight.detach()
        order = None if rows is None else torch.tensor(rows, device=w.device)
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


# ---- handing memory-mapped weight pages back --------------------------------------------------

_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's private file mappings (Linux)."""
    spans = []
    if not sys.platform.startswith("linux"):
        return spans
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            # address perms offset dev inode [path]; inode 0 means anonymous memory
            if len(parts) >= 6 and parts[4] != "0" and parts[1].endswith("p"):
                start, end = (int(a, 16) for a in parts[0].split("-"))
                spans.append((start, end))
    return spans


def release_mapped_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor that is a view of a memory-mapped file (the loader's
    safetensors views), so that a converted copy does not double the resident memory. The pages are
    clean copies of the file: if the tensor is read again they fault back in from it. Memory that is
    not file-backed (not inside one of `mapped`, from `file_mappings`) is left alone: there,
    dropping pages would zero the data. So a checkpoint converted at load (say fp32 on disk, bf16 in
    use) keeps both copies once packed; the published bf16 checkpoint in bf16 is mapped, and does not."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not any(s <= start and end <= e for s, e in mapped):
        return
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
