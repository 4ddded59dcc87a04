"""Attention over packed sequences: Triton kernel vs torch twin vs SDPA, side by side.

Providers (same inputs, each checked against the twin):
  twin         ops.attention_torch: SDPA called once per packed sequence
  sdpa-padded  one SDPA call over the batch padded to the longest sequence, as the
               transformers reference runs it (key-padding mask when bidirectional); torch
               picks the backend
  sdpa-flash, sdpa-cudnn, sdpa-efficient
               the same call with one backend forced (torch.nn.attention.sdpa_kernel), kv heads
               repeated as transformers' repeat_kv does; CUDA only; a backend that refuses the
               inputs (e.g. flash with a padding mask) is reported unavailable
  torch-varlen torch.nn.attention.varlen.varlen_attn (flash varlen), if this torch has it; CUDA only
  triton       ops.attention_triton, the tile from its table; CUDA only
TFLOP/s counts useful FLOPs only: 4*d*heads per (query, key) pair, and only the
L(L+1)/2 visible pairs when causal; padding work is not credited. The peak is the
measured dense matmul rate in the same dtype.

usage: python bench/bench_attention.py [--quick] [--dtype bf16|fp16|fp32] [--sweep] [--out DIR]
"""

import argparse
import random

import torch
import torch.nn.functional as F

from common import (CUDA, DEVICE, device_name, no_gpu_banner, peak_matmul_tflops, print_table, sync, time_ms,
                    write_csv)

from m0lite.kernels import ops  # importable: common put the repository root on sys.path
from m0lite.reranker import DTYPES

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DECODER = dict(n_heads=12, n_kv_heads=2, head_dim=128, causal=True)   # Qwen2-VL-2B language model
VISION = dict(n_heads=16, n_kv_heads=16, head_dim=80, causal=False)   # Qwen2-VL-2B vision tower
# Triton tile sweep (BLOCK_M, BLOCK_N, num_warps, num_stages) for --sweep: the table's tiles and neighbours.
SWEEP = [(64, 64, 4, 3), (64, 32, 4, 4), (64, 128, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2)]
SWEEP_WORKLOADS = [("decoder 8x1024", DECODER, [1024] * 8), ("decoder 1x8192", DECODER, [8192]),
                   ("vision 4 small", VISION, [256, 324, 400, 576]), ("vision 2x3136", VISION, [3136, 3136])]


def workloads(quick):
    mixed = random.Random(0).choices(range(64, 2049), k=32)  # "1 x 32 documents of mixed lengths"
    if not CUDA:  # a CPU does a 16k causal attention in seconds: keep to small sizes
        dec = [512, 1024] if quick else [512, 1024, 2048]
        vis = [256, 1024] if quick else [256, 1024, 3136]
        packed = [("decoder 8x256", DECODER, [256] * 8), ("vision 4 small", VISION, [256, 324, 400, 576])]
        if not quick:
            packed += [("decoder 32 mixed", DECODER, mixed), ("vision 2x3136", VISION, [3136, 3136])]
    else:
        dec = [512, 1024, 2048, 4096, 8192, 16384]
        vis = [256, 1024, 3136]
        packed = [("decoder 8x256", DECODER, [256] * 8), ("decoder 8x1024", DECODER, [1024] * 8),
                  ("decoder 8x2048", DECODER, [2048] * 8), ("decoder 32 mixed", DECODER, mixed),
                  ("vision 4 small", VISION, [256, 324, 400, 576]), ("vision 2x3136", VISION, [3136, 3136])]
    return ([(f"decoder 1x{n}", DECODER, [n]) for n in dec] + [(f"vision 1x{n}", VISION, [n]) for n in vis]
            + packed)


def make_inputs(lens, n_heads, n_kv_heads, head_dim, dtype):
    total = sum(lens)
    q = torch.randn(total, n_heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(total, n_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(total, n_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


def pad(x, lens):
    """(total, heads, d) packed -> (batch, heads, max_len, d) zero-padded."""
    out = x.new_zeros(len(lens), x.shape[1], max(lens), x.shape[2])
    for i, seq in enumerate(x.split(lens)):
        out[i, :, : len(seq)] = seq.transpose(0, 1)
    return out


def unpad(x, lens):
    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])


def providers(q, k, v, cu, lens, causal):
    """name -> (fn returning the packed output, or None when unavailable, note)."""
    max_len = max(lens)
    gqa = q.shape[1] != k.shape[1]
    qp, kp, vp = pad(q, lens), pad(k, lens), pad(v, lens)
    # Causal needs no mask: padding sits after every real query, so it is never visible.
    mask = None
    if not causal and len(set(lens)) > 1:
        mask = (torch.arange(max_len, device=DEVICE)[None, :] < torch.tensor(lens, device=DEVICE)[:, None])
        mask = mask[:, None, None, :]  # (batch, 1, 1, keys)

    def sdpa_padded():
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    out = {
        "twin": (lambda: ops.attention_torch(q, k, v, cu, max_len, causal), ""),
        "sdpa-padded": (sdpa_padded, "unpad"),
    }
    if CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = q.shape[1] // k.shape[1]
        kr, vr = kp.repeat_interleave(group, 1), vp.repeat_interleave(group, 1)  # transformers' repeat_kv

        def forced(backend):
            def fn():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qp, kr, vr, attn_mask=mask, is_causal=causal)
            return fn
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            out[f"sdpa-{name}"] = (forced(backend), "unpad")
        try:
            from torch.nn.attention.varlen import varlen_attn

            def varlen():
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1),
                                   enable_gqa=gqa)
            out["torch-varlen"] = (varlen, "")
        except ImportError:
            pass
        out["triton"] = (lambda: ops.attention_triton(q, k, v, cu, max_len, causal), "")
    return out


