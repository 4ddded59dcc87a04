"""The process's resident memory: pages of memory-mapped weights handed back, freed heap returned.

The loader maps checkpoint files (weights/safetensors_mmap.py): a tensor's pages
join the resident set when it is read, and stay. Two kinds of tensor are read
and then not needed resident: a weight that a transform has copied into another
layout (from then on only the copy is read), and a lookup table of which a pass
reads a few rows (the token embeddings). `release_mapped_pages` drops such a
tensor's pages from the resident set; they are clean copies of the file, still
in the page cache, and fault back in if read again.

A tower whose weights are stored in another dtype than the model runs in (the
published bf16 checkpoint run in fp32, where bf16 is not native) can stay the
file's mapped tensors until its first pass (`convert_on_first_pass`): a text-only
process never reads the vision tower, and never holds its converted copy.

glibc keeps freed memory in its heaps; `trim_heap` returns what they hold free
(after loading, what the tokenizer's parsing left).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
import weakref

import torch
from torch import nn

_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL and the reads fault page by page as before
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tower -> (dtype, its hook's handle)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (then nothing here does anything)."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.malloc_trim  # noqa: B018 -- glibc only
        return lib
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Return the heaps' free memory to the operating system (glibc's malloc_trim)."""
    if libc() is not None:
        libc().malloc_trim(0)


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


def _span(t: torch.Tensor) -> tuple[int, int]:
    """(start, end) addresses of t's memory (a contiguous tensor's)."""
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def is_mapped(t: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    """Whether t's memory lies inside one of `mapped` (from `file_mappings`)."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    start, end = _span(t)
    return any(s <= start and end <= e for s, e in mapped)


def release_mapped_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor that is a view of a memory-mapped file (the loader's
    safetensors views), so that a converted copy does not double the resident memory. The pages are
    clean copies of the file: if the tensor is read again they fault back in from it. Memory that is
    not file-backed (not inside one of `mapped`) is left alone: there, dropping pages would zero the
    data. So a checkpoint converted at load (say fp32 on disk, bf16 in use) keeps both copies once
    packed; the published bf16 checkpoint in bf16 is mapped, and does not."""
    if is_mapped(t, mapped):
        _drop_pages(t)


def populate(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Before a tensor of a memory-mapped file is read whole (converted, quantised): map all its pages in one
    call instead of one fault per 4 KiB page. Converting a bf16 checkpoint to fp32 at load took twice as
    long without it (bench/RESULTS.md, "fp32 where bf16 is not native")."""
    if libc() is not None and is_mapped(t, mapped):
        lo, hi = _pages(t, outer=True)
        libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_READ)


def converted(t: torch.Tensor, mapped: list[tuple[int, int]], dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """t in `dtype` on `device`: t itself where it is already (a mapped tensor stays a view of its file); else a
    copy, for which a mapped t is read whole at once (`populate`) and its pages then handed back, so that the
    copy does not sit beside the file's pages in the resident set."""
    if t.dtype == dtype and t.device == torch.device(device):
        return t
    populate(t, mapped)
    copy = t.to(device=device, dtype=dtype)
    release_mapped_pages(t, mapped)
    return copy


def _pages(t: torch.Tensor, outer: bool) -> tuple[int, int]:
    """The page-aligned span of t's memory: the pages it touches (outer), or those wholly inside it."""
    start, end = _span(t)
    page = mmap.PAGESIZE
    if outer:
        return start // page * page, -(-end // page) * page
    return -(-start // page) * page, end // page * page


def _drop_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside t: for file-backed memory only."""
    if libc() is None:
        return
    lo, hi = _pages(t, outer=False)  # whole pages inside the tensor only: a neighbour may still be in use
    if hi > lo:
        libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


class LookupPages:
    """Hands back the pages a lookup read from a memory-mapped table. A pass reads a few rows of the
    token embeddings, but each page it touches brings its neighbours in too (the kernel maps up to 64 KiB
    around a fault from the page cache): varied text leaves most of the table resident (bench/RESULTS.md,
    "Lean mode, fifth pass"). Dropping them costs a minor fault per page on the next lookup.
    Sound because nothing writes a loaded weight in place: in the private mapping a written page would be
    this process's own copy, and dropping it would lose the write."""

    def __init__(self):
        self._table: torch.Tensor | None = None
        self._mapped = False

    def __call__(self, table: torch.Tensor) -> None:
        if table is not self._table:  # a new table (loaded, or converted): is it file-backed?
            self._table, self._mapped = table, is_mapped(table, file_mappings())
        if self._mapped:
            _drop_pages(table)


def convert_on_first_pass(tower: nn.Module, dtype: torch.dtype) -> None:
    """Leave the tower's floating-point weights as they are (the file's mapped tensors) and convert them
    to `dtype` just before its first pass, whoever calls it. Exact: the same conversion, done later."""
    handle = tower.register_forward_pre_hook(lambda module, args: convert_pending(module))
    _PENDING[tower] = (dtype, handle)


def convert_pending(tower: nn.Module) -> None:
    """Convert a tower left by `convert_on_first_pass` now (a transform calls it before reading the
    weights); the file's pages are handed back as each weight is converted. A no-op otherwise."""
    if tower not in _PENDING:
        return
    dtype, handle = _PENDING.pop(tower)
    handle.remove()
    mapped = file_mappings()
    with torch.no_grad():
        for p in tower.parameters():
            if p.is_floating_point():
                p.data = converted(p.data, mapped, dtype, p.device)
