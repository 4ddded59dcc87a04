"""The linear layers the fast forms (chunked.py) run on: a matmul that can also compute what follows it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EpilogueLinear(nn.Module):
    """A linear layer that can also compute what follows it. These defaults compute it after the
    matmul, in place; a subclass fuses it into the matmul where its kernel can."""

    def silu(self, x):
        """silu(x W^T + b)"""
        return F.silu(self(x), inplace=True)

    def mul(self, x, other):
        """(x W^T + b) * other"""
        return self(x).mul_(other)

    def add(self, x, other):
        """(x W^T + b) + other: a residual connection."""
        return self(x).add_(other)


class PlainLinear(EpilogueLinear):
    """`lin`'s own torch math, unfused, computing the re-parametrised layer the fast forms ask for: outputs
    in the order `out_order` and x (weight_scale W)^T + bias_scale b: the fast forms in fp32, where oneDNN's
    layout does not pay (transforms.rewrite_fp32). `lin`'s own tensors where nothing changes, else a copy."""

    def __init__(self, lin: nn.Linear, *, out_order=None, weight_scale: float = 1.0, bias_scale: float = 1.0):
        super().__init__()
        self.weight = _rewritten(lin.weight, out_order, weight_scale)
        self.bias = None if lin.bias is None else _rewritten(lin.bias, out_order, bias_scale)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _rewritten(t: torch.Tensor, order, scale: float) -> torch.Tensor:
    t = t.detach()
    if order is not None:
        t = t[torch.tensor(order)]
    return t * scale if scale != 1.0 else t
