"""Lower every kernel config to sm_90 machine code without a GPU, and print a table of
registers a thread, spills and shared memory per config.

Triton compiles for a GPUTarget("cuda", 90, 32) on any machine; ptxas -v on the result
gives the register and spill counts that would otherwise need a device to read back.

usage: python bench/lower_sm90.py [--quick] [--csv FILE]
  --quick: bf16 only.
Run with another Triton first on PYTHONPATH to check that version (e.g. the GPU machine's).
"""

import argparse
import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

from m0lite.kernels import triton_attention as ta  # noqa: E402
from m0lite.kernels import triton_rms_norm as tr  # noqa: E402
from m0lite.reranker import DTYPES  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SCALARS = {"eps": "fp32", "qk_scale": "fp32"}  # every other non-pointer argument is an i32


def lower(kernel, pointers, constexprs, **options):
    """Compile `kernel` for sm_90; pointers: {arg: '*bf16', ...}, constexprs: {arg: value}."""
    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, SCALARS.get(n, "i32")) for n in names}
    # Pointers and ints divisible by 16, as the launcher's real arguments are specialised.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] in "*i"}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    return compile(src, target=TARGET, options=options)


def resources(compiled):
    """(registers a thread, spill store bytes, spill load bytes, shared bytes) of a compiled kernel."""
    ptxas = get_ptxas(90).path  # the ptxas this Triton itself runs for sm_90
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                             capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    log = run.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, stores, loads, compiled.metadata.shared


def attention_cases(quick):
    """(label, pointers, constexprs, options) for every tile the launcher may pick on its own."""
    dtypes = ["bf16"] if quick else ["bf16", "fp16", "fp32"]
    heads = {128: 6, 80: 1, 64: 1}  # GQA group: the decoder's 12/2, the vision tower's 16/16
    for dt in dtypes:
        for d, group in heads.items():
            d1, d2 = ta.head_dim_split(d)
            for causal in (True, False):
                torch_dtype = DTYPES[dt]
                tiles = {ta.pick_config(d, causal, torch_dtype, n) for n in (ta.SHORT, ta.SHORT + 1)}
                for tile in sorted(tiles):
                    for past in ([False, True] if causal else [False]):
                        bm, bn, warps, stages = tile
                        label = (f"attn {dt} d{d} {'causal' if causal else 'bidir'}{' +past' if past else ''} "
                                 f"{bm}x{bn} w{warps} s{stages}")
                        ptrs = {**{n: f"*{dt}" for n in ("Q", "K", "V", "Out", "PK", "PV")},
                                "cu_seqlens": "*i32", "cu_past": "*i32"}
                        consts = dict(GROUP=group, HEAD_DIM=d, D1=d1, D2=d2, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal,
                                      HAS_PAST=past, UPCAST=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
                        yield label, ta._attn_fwd, ptrs, consts, dict(num_warps=warps, num_stages=stages)


def rms_cases(quick):
    for dt in (["bf16"] if quick else ["bf16", "fp16", "fp32"]):
        for hidden in (1536, 1280):
            for residual in (True, False):
                rows, warps = tr.pick_config(hidden, 65536)
                label = f"rms {dt} {hidden}{' +res' if residual else ''} {rows}rows w{warps}"
                consts = dict(HAS_RESIDUAL=residual, BLOCK_ROWS=rows, BLOCK=triton.next_power_of_2(hidden))
                yield label, tr._rms_norm_fwd, {n: f"*{dt}" for n in "XRWYH"}, consts, dict(num_warps=warps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--csv", help="also write the table here")
    args = p.parse_args()
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90 (compiled on CPU, no GPU)")
    rows = []
    print(f"{'config':<44} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'shared KiB':>11} {'compile s':>10}")
    for cases in (attention_cases(args.quick), rms_cases(args.quick)):
        for label, kernel, ptrs, consts, opts in cases:
            t0 = time.perf_counter()
            regs, st, ld, shared = resources(lower(kernel, ptrs, consts, **opts))
            secs = time.perf_counter() - t0
            rows.append(dict(config=label, regs=regs, spill_stores=st, spill_loads=ld, shared_bytes=shared))
            print(f"{label:<44} {regs:>5} {st:>9} {ld:>9} {shared / 1024:>11.1f} {secs:>10.1f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
