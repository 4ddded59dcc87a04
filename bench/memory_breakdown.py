"""Where one side's resident memory goes: by stage, by mapping, by checkpoint tensor, and a run's live heap.

    python bench/memory_breakdown.py --workload text8                       # m0lite in the CPU's dtype, the cached full checkpoint
    python bench/memory_breakdown.py --workload image2 --int8-ckpt DIR      # lean mode, from `m0lite quantize`'s file

One process, as a bench_e2e.py worker runs (inputs made before loading, then
`--runs` runs of the workload, every tower in its fast form first). Prints:
- VmRSS, its peak (VmHWM), and its private and mapped-file parts after each stage;
- glibc's live heap (`mallinfo2`: bytes handed out and not yet freed), sampled every
  millisecond during the last run: its base, its peak, and the block running at the peak;
- the resident pages of each mapping at the end (anonymous memory, the heap, shared
  libraries, the checkpoint);
- the checkpoint's tensors with resident pages (`/proc/self/pagemap`), the largest first.
Linux with glibc only.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import functools
import json
import re
import struct
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_e2e import ensure_checkpoint  # noqa: E402
from bench.e2e_worker import WORKLOADS, _tokenizer, make_workload, vm_status  # noqa: E402

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    fn = ctypes.CDLL(None).mallinfo2
    fn.restype = _MallInfo2
    return fn


def live_heap() -> int:
    """Bytes glibc has handed out and not had back: from its heaps, and blocks mapped on their own."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


def rss_line(stage: str) -> str:
    f = lambda field: f"{vm_status(field) / MIB:7.0f}"  # noqa: E731
    return f"{stage:28} RSS {f('VmRSS')}  peak {f('VmHWM')}  private {f('RssAnon')}  mapped files {f('RssFile')}  (MiB)"


def resident_by_mapping() -> collections.Counter:
    """Resident bytes per mapping name ([anon], [heap], a file's path), from /proc/self/smaps."""
    by, name = collections.Counter(), None
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif line.startswith("Rss:"):
            by[name] += int(line.split()[1]) * 1024
    return by


def resident_tensors(path: Path) -> collections.Counter:
    """Resident bytes per tensor of a safetensors file that this process maps (present pages in pagemap)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    spans = sorted((8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1], k) for k, v in header.items())
    starts = [s for s, _, _ in spans]
    by = collections.Counter()
    with open("/proc/self/pagemap", "rb") as pagemap:
        for line in open("/proc/self/maps"):
            parts = line.split()
            if len(parts) < 6 or parts[5] != str(path):
                continue
            (lo, hi), offset = (int(a, 16) for a in parts[0].split("-")), int(parts[2], 16)
            pagemap.seek(lo // 4096 * 8)
            entries = pagemap.read((hi - lo) // 4096 * 8)
            for i in range((hi - lo) // 4096):
                if struct.unpack_from("<Q", entries, 8 * i)[0] >> 63:  # bit 63: page present
                    at = offset + 4096 * i
                    j = bisect.bisect_right(starts, at) - 1
                    by[spans[j][2] if j >= 0 and at < spans[j][1] else "(header)"] += 4096
    return by


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="text8", choices=list(WORKLOADS))
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the cached random one)")
    ap.add_argument("--int8-ckpt", type=Path, default=None, help="load this `m0lite quantize` output instead")
    ap.add_argument("--quantize", action="store_true", help="quantise --model to int8 at load")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="default: the library's (bf16 if the CPU has native bf16, else fp32)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = args.model or ensure_checkpoint(quick=False)
    made = {v: make_workload(args.workload, folder, False, v) for v in range(args.runs)}
    from m0lite import Reranker, cpu
    from m0lite.memory import trim_heap

    _tokenizer.cache_clear()  # the harness's tokenizer, as bench_e2e.py's worker lets it go
    trim_heap()
    print(rss_line("before loading (inputs made)"))

    ckpt = args.int8_ckpt or folder
    rr = Reranker.from_pretrained(ckpt, dtype=args.dtype, quantize="int8" if args.quantize else None)
    print(f"{cpu.describe()}; dtype {rr.model.dtype}")
    print(rss_line("loaded"))
    rr.pack(["decoder", "vision"] if "image" in args.workload else ["decoder"])
    print(rss_line("in the fast form"))

    stage = ["outside a block"]
    for tower, blocks in (("decoder layer", rr.model.model.layers), ("vision block", rr.model.visual.blocks)):
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda mod, a, name=f"{tower} {i}": stage.__setitem__(0, name))
    peak, running = [0, ""], [True]

    def sample():
        while running[0]:
            live = live_heap()
            if live > peak[0]:
                peak[:] = [live, stage[0]]
            time.sleep(0.001)

    for v in range(args.runs):
        pairs, qt, dt = made[v]
        if v == args.runs - 1:
            base = live_heap()
            sampler = threading.Thread(target=sample)
            sampler.start()
        t = time.perf_counter()
        rr.compute_score(pairs, query_type=qt, doc_type=dt)
        print(rss_line(f"run {v + 1} ({time.perf_counter() - t:.1f} s)"))
    running[0] = False
    sampler.join()
    print(f"\nlive heap in the last run: base {base / MIB:.0f} MiB, peak {peak[0] / MIB:.0f} MiB "
          f"(+{(peak[0] - base) / MIB:.0f}), at the peak: {peak[1]}")
    print("\nresident at the end, by mapping:")
    for name, size in resident_by_mapping().most_common(args.top):
        print(f"  {size / MIB:8.1f} MiB  {name}")
    for path in sorted(Path(ckpt).glob("*.safetensors")):
        tensors = resident_tensors(path.resolve())
        print(f"\n{path.name}: {sum(tensors.values()) / MIB:.1f} MiB resident, the largest:")
        for name, size in tensors.most_common(args.top):
            print(f"  {size / MIB:8.1f} MiB  {name}")


if __name__ == "__main__":
    main()
