"""What every block of one pass shares, built once per pass: a block takes `(x, ctx)`.

A pass runs a ragged batch (sequences side by side, never padded) through a tower's blocks. Each block
needs the same few facts about it: where the sequences begin and end, the rotary angles of every row, and,
in the decoder, the keys and values of each sequence's cached prefix and which rows' outputs are wanted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kernels.ops import Past


@dataclass(frozen=True)
class Context:
    cos: torch.Tensor  # (rows, head_dim) rotary angles of each row (M-RoPE in the decoder, 2-D in the vision tower)
    sin: torch.Tensor
    cu_seqlens: torch.Tensor  # (sequences + 1,) int32 offsets of the sequences, on the rows' device
    max_seqlen: int  # the longest sequence, for the attention kernel's grid
    past: Past | None = None  # decoder: this layer's keys/values of each sequence's cached prefix
    out_rows: torch.Tensor | None = None  # decoder: compute only these rows' outputs (all when None)

    def at(self, **changes) -> "Context":
        """This pass's context with a layer's own fields (`past`, `out_rows`) set."""
        return replace(self, **changes)
