"""Where the CPU time of one decoder layer and one vision block goes, measured in place.

On CPU m0lite and the transformers reference share their two biggest costs: the
bf16 matmuls (oneDNN) and torch's flash attention kernel. This script measures
how much of a layer each takes, on the real model (the full-size random
checkpoint of bench_e2e.py, every weight packed as in a long-lived process) and
on real inputs (the fast form of the blocks, unpacked where packing is off): text8's batch (8 prompts of 277 tokens) through one decoder
layer; one image2 page (2,976 patches) and image4's four small images (1,784
patches) through one vision block. Stages, timed in turns (a shared VM's speed
drifts over minutes, so each round times every stage once):

  whole      the layer as the model runs it
  attention  the attention kernel alone, on the layer's own queries, keys and values
  matmuls    the layer's linear layers alone, packed and with their fused epilogues, in the
             layer's order over the same 256-row chunks, on random inputs of the same shapes
  rest       whole - attention - matmuls: norms, rotary, activations, copies, Python

    python bench/bench_blocks.py                 # under a minute on 2 cores (once the checkpoint exists)
    python bench/bench_blocks.py --rounds 15     # tighter medians

Prints one table per input (median ms [p20..p80], share of the whole, and the
rate of the matmuls and of attention) and appends the rows to
bench/results/blocks-<cpu>.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.bench_e2e import ensure_checkpoint, matmul_tflops  # noqa: E402
from bench.common import device_name, print_table, write_csv  # noqa: E402
from bench.e2e_worker import make_workload  # noqa: E402
from m0lite import Reranker  # noqa: E402
from m0lite.reranker import resolve_dtype  # noqa: E402
from m0lite.kernels import ops  # noqa: E402
from m0lite.transforms import chunked  # noqa: E402
from m0lite.transforms.chunked import rowwise  # noqa: E402
from m0lite.transforms.epilogue import PlainLinear  # noqa: E402
from m0lite.transforms.onednn import CHUNK_ROWS  # noqa: E402


def matmul_calls(block) -> list[list[tuple[torch.nn.Module, str]]]:
    """(linear, method) of every matmul a block in its fast form (transforms/chunked.py) runs, as its forward
    calls them: one list per row-wise half (before attention, after it), each run chunk by chunk, so that the
    weights are read as often."""
    if hasattr(block, "self_attn"):  # a decoder layer
        a, m = block.self_attn, block.mlp
        return [[(a.q_proj, "forward"), (a.k_proj, "forward"), (a.v_proj, "forward")],
                [(a.o_proj, "forward"), (m.gate_proj, "silu"), (m.up_proj, "mul"), (m.down_proj, "add")]]
    a, m = block.attn, block.mlp
    # fc1 runs QuickGELU as a swish on scaled weights (see chunked.py).
    return [[(a.qkv, "forward")], [(a.proj, "add"), (m.fc1, "silu"), (m.fc2, "add")]]


def attention(block):
    """The attention module of a decoder layer or a vision block."""
    return getattr(block, "self_attn", None) or block.attn


def capture(rr: Reranker, block, workload: str, folder: Path, pairs_slice=slice(None)):
    """The arguments the model passes to `block` when it scores the workload's first input."""
    seen = []
    block.forward = lambda *args, **kw: seen.append(args) or type(block).forward(block, *args, **kw)
    try:
        pairs, qt, dt = make_workload(workload, folder, quick=False, variant=0)
        rr.compute_score(pairs[pairs_slice], query_type=qt, doc_type=dt)
    finally:
        del block.forward
    return seen[0]


