"""Command-line options that `m0lite rank`, `demo` and `serve` share: the lean mode (int8)."""

from __future__ import annotations

import argparse


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights: half the memory, a lossy mode (see README: Lean mode)")
    p.add_argument("--int8-compute", choices=["auto", "dynamic", "weight-only"], default="auto",
                   help="int8 x int8 (dynamic) or weight-only; auto: dynamic where the CPU has int8 matmul units")
