"""Linear layers with a CPU fast path: weights packed once for oneDNN, epilogues fused.

On CPU, `F.linear` hands oneDNN the weight in its plain (out, in) layout on every
call, while oneDNN's fastest (AMX) kernels want a blocked layout. `Linear.pack` lays
the weight out that way once (a copy; the mapped original's pages are handed back,
so resident memory does not grow). A packed layer also fuses what follows the
matmul into it (`silu`, `mul`, `add`), which spares the separate passes over the
(rows, 8960) activations that SwiGLU and the residual adds otherwise make.

Measured on a 2-core AMX Xeon at full size in bf16, one pass of 2,216 tokens through
one decoder layer: 183 ms plain, 169 ms in 256-row chunks (`rowwise`), 139 ms in
chunks on packed weights; one vision block over a 2,976-patch page: 182, 174, 148 ms.

Packed results differ from `F.linear` only in rounding (a fused epilogue rounds
once, from fp32), well inside bf16 noise. Packing is for bf16 on CPUs with
native bf16 (`packable`); elsewhere, and before packing, every method below is
the plain torch math the reference computes.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 256  # rows per chunk of `rowwise`, and so per matmul, which the packed layout is tuned for


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops (inductor's CPU path uses them): a torch build without them just runs unpacked
        ops = torch.ops.mkldnn
        return bool(ops._is_mkldnn_bf16_supported()) and all(
            hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, once `pack`ed
    packed_bias: torch.Tensor | None = None
    # A packed layer may compute a re-parametrised layer, set up by the module that owns it (see
    # VisionAttention and VisionMLP): its outputs in the order `rows` (a permutation of range(out)), and
    # x (weight_scale W)^T + bias_scale b. The plain methods ignore these.
    rows: tuple[int, ...] | None = None
    weight_scale = bias_scale = 1.0

    def pack(self, scratch: dict | None = None) -> None:
        """Lay the weight out for oneDNN. `scratch`: a dict shared by layers packed together, where the
        reordered copy of a `rows` layer is made: one buffer per shape, so that the heap is not left with
        a hole per layer once the copies are freed (0.15 GiB for the vision tower)."""
        w = self.weight.detach()
        order = None if self.rows is None else torch.tensor(self.rows, device=w.device)
        if order is not None:
            scratch = {} if scratch is None else scratch
            if (w.shape, w.dtype) not in scratch:
                scratch[w.shape, w.dtype] = torch.empty_like(w)
            w = torch.index_select(w, 0, order, out=scratch[w.shape, w.dtype])
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        if self.weight_scale != 1.0:
            # The blocked layout only moves elements (and pads with zeros), so scaling it in place scales the
            # weight, each element rounded once, without a temporary copy the heap would keep a hole for.
            packed.mul_(self.weight_scale)
        b = None if self.bias is None else self.bias.detach()
        if b is not None and order is not None:
            b = b[order]
        if b is not None and self.bias_scale != 1.0:
            b = b * self.bias_scale
        self.packed, self.packed_bias = packed, b

    def forward(self, x):
        """x W^T + b"""
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")

    def silu(self, x):
        """silu(x W^T + b)"""
        if self.packed is None:
            return F.silu(F.linear(x, self.weight, self.bias), inplace=True)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "swish", [], "")

    def mul(self, x, other):
        """(x W^T + b) * other"""
        if self.packed is None:
            return F.linear(x, self.weight, self.bias).mul_(other)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.packed_bias, "mul")

    def add(self, x, other):
        """(x W^T + b) + other: a residual connection."""
        if self.packed is None:
            return F.linear(x, self.weight, self.bias).add_(other)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.packed_bias, "add")


# Activation dtypes that `rowwise` chunks on CPU. In bf16 (oneDNN's AMX kernels) 256-row chunks are faster;
# in fp32 (MKL) one decoder layer over 2,216 tokens took 830 ms in chunks and 715 ms whole.
CHUNK_DTYPES = (torch.bfloat16, torch.float16)


def rowwise(fn, *xs: torch.Tensor):
    """fn(*xs) for a row-wise fn (row i of each output depends only on row i of each input), computed
    on CPU in bf16 in chunks of PACK_ROWS rows: there a chunk's activations, (256, 8960) in the decoder's
    MLP, stay in cache, and the wide matmuls and the elementwise work between them run faster than over
    thousands of rows at once. fn returns a tensor or a tuple of tensors."""
    first, n = xs[0], xs[0].shape[0]
    # Under torch.compile the graph fuses the elementwise work itself, and a loop over a dynamic n would
    # specialise the graph on n.
    if first.device.type != "cpu" or first.dtype not in CHUNK_DTYPES or n <= PACK_ROWS or torch.compiler.is_compiling():
        return fn(*xs)
    outs = None
    for s in range(0, n, PACK_ROWS):
        ys = fn(*(x[s:s + PACK_ROWS] for x in xs))
        one = isinstance(ys, torch.Tensor)
        ys = (ys,) if one else ys
        if outs is None:
            # 3-D outputs, the (rows, heads, head_dim) queries, keys and values, are stored heads-major:
            # attention then reads each head's rows as one block (about 5% faster on CPU).
            outs = [y.new_empty((y.shape[1], n, y.shape[2])).transpose(0, 1) if y.dim() == 3 else
                    y.new_empty((n, *y.shape[1:])) for y in ys]
        for out, y in zip(outs, ys):
            out[s:s + PACK_ROWS] = y
    return outs[0] if one else tuple(outs)


def pack_linears(module: nn.Module) -> int:
    """Pack every not yet packed `Linear` in `module`; the number packed."""
    todo = [m for m in module.modules() if isinstance(m, Linear) and m.packed is None]
    mapped, scratch = _file_mappings(), {}
    for m in todo:
        m.pack(scratch)
        release_mapped_pages(m.weight, mapped)  # from now on only `packed` is read
    return len(todo)


# ---- handing memory-mapped weight pages back --------------------------------------------------

_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _file_mappings() -> list[tuple[int, int]]:
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
    safetensors views), so that a packed copy does not double the resident memory. The pages are
    clean copies of the file: if the tensor is read again they fault back in from it. Memory that is
    not file-backed (not inside one of `mapped`, from `_file_mappings`) is left alone: there,
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
