"""When each tower of a loaded model takes its fast form: the one policy the reranker and explain follow.

A tower's fast form is its packed bf16 weights (`pack_weights`, bf16 on a CPU with native bf16), in fp32 on
CPU the vision tower's block rewrites on its plain weights (`rewrite_fp32`), or, in the lean mode, its
prepared int8 weights (`int8.prepare`). Laying weights out costs a one-time copy and makes
every later pass faster, so, as one rents skis until the rent would have bought them, a tower is packed once
it has run PACK_AFTER_ROWS rows (tokens or patches) in all: a short-lived process scoring a few pairs never
pays for it, a server pays it once. The lean mode prepares a tower before its first pass (the decoder at
once), so that a text-only process never reads the vision tower's weights.

Before every pass through a tower, its caller says so (`before_pass`); `pack` puts towers in their fast form
now (a server packs the decoder at start); `packed` says which are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..memory import trim_heap
from . import int8, packable, rewrite_fp32
from . import pack_weights as _pack_weights

PACK_AFTER_ROWS = 4096


class FastForms:
    """The fast-form policy of one model's two towers, "decoder" and "vision"."""

    def __init__(self, model: nn.Module, *, pack_weights: bool | None = None, int8_compute: str | None = None):
        """pack_weights: None puts each tower that has a fast form in it once it has run PACK_AFTER_ROWS rows,
        True at once, False never. int8_compute ("dynamic" or "weight-only"): the lean mode, which takes no
        packing."""
        self.towers = {"decoder": model.model, "vision": model.visual}
        self.int8_compute = int8_compute
        self.quantized = int8_compute is not None
        if self.quantized:
            self._form, has = (lambda tower: int8.prepare(tower, int8_compute)), ("decoder", "vision")
        elif packable(model.device, model.dtype):
            self._form, has = _pack_weights, ("decoder", "vision")
        elif model.device.type == "cpu" and model.dtype == torch.float32:
            # Measured under the AVX2 mask: a vision block 1.06x, a decoder layer 1.04x (bench/RESULTS.md,
            # "fp32 where bf16 is not native, second pass"). The decoder keeps its plain linears, which
            # explain's "contribution" differentiates through.
            self._form, has = rewrite_fp32, ("vision",)
        else:
            self._form, has = None, ()
        if pack_weights and (self.quantized or has != ("decoder", "vision")):
            why = "an int8 model" if self.quantized else f"{model.dtype} on {model.device}"
            raise InputError(f"pack_weights=True needs bf16 on a CPU with native bf16, not {why}")
        # Towers not yet in their fast form, with the rows each has run (the lean mode's are always prepared).
        self.rows_run = {} if pack_weights is False and not self.quantized else {self.towers[n]: 0 for n in has}
        self._in_form: list[nn.Module] = []
        if pack_weights or self.quantized:
            self.pack(["decoder", "vision"] if pack_weights else ["decoder"])

    @property
    def with_form(self) -> list[str]:
        """Which towers have a fast form, taken or to be taken."""
        return [name for name, t in self.towers.items() if t in self.rows_run or t in self._in_form]

    @property
    def packed(self) -> list[str]:
        """Which towers run in their fast form so far."""
        return [name for name, t in self.towers.items() if t in self._in_form]

    def pack(self, towers=("decoder", "vision")) -> list[str]:
        """Put these towers in their fast form now, where there is one. Returns `packed`."""
        for name in towers:
            self._pack(self.towers[name])
        return self.packed

    def before_pass(self, tower: nn.Module, rows: int) -> None:
        """Before a pass of `rows` rows through `tower`: its fast form once it has run enough rows, or, in the
        lean mode, before its first pass."""
        if tower not in self.rows_run:
            return
        self.rows_run[tower] += rows
        if self.quantized or self.rows_run[tower] >= PACK_AFTER_ROWS:
            self._pack(tower)

    def _pack(self, tower: nn.Module) -> None:
        if tower in self.rows_run:
            self._form(tower)  # each form converts what the loader left as stored first (memory.convert_pending)
            del self.rows_run[tower]
            self._in_form.append(tower)
            trim_heap()  # the packing's temporaries (a layer's weights side by side, reordered copies)