def stages(block, args) -> dict:
    """name -> a function running that stage once over the captured inputs."""
    x, ctx = args
    n = x.shape[0]
    q, k, v = rowwise(block._qkv, x, ctx.cos, ctx.sin)
    cu, max_len = ctx.cu_seqlens, ctx.max_seqlen
    halves = []
    for half in matmul_calls(block):
        calls = []
        for lin, method in half:
            inp = torch.randn(n, lin.in_features, dtype=x.dtype)
            other = torch.randn(n, lin.out_features, dtype=x.dtype) if method in ("mul", "add") else None
            calls.append((getattr(lin, method), inp, other))
        halves.append(calls)

    def matmuls():
        for calls in halves:
            for s in range(0, n, CHUNK_ROWS):
                for fn, inp, other in calls:
                    fn(inp[s:s + CHUNK_ROWS]) if other is None else fn(inp[s:s + CHUNK_ROWS], other[s:s + CHUNK_ROWS])

    causal = hasattr(block, "self_attn")
    return {"whole": lambda: block(*args), "attention": lambda: ops.attention(q, k, v, cu, max_len, causal),
            "matmuls": matmuls}


def flops(block, args) -> tuple[float, float]:
    """(matmul FLOPs, attention scores (query-key pairs times heads)) of one pass."""
    x, cu = args[0], args[1].cu_seqlens.tolist()
    mm = sum(2 * x.shape[0] * lin.in_features * lin.out_features for half in matmul_calls(block) for lin, _ in half)
    causal, heads = hasattr(block, "self_attn"), attention(block).n_heads
    scores = sum((L * (L + 1) / 2 if causal else L * L) for L in (e - s for s, e in zip(cu[:-1], cu[1:]))) * heads
    return mm, scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (each times every stage once)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the cached full-size random one)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the CSV goes (default: bench/results)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="default: the CPU's exact dtype, as the reranker picks it (bf16 only where it is native)")
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    folder = opts.ckpt or ensure_checkpoint(quick=False)
    dtype = opts.dtype or ("bf16" if resolve_dtype(None, torch.device("cpu")) == torch.bfloat16 else "fp32")
    rr = Reranker.from_pretrained(folder, dtype=dtype)
    packed = rr.pack()
    for tower in (rr.model.model, rr.model.visual):  # without packing (no native bf16): the fast form unpacked
        chunked.apply(tower, PlainLinear)
    roof = matmul_tflops(dtype, opts.threads)
    print(f"{device_name()}, {opts.threads} threads, torch {torch.__version__}, {dtype}; packed: {', '.join(packed) or 'none'}; "
          f"dense 2048^3 matmul: {roof:.2f} TFLOP/s")

    # A middle layer and block: the last decoder layer computes only the score token's rows.
    i, j = len(rr.model.model.layers) // 2, len(rr.model.visual.blocks) // 2
    layer, block = rr.model.model.layers[i], rr.model.visual.blocks[j]
    cases = [(f"decoder layer {i}, text8 (8 prompts of 277 tokens)", layer, capture(rr, layer, "text8", folder)),
             (f"vision block {j}, one image2 page", block, capture(rr, block, "image2", folder, slice(0, 1))),
             (f"vision block {j}, image4 (4 small images)", block, capture(rr, block, "image4", folder))]
    rows = []
    for title, blk, args in cases:
        fns = stages(blk, args)
        times = {name: [] for name in fns}
        with torch.inference_mode():
            for fn in fns.values():
                fn()  # warm-up
            for _ in range(opts.rounds):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
        times["rest"] = [w - a - m for w, a, m in zip(times["whole"], times["attention"], times["matmuls"])]
        whole = statistics.median(times["whole"])
        mm_flops, scores = flops(blk, args)
        table = []
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=10, method="inclusive")
            med = statistics.median(ts)
            rate = {"matmuls": f"{mm_flops / med / 1e9:.2f} TFLOP/s", "attention": f"{med * 1e6 / scores:.3f} ns/score"}.get(name, "")
            table.append({"stage": name, "median ms": med, "p20..p80": f"{q[1]:.1f}..{q[7]:.1f}",
                          "share": f"{med / whole:.0%}", "rate": rate})
            rows.append({"case": title, "stage": name, "median_ms": med, "p20_ms": q[1], "p80_ms": q[7],
                         "share": med / whole, "rate": rate, "rounds": opts.rounds, "threads": opts.threads,
                         "dense_tflops": roof})
        print_table(table, ["stage", "median ms", "p20..p80", "share", "rate"], title=f"{title}: {args[0].shape[0]} rows")
    write_csv("blocks", rows, opts.out_dir)


if __name__ == "__main__":
    main()
