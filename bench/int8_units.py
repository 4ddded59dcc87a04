"""One int8 matmul of the decoder's MLP size, as oneDNN runs it on this machine: exact or not, and how fast
against the same product in fp32, in bf16, and with the int8 weight expanded per call ("weight-only").

    python bench/int8_units.py                                   # median ms (bench/common.time_ms)
    M0LITE_CPU_ISA=avx2 python bench/int8_units.py               # as an AVX2-only CPU runs it (m0lite/cpu.py)
    M0LITE_CPU_ISA=avx2 python bench/int8_units.py --rows 32     # a short pass: one short pair

Without VNNI or AMX, oneDNN's u8 x s8 kernels add two products in int16 with saturation, so full-range
(8-bit) activation codes come out wrong; 7-bit codes stay exact (m0lite/transforms/int8.py,
`activation_bits`). The rows below use the largest codes against weights of +-127 where the row asks for it
(the worst case) and random codes elsewhere.

Two other ways to the same integer products, for comparison: the weight as the first operand
(`torch._int_mm(W, x^T)`, s8 x s8, which oneDNN computes as u8 x s8 after adding 128 to the first operand:
exact only while the second holds 7-bit codes), and oneDNN's qlinear with the operands swapped (the weight
stored a second time, as u8 around 128). Both give the (out, rows) transpose of what the model needs; the
row of the transpose is what making it (rows, out) costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_e2e import cpu_info  # noqa: E402
from bench.common import time_ms  # noqa: E402
from m0lite.transforms import int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256, help="activation rows (a chunk of the fast forms)")
    ap.add_argument("--shape", default="1536x8960", help="in x out of the weight (default: gate or up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k, n = map(int, args.shape.split("x"))
    print(f"{cpu_info()[0]}; {args.rows} x {k} times {k} x {n}, {args.threads} threads; "
          f"int8 {int8.describe('dynamic')}")
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[:, :64] = 127  # the worst case for the first rows' sums
    packed = torch.ops.onednn.qlinear_prepack(w, [args.rows, k])
    ones, zeros = torch.ones(n), int8.zero_points(n)
    for bits in (8, 7):
        top = 2 ** (bits - 1) - 1
        codes = torch.randint(-top, top + 1, (args.rows, k), generator=g)
        codes[: args.rows // 2, :64] = top
        u = (codes + top + 1).to(torch.uint8)

        def run():
            return torch.ops.onednn.qlinear_pointwise(u, 1.0, top + 1, packed, ones, zeros, None, 1.0, 0,
                                                      torch.float32, "none", [], "")
        err = (run().double() - codes.double() @ w.double().t()).abs().max().item()
        print(f"  int8, {bits}-bit activations: {time_ms(run)[0]:7.2f} ms, max |error| {err:.0f}"
              + ("" if err == 0 else "  (saturated: wrong)"))
        if bits == 7:  # the weight as the first operand: (n, rows), then made (rows, n)
            s8 = codes.to(torch.int8)
            wu = (w.to(torch.int16) + 128).to(torch.uint8)

            def swapped():
                p = torch.ops.onednn.qlinear_prepack(s8, [n, k])  # the activations' codes as oneDNN's weight
                return torch.ops.onednn.qlinear_pointwise(wu, 1.0, 128, p, torch.ones(args.rows), int8.zero_points(args.rows),
                                                          None, 1.0, 0, torch.float32, "none", [], "")
            for name, fn in (("torch._int_mm(W, x^T)", lambda: torch._int_mm(w, s8.t())), ("qlinear, operands swapped", swapped)):
                err = (fn().double().t() - codes.double() @ w.double().t()).abs().max().item()
                print(f"  {name + ':':29}{time_ms(fn)[0]:7.2f} ms, max |error| {err:.0f}")
            y, out = torch._int_mm(w, s8.t()), torch.empty(args.rows, n)
            print(f"  its transpose, (rows, out) fp32: {time_ms(lambda: out.copy_(y.t()))[0]:7.2f} ms")
    x = torch.randn(args.rows, k, generator=g)
    wf = torch.randn(n, k, generator=g) / k**0.5
    for name, a, b in (("fp32", x, wf), ("bf16", x.bfloat16(), wf.bfloat16())):
        print(f"  {name} matmul:                {time_ms(lambda: torch.nn.functional.linear(a, b))[0]:7.2f} ms")
    scale = torch.rand(n) / 127
    print(f"  weight-only (fp32):          {time_ms(lambda: torch.nn.functional.linear(x, w.float().mul_(scale[:, None])))[0]:7.2f} ms")


if __name__ == "__main__":
    main()
