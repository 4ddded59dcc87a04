"""One decoder layer and one vision block of the real widths (random weights) in fp32, plain math against the
fast form as fp32 would run it (chunked.py on plain-layout linears, in chunks of at most FP32_CHUNK_ROWS rows),
timed in turns; the vision case also times its attention kernel alone, and materialized_attention.

    M0LITE_CPU_ISA=avx2 python bench/fp32_blocks.py decoder 7    # text8's batch: 8 prompts of 277 tokens
    M0LITE_CPU_ISA=avx2 python bench/fp32_blocks.py vision 9     # one page: 2,976 patches

Prints median ms [min..max] and plain / this.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m0lite import cpu  # noqa: E402  (caps oneDNN and MKL to M0LITE_CPU_ISA before the first matmul)
import torch  # noqa: E402

from m0lite.context import Context  # noqa: E402
from m0lite.decoder import DecoderLayer  # noqa: E402
from m0lite.fixtures.random_checkpoint import FULL_CONFIG as CFG  # noqa: E402
from m0lite.kernels import ops  # noqa: E402
from m0lite.rope import inv_freq, vision_cos_sin, vision_positions  # noqa: E402
from m0lite.transforms import chunked  # noqa: E402
from m0lite.transforms.epilogue import PlainLinear  # noqa: E402
from m0lite.vision import VisionBlock  # noqa: E402


def init(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(1, 0.1) if n.endswith("weight") else p.normal_(0, 0.02)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return m.requires_grad_(False)


def main() -> None:
    which, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(2)
    print(cpu.describe(), "2 threads, fp32")
    if which == "decoder":
        blk, lens = init(DecoderLayer(CFG.text)), [277] * 8
        T = sum(lens)
        ang = torch.rand(T, CFG.text.head_dim // 2) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        args = (torch.randn(T, CFG.text.hidden_size), Context(cos, sin, ops.cu_seqlens(lens), max(lens)))
        variants = {"plain": blk, "fast form": chunked.FastDecoderLayer(copy.deepcopy(blk), PlainLinear)}
    else:
        blk, grid, n = init(VisionBlock(CFG.vision)), [(1, 48, 62)], 2976
        cos, sin = vision_cos_sin(vision_positions(grid, 2), inv_freq(CFG.vision.head_dim // 2, CFG.vision.rope_theta))
        args = (torch.randn(n, CFG.vision.embed_dim), Context(cos, sin, ops.cu_seqlens([n]), n))
        q, k, v = (torch.randn(n, CFG.vision.num_heads, CFG.vision.head_dim) for _ in range(3))
        variants = {"plain": blk, "fast form": chunked.FastVisionBlock(copy.deepcopy(blk), PlainLinear),
                    "attention alone": lambda x, ctx: ops.attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, causal=False),
                    "materialized_attention alone": lambda x, ctx: chunked.materialized_attention(
                        q, k, v, ctx.cu_seqlens, ctx.max_seqlen)}
    with torch.inference_mode():
        plain = blk(*args)
        print("fast form max |diff| vs plain:", (variants["fast form"](*args) - plain).abs().max().item())
        times = {name: [] for name in variants}
        for _ in range(rounds):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn(*args)
                times[name].append((time.perf_counter() - t) * 1e3)
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{which} {name:30s} {med:8.1f} ms [{min(ts):.1f}..{max(ts):.1f}]  plain/this {base / med:.3f}")


if __name__ == "__main__":
    main()