def attention_flops(lens, n_heads, head_dim, causal):
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    return 4 * head_dim * n_heads * pairs


def run(args):
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if CUDA else torch.float32)
    peak = peak_matmul_tflops(dtype, args.quick)
    print(f"device: {device_name()}   dtype: {dtype}   measured {dtype} matmul peak: {peak:.2f} TFLOP/s")
    rows = []
    for name, cfg, lens in workloads(args.quick):
        torch.manual_seed(0)
        q, k, v, cu = make_inputs(lens, cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], dtype)
        flops = attention_flops(lens, cfg["n_heads"], cfg["head_dim"], cfg["causal"])
        ref, twin_ms = None, None
        for prov, (fn, post) in providers(q, k, v, cu, lens, cfg["causal"]).items():
            row = dict(workload=name, provider=prov, dtype=str(dtype).removeprefix("torch."), tokens=sum(lens),
                       n_seqs=len(lens), heads=f"{cfg['n_heads']}/{cfg['n_kv_heads']}", head_dim=cfg["head_dim"],
                       causal=cfg["causal"])
            try:
                got = fn()
                sync()
            except Exception as e:  # e.g. a torch without a varlen flash build
                print(f"  {name} / {prov}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            got = unpad(got, lens) if post == "unpad" else got
            if ref is None:
                ref = got.float()  # the twin runs first
            err = (got.float() - ref).abs().max().item()
            ms, p20, p80 = time_ms(fn, args.quick)
            twin_ms = twin_ms or ms
            tflops = flops / ms / 1e9
            rows.append(dict(row, ms=ms, p20_ms=p20, p80_ms=p80, tflops=tflops, pct_peak=100 * tflops / peak,
                             x_twin=twin_ms / ms, max_err=err, ok=err <= TOL[dtype], peak_tflops=peak))
        del q, k, v
    print_table(rows, ["workload", "provider", "ms", "p20_ms", "p80_ms", "tflops", "pct_peak", "x_twin",
                       "max_err", "ok"], title=f"attention, {device_name()}, {dtype} (x_twin: speedup over the twin)")
    bad = [f"{r['workload']}/{r['provider']}" for r in rows if not r["ok"]]
    if bad:
        print(f"\nWRONG RESULTS (error above {TOL[dtype]} vs the twin): {', '.join(bad)}")
    write_csv("attention", rows, args.out)
    return not bad


def sweep(args):
    """Time each Triton tile config on short and long decoder and vision workloads (CUDA only);
    `table` marks the tile the launcher picks by itself."""
    from m0lite.kernels.triton_attention import pick_config
    dtype = DTYPES[args.dtype or "bf16"]
    rows = []
    for name, cfg, lens in SWEEP_WORKLOADS:
        q, k, v, cu = make_inputs(lens, cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"], dtype)
        ref = ops.attention_torch(q, k, v, cu, max(lens), cfg["causal"]).float()
        flops = attention_flops(lens, cfg["n_heads"], cfg["head_dim"], cfg["causal"])
        for config in SWEEP:
            fn = lambda: ops.attention_triton(q, k, v, cu, max(lens), cfg["causal"], config=config)  # noqa: E731
            try:
                err = (fn().float() - ref).abs().max().item()
            except Exception as e:  # e.g. out of shared memory
                print(f"  {name} {config}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            ms = time_ms(fn, True)[0]  # short timing: many configs
            chosen = config == pick_config(cfg["head_dim"], cfg["causal"], dtype, max(lens))
            rows.append(dict(workload=name, provider="triton", config="x".join(map(str, config)), table=chosen,
                             ms=ms, tflops=flops / ms / 1e9, max_err=err, ok=err <= TOL[dtype]))
        del q, k, v
        write_csv("attention-sweep", [r for r in rows if r["workload"] == name], args.out)  # kept if cut short
    print_table(rows, ["workload", "config", "table", "ms", "tflops", "max_err", "ok"],
                title="Triton tile sweep (BLOCK_M x BLOCK_N x num_warps x num_stages)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timing (under ~2 minutes on CPU)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--sweep", action="store_true", help="also sweep Triton tile configs (CUDA only)")
    p.add_argument("--out", help="CSV directory (default bench/results)")
    args = p.parse_args()
    no_gpu_banner("bench_attention")
    ok = run(args)
    if args.sweep and CUDA:
        sweep(args)
    raise SystemExit(0 if ok else 1)
