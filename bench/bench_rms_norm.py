"""RMSNorm, plain and fused with the residual add: Triton kernel vs torch twin vs torch.compile(twin).

Providers (same inputs, each checked against the twin):
  twin     ops.rms_norm_torch, eager (the add, the fp32 statistics and the casts
           are separate kernels)
  compile  torch.compile(ops.rms_norm_torch); the compile cache is reset per
           hidden size so hidden stays static (rows become dynamic after the first size)
  triton   ops.rms_norm_triton, one pass, rows a program from its pick_config; CUDA only
GB/s counts the bytes a single pass must move: read x (+ residual), write y (+ h),
read the weight. The peak is the measured bandwidth of a large copy_.

usage: python bench/bench_rms_norm.py [--quick] [--dtype bf16|fp16|fp32] [--no-compile] [--sweep] [--out DIR]
"""

import argparse

import torch

from common import CUDA, DEVICE, device_name, no_gpu_banner, peak_copy_gbs, print_table, sync, time_ms, write_csv

from m0lite.kernels import ops  # importable: common put the repository root on sys.path
from m0lite.reranker import DTYPES

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
EPS = 1e-6
# (BLOCK_ROWS, num_warps) for --sweep, at the largest row counts.
SWEEP = [(1, 8), (2, 8), (4, 4), (4, 8), (8, 8), (16, 8)]


def workloads(quick):
    """(hidden, rows): hidden 1536 is the decoder's, 1280 the vision tower's."""
    if CUDA:
        rows = [1, 16, 256, 4096, 65536] if quick else [1, 16, 256, 1024, 4096, 16384, 65536]
    else:
        rows = [1, 256, 4096] if quick else [1, 16, 256, 4096, 16384]
    return [(hidden, n) for hidden in (1536, 1280) for n in rows]


def run(args):
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if CUDA else torch.float32)
    peak = peak_copy_gbs(args.quick)
    print(f"device: {device_name()}   dtype: {dtype}   measured copy bandwidth: {peak:.1f} GB/s")
    compiled, rows, last_hidden = None, [], None
    for hidden, n in workloads(args.quick):
        if hidden != last_hidden and not args.no_compile:
            # A fresh cache per hidden size: hidden stays specialised, rows turn dynamic on the
            # first recompile, and the four graphs (plain/fused x static/dynamic) fit the default limit.
            torch._dynamo.reset()
            compiled, last_hidden = torch.compile(ops.rms_norm_torch), hidden
        g = torch.Generator(device=DEVICE).manual_seed(n)
        x = torch.randn(n, hidden, device=DEVICE, dtype=dtype, generator=g)
        res = torch.randn(n, hidden, device=DEVICE, dtype=dtype, generator=g)
        w = (1 + 0.1 * torch.randn(hidden, device=DEVICE, generator=g)).to(dtype)
        for variant, r in (("plain", None), ("fused-add", res)):
            provs = {"twin": ops.rms_norm_torch}
            if compiled is not None:
                provs["compile"] = compiled
            if CUDA:
                provs["triton"] = ops.rms_norm_triton
            moved = (2 if r is None else 4) * x.numel() * x.element_size() + w.numel() * w.element_size()
            ref, twin_ms = None, None
            for prov, fn in provs.items():
                call = lambda: fn(x, w, EPS, r)  # noqa: E731
                got = call()
                sync()
                got = got if isinstance(got, tuple) else (got,)
                if ref is None:
                    ref = got  # the twin runs first
                ok = all(torch.allclose(a.float(), b.float(), **TOL[dtype]) for a, b in zip(got, ref))
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref)) if n else 0.0
                ms, p20, p80 = time_ms(call, args.quick)
                twin_ms = twin_ms or ms
                gbs = moved / ms / 1e6
                rows.append(dict(workload=f"{variant} {n}x{hidden}", provider=prov, dtype=str(dtype).removeprefix("torch."), rows=n,
                                 hidden=hidden, variant=variant, ms=ms, p20_ms=p20, p80_ms=p80, gbs=gbs,
                                 pct_peak=100 * gbs / peak, x_twin=twin_ms / ms, max_err=err, ok=ok, peak_gbs=peak))
    print_table(rows, ["workload", "provider", "ms", "p20_ms", "p80_ms", "gbs", "pct_peak", "x_twin", "max_err", "ok"],
                title=f"RMSNorm, {device_name()}, {dtype} (x_twin: speedup over the twin)")
    bad = [f"{r['workload']}/{r['provider']}" for r in rows if not r["ok"]]
    if bad:
        print(f"\nWRONG RESULTS (vs the twin): {', '.join(bad)}")
    write_csv("rms_norm", rows, args.out)
    return not bad


def sweep(args):
    """Time each (BLOCK_ROWS, num_warps) on the fused-add norm at 65536 rows (CUDA only); `table`
    marks the one the launcher picks by itself."""
    from m0lite.kernels.triton_rms_norm import pick_config
    dtype = DTYPES[args.dtype or "bf16"]
    rows = []
    for hidden, n in ((1536, 65536), (1280, 65536)):
        x, r = (torch.randn(n, hidden, device=DEVICE, dtype=dtype) for _ in range(2))
        w = torch.randn(hidden, device=DEVICE, dtype=dtype)
        ref = ops.rms_norm_torch(x, w, EPS, r)
        moved = 4 * x.numel() * x.element_size() + w.numel() * w.element_size()
        for config in SWEEP:
            call = lambda: ops.rms_norm_triton(x, w, EPS, r, config=config)  # noqa: E731
            ok = all(torch.allclose(a.float(), b.float(), **TOL[dtype]) for a, b in zip(call(), ref))
            ms = time_ms(call, True)[0]
            rows.append(dict(workload=f"fused-add {n}x{hidden}", provider="triton", config="x".join(map(str, config)),
                             table=config == pick_config(hidden, n), ms=ms, gbs=moved / ms / 1e6, ok=ok))
    print_table(rows, ["workload", "config", "table", "ms", "gbs", "ok"],
                title="Triton RMSNorm sweep (BLOCK_ROWS x num_warps)")
    write_csv("rms_norm-sweep", rows, args.out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing (under ~2 minutes on CPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--sweep", action="store_true", help="also sweep Triton rows-a-program configs (CUDA only)")
    p.add_argument("--out", help="CSV directory (default bench/results)")
    args = p.parse_args()
    no_gpu_banner("bench_rms_norm")
    ok = run(args)
    if args.sweep and CUDA:
        sweep(args)
    raise SystemExit(0 if ok else 1)
