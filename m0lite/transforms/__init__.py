"""Transforms: faster or smaller forms of a loaded model, applied from outside its math files.

The model files (decoder.py, vision.py, model.py) hold the math once. A transform
rewrites a loaded model by swapping its modules and rewriting their weights; the
model's own loops then run the new modules unchanged. The reranker picks them
once, from its options, and `FastForms` (fast_forms.py) applies them tower by
tower when a tower's work calls for it:

- `pack_weights(tower)` (`pack_weights=`): the CPU fast path for bf16. Every block
  of the tower in its chunked fast form (chunked.py) on linears whose weights are
  laid out for oneDNN, with fused epilogues (onednn.py).
- `rewrite_fp32(tower)`: the same blocks' rewrites on plain fp32 linears, for the
  vision tower in fp32 on CPU (where bf16 is not native).
- `int8.prepare(tower, compute)` (`quantize="int8"`): int8 weights with
  per-channel scales in every linear of the tower, and per-token ones in the token
  embeddings (int8.py); then the same chunked fast form on the int8 linears.
- `compile_blocks(model)` (`compile=True`): torch.compile of each block.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import cpu
from ..memory import convert_pending, file_mappings, release_mapped_pages
from . import chunked
from .epilogue import PlainLinear
from .onednn import OneDNNLinear, packable

__all__ = ["pack_weights", "packable", "rewrite_fp32", "compile_blocks"]


def pack_weights(tower: nn.Module) -> int:
    """The tower's blocks in their fast form on oneDNN-packed bf16 weights; the blocks converted. The
    mapped pages of the original weights are handed back, so resident memory does not grow."""
    convert_pending(tower)  # a tower the loader left as stored is laid out from the model's dtype
    mapped, scratch = file_mappings(), {}

    def make(lin: nn.Linear, **rewrite) -> OneDNNLinear:
        fast = OneDNNLinear(lin, scratch=scratch, **rewrite)
        release_mapped_pages(lin.weight, mapped)  # from now on only the packed copy is read
        return fast

    return chunked.apply(tower, make)


def rewrite_fp32(tower: nn.Module) -> int:
    """The tower's blocks in their fast form on plain fp32 linears (`PlainLinear`, MKL's sgemm): the in-place
    epilogues, QuickGELU folded into fc1 and the rotary pairs side by side, with no packed layout (none
    measured faster in fp32, bench/fp32_linears.py); a pass of more than chunked.FP32_CHUNK_ROWS rows is cut
    into chunks for memory. A linear the rewrite changes is a copy; the mapped original's pages are handed back."""
    convert_pending(tower)  # as in pack_weights
    mapped = file_mappings()

    def make(lin: nn.Linear, **rewrite) -> PlainLinear:
        fast = PlainLinear(lin, **rewrite)
        if fast.weight.data_ptr() != lin.weight.data_ptr():
            release_mapped_pages(lin.weight, mapped)
        return fast

    return chunked.apply(tower, make)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each vision block and decoder layer (one graph per block type, dynamic shapes).
    On CPU it fuses the elementwise work around the matmuls (rotary, norms, activations); it pays
    where that work is large (the vision tower), at the cost of compiling on the first call."""
    if (bits := cpu.vector_bits()) is not None:  # a masked CPU (M0LITE_CPU_ISA): code of its width
        from torch._inductor import config as inductor

        inductor.cpp.simdlen = bits
    for block in [*model.visual.blocks, *model.model.layers]:
        block.forward = torch.compile(block.forward, dynamic=True)
