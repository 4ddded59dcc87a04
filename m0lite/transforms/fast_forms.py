"""When each tower of a loaded model takes its fast form: the one policy the reranker and explain follow.

A tower's fast form is its packed bf16 weights (`pack_weights`, bf16 on a CPU with native bf16) or, in the
lean mode, its prepared int8 weights (`int8.prepare`). Laying weights out costs a one-time copy and makes
every later pass faster, so, as one rents skis until the rent would have bought them, a tower is packed once
it has run PACK_AFTER_ROWS rows (tokens or patches) in all: a short-lived process scoring a few pairs never
pays for it, a server pays it once. The lean mode prepares a tower before its first pass (the decoder at
once), so that a text-only process never reads the vision tower's weights.

Before every pass through a tower, its caller says so (`before_pass`); `pack` puts towers in their fast form
now (a server packs the decoder at start); `packed` says which are.
"""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from ..memory import convert_pending, trim_heap
from . import int8, pack_weights, packable

PACK_AFTER_ROWS = 4096


class FastForms:
    """The fast-form policy of one model's two towers, "decoder" and "vision"."""

    def __init__(self, model: nn.Module, *, pack_weights: bool | None = None, int8_compute: str | None = None):
        """pack_weights: None packs each tower once it has run PACK_AFTER_ROWS rows, True at once, False never.
        int8_compute ("dynamic" or "weight-only"): the lean mode, which takes no packing."""
        self.towers = {"decoder": model.model, "vision": model.visual}
        self.int8_compute = int8_compute
        self.quantized = int8_compute is not None
        can_pack = packable(model.device, model.dtype) and not self.quantized
        if pack_weights and not can_pack:
            why = "an int8 model" if self.quantized else f"{model.dtype} on {model.device}"
            raise InputError(f"pack_weights=True needs bf16 on a CPU with native bf16, not {why}")
        self.active = self.quantized or (can_pack and pack_weights is not False)
        self.rows_run = {tower: 0 for tower in self.towers.values()}  # towers not yet in their fast form
        if pack_weights or self.quantized:
            self.pack(["decoder", "vision"] if pack_weights else ["decoder"])

    @property
    def packed(self) -> list[str]:
        """Which towers run in their fast form so far."""
        return [name for name, t in self.towers.items() if self.active and t not in self.rows_run]

    def pack(self, towers=("decoder", "vision")) -> list[str]:
        """Put these towers in their fast form now, where there is one. Returns `packed`."""
        for name in towers if self.active else []:
            self._pack(self.towers[name])
        return self.packed

    def before_pass(self, tower: nn.Module, rows: int) -> None:
        """Before a pass of `rows` rows through `tower`: its fast form once it has run enough rows, or, in the
        lean mode, before its first pass."""
        if not self.active or tower not in self.rows_run:
            return
        self.rows_run[tower] += rows
        if self.quantized or self.rows_run[tower] >= PACK_AFTER_ROWS:
            self._pack(tower)

    def _pack(self, tower: nn.Module) -> None:
        if tower in self.rows_run:
            convert_pending(tower)  # a tower the loader left as stored is laid out from the model's dtype
            if self.quantized:
                int8.prepare(tower, self.int8_compute)
            else:
                pack_weights(tower)
            del self.rows_run[tower]
            trim_heap()  # the packing's temporaries (a layer's weights side by side, reordered copies)
