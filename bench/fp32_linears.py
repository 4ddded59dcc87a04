"""One fp32 linear of the real model's widths, three ways, as this CPU runs them: which weight layout the fast
form should use in fp32 (m0lite/transforms/onednn.py).

  plain    F.linear on the (out, in) weight, as the plain math runs it
  onednn   the weight laid out once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`),
           as the bf16 fast form runs it
  mkl      the weight packed once for MKL's sgemm (`torch.ops.mkl._mkl_reorder_linear_weight`, `_mkl_linear`), as
           inductor runs fp32 linears; packed for one row count, other counts fall back to the plain weight

Each over the same rows, whole (one matmul) and in 256-row chunks (as transforms/chunked.py runs them),
and the same three with the SwiGLU / residual epilogue where the row names one (oneDNN fuses it; the others
run it after the matmul). Methods are timed in turns, round by round (a shared machine's speed drifts), and
each checked against float64.

    python bench/fp32_linears.py                               # as this CPU runs it
    M0LITE_CPU_ISA=avx2 python bench/fp32_linears.py           # as an AVX2-only CPU (m0lite/cpu.py)

Prints median ms [p20..p80] and GFLOP/s per method and appends the rows to bench/results/fp32_linears-<cpu>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import m0lite  # noqa: E402,F401  (caps oneDNN and MKL to M0LITE_CPU_ISA before the first matmul)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import print_table, write_csv  # noqa: E402
from m0lite import cpu  # noqa: E402

CHUNK = 256
# (name, in, out, rows, epilogue): decoder linears over text8's batch (8 prompts of 277 tokens), vision
# linears over one page (2,976 patches).
SHAPES = [
    ("decoder q/o 1536->1536", 1536, 1536, 2216, "add"),
    ("decoder k/v 1536->256", 1536, 256, 2216, None),
    ("decoder gate/up 1536->8960", 1536, 8960, 2216, "silu"),
    ("decoder down 8960->1536", 8960, 1536, 2216, "add"),
    ("vision qkv 1280->3840", 1280, 3840, 2976, None),
    ("vision proj 1280->1280", 1280, 1280, 2976, "add"),
    ("vision fc1 1280->5120", 1280, 5120, 2976, "silu"),
    ("vision fc2 5120->1280", 5120, 1280, 2976, "add"),
]


def methods(w, b, epilogue):
    """name -> fn(x, other) computing x W^T + b, then the epilogue, for each layout."""
    dnn = torch.ops.mkldnn._reorder_linear_weight(w, CHUNK)
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, CHUNK)

    def after(y, other):
        if epilogue == "silu":
            return F.silu(y, inplace=True)
        if epilogue == "add":
            return y.add_(other)
        return y

    def onednn(x, other):
        if epilogue == "silu":
            return torch.ops.mkldnn._linear_pointwise(x, dnn, b, "swish", [], "")
        if epilogue == "add":
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, dnn, b, "add")
        return torch.ops.mkldnn._linear_pointwise(x, dnn, b, "none", [], "")

    return {
        "plain": lambda x, other: after(F.linear(x, w, b), other),
        "onednn": onednn,
        "mkl": lambda x, other: after(torch.ops.mkl._mkl_linear(x, mkl, w, b, CHUNK), other),
    }


def chunked(fn):
    def run(x, other):
        out = x.new_empty((x.shape[0], other.shape[1]))
        for s in range(0, x.shape[0], CHUNK):
            out[s:s + CHUNK] = fn(x[s:s + CHUNK], other[s:s + CHUNK])
        return out
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of the shape names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = cpu.describe()
    print(f"{name}; {args.threads} threads; fp32; {args.rounds} rounds in turns")
    rows_out, csv_rows = [], []
    g = torch.Generator().manual_seed(0)
    for label, k, n, rows, epilogue in SHAPES:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
        x, other = torch.randn(rows, k, generator=g), torch.randn(rows, n, generator=g)
        base = methods(w, b, epilogue)
        runs = {}
        for m, fn in base.items():
            if m != "mkl":  # MKL's packed weight is for one row count: whole, it falls back to the plain weight
                runs[f"{m} whole"] = fn
            runs[f"{m} chunks"] = chunked(fn)
        y64 = F.linear(x.double(), w.double(), b.double())
        y64 = {"silu": F.silu(y64), "add": y64 + other.double()}.get(epilogue, y64)
        err = {}
        for m, fn in runs.items():
            fn(x, other)  # warm-up (first-call allocations, oneDNN primitive creation)
            err[m] = (fn(x, other).double() - y64).abs().max().item()
        times = {m: [] for m in runs}
        for _ in range(args.rounds):
            for m, fn in runs.items():
                t = time.perf_counter()
                fn(x, other)
                times[m].append((time.perf_counter() - t) * 1e3)
        ref = statistics.median(times["plain whole"])
        for m, ts in times.items():
            q = statistics.quantiles(ts, n=10, method="inclusive")
            med = statistics.median(ts)
            gflops = 2 * rows * k * n / med / 1e6
            rows_out.append({"linear": label + (f" +{epilogue}" if epilogue else ""), "rows": rows, "method": m,
                             "ms median [p20..p80]": f"{med:.1f} [{q[1]:.1f}..{q[7]:.1f}]", "GFLOP/s": f"{gflops:.0f}",
                             "vs plain whole": f"{ref / med:.2f}x", "max |err|": f"{err[m]:.1e}"})
            csv_rows.append({"cpu": name, "threads": args.threads, "shape": label, "epilogue": epilogue or "",
                             "rows": rows, "method": m, "median_ms": f"{med:.3f}", "p20_ms": f"{q[1]:.3f}",
                             "p80_ms": f"{q[7]:.3f}", "gflops": f"{gflops:.1f}", "max_err_vs_fp64": f"{err[m]:.3e}"})
        print_table(rows_out[-len(runs):], list(rows_out[-1]))
    write_csv("fp32_linears", csv_rows)


if __name__ == "__main__":
    main()
