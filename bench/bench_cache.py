"""Document-cache rescoring: 32 known documents against a new query, cached vs uncached.

    python bench/bench_cache.py [--checkpoint DIR] [--quick] [--dtype bf16|fp32]

The cached side first ranks the documents for one query (filling the cache),
then is timed on other queries: only their tokens run through the decoder.
Scores are checked against the uncached side. Writes bench/results/cache-*.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from m0lite import Reranker
from m0lite.config import ModelConfig, TextConfig, VisionConfig
from m0lite import cpu
from m0lite.fixtures.random_checkpoint import FULL_CONFIG, write_random_checkpoint

QUICK = ModelConfig(text=TextConfig(num_hidden_layers=6, hidden_size=512, intermediate_size=1536, num_attention_heads=4,
                                    num_key_value_heads=2, mrope_section=[16, 24, 24]),
                    vision=VisionConfig(depth=2, embed_dim=320, num_heads=4, hidden_size=512))
WORDS = "the of data model language small extraction markdown html page table chart report revenue figure".split()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: a random one, written once and cached)")
    ap.add_argument("--quick", action="store_true", help="a small labelled config instead of the real 2B dimensions")
    ap.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 if the CPU has native bf16)")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--doc-words", type=int, default=180, help="about 256 tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    dtype = args.dtype or ("bf16" if cpu.native_bf16() else "fp32")
    label = "quick (6 layers, hidden 512)" if args.quick else "full Qwen2-VL-2B dimensions"
    ckpt = Path(args.checkpoint) if args.checkpoint else Path.home() / ".cache/m0lite" / f"bench-{'quick' if args.quick else 'full'}-bf16"
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(ckpt, QUICK if args.quick else FULL_CONFIG, dtype=torch.bfloat16)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(args.doc_words)) for _ in range(args.docs)]
    queries = ["quarterly revenue chart", "small language model data extraction", "markdown table of figures", "html page report"]

    uncached = Reranker.from_pretrained(ckpt, dtype=dtype)
    cached = Reranker.from_pretrained(ckpt, dtype=dtype, doc_cache_bytes=4 * 2**30)
    cached.model = uncached.model  # the same weights in memory; only the caches differ
    cached.rank(queries[0], docs)  # fills the document cache
    t_plain = timed(lambda: uncached.rank(queries[1], docs), args.repeats)
    t_cached = timed(lambda: cached.rank(queries[1], docs), args.repeats)
    worst = 0.0
    for q in queries[1:]:
        a = {r["index"]: r["relevance_score"] for r in uncached.rank(q, docs)}
        b = {r["index"]: r["relevance_score"] for r in cached.rank(q, docs)}
        worst = max(worst, max(abs(a[i] - b[i]) for i in a))
    m_plain, m_cached = statistics.median(t_plain), statistics.median(t_cached)
    print(f"document cache, {args.docs} documents of ~{args.doc_words} words, {label}, {dtype}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    print(f"{'':10} {'median s':>9} {'min s':>8} {'max s':>8} {'pairs/s':>8}")
    for name, ts in (("uncached", t_plain), ("cached", t_cached)):
        print(f"{name:10} {statistics.median(ts):9.3f} {min(ts):8.3f} {max(ts):8.3f} {args.docs / statistics.median(ts):8.1f}")
    print(f"speedup {m_plain / m_cached:.1f}x; cache holds {cached.doc_cache.nbytes / 2**20:.0f} MiB; "
          f"max |score difference| {worst:.2e} {'OK' if worst < (2e-2 if dtype == 'bf16' else 1e-4) else 'MISMATCH'}")
    out = Path(__file__).parent / "results" / "cache.csv"
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "cpu", "threads", "config", "dtype", "docs", "uncached_s", "cached_s", "speedup", "max_diff"])
        w.writerow([datetime.datetime.now().isoformat(timespec="seconds"), cpu_name(), torch.get_num_threads(), label, dtype,
                    args.docs, f"{m_plain:.4f}", f"{m_cached:.4f}", f"{m_plain / m_cached:.2f}", f"{worst:.2e}"])


if __name__ == "__main__":
    main()
