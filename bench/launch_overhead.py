"""What one kernel launch costs the host, against what the device spends on it.

Short rerank sequences (a few hundred tokens) give the attention kernel microseconds of work, so the
time to launch it from Python can set the pace. For each call below this prints the host's time per
call (many calls back to back, one synchronisation at the end: the launch rate) and the device's
(`triton.testing.do_bench`, L2 flushed, which also waits for the host when launching is the slower):

    python bench/launch_overhead.py            # CUDA; on a CPU it says so and exits
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CUDA, DEVICE, print_table  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from m0lite.kernels import ops  # noqa: E402


def host_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    if not CUDA:
        print("launch_overhead: no GPU present, nothing to time")
        return
    import triton
    import triton.language as tl

    @triton.jit
    def empty(x):
        pass

    from m0lite.kernels.triton_attention import pick_config

    x = torch.zeros(1, device=DEVICE)
    lens = [512]
    q = torch.randn(512, 12, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(512, 2, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = ops.cu_seqlens(lens, DEVICE)
    h = torch.randn(512, 1536, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(1536, device=DEVICE, dtype=torch.bfloat16)
    qp, kp, vp = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    calls = {
        "empty Triton kernel": lambda: empty[(1,)](x),
        "attention 1x512 (ops.attention)": lambda: ops.attention(q, k, v, cu, 512, True),
        "attention 1x512 (launcher, table tile)": lambda: ops.attention_triton(
            q, k, v, cu, 512, True, config=pick_config(128, True, torch.bfloat16, 512)),
        "rms_norm 512x1536 (ops.rms_norm)": lambda: ops.rms_norm(h, w, 1e-6),
        "torch sdpa 1x512 (gqa)": lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True),
        "torch add 512x1536": lambda: h + h,
    }
    rows = []
    for name, fn in calls.items():
        device = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
        rows.append({"call": name, "host us/call": host_us(fn), "do_bench us": device})
    print_table(rows, ["call", "host us/call", "do_bench us"], title="launch cost (host) against timed cost")


if __name__ == "__main__":
    main()
