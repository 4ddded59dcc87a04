"""Shared benchmark helpers: device name, timing, the measured hardware peaks, tables, CSV.

Timing: on CUDA `triton.testing.do_bench` (device events, L2 flushed before every
run); on CPU a wall-clock timer after warm-up. Both report the median and the
20th/80th percentiles in milliseconds.
"""

import csv
import datetime
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from m0lite import cpu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def device_name():
    if CUDA:
        return torch.cuda.get_device_name()
    return f"{cpu.describe()} ({os.cpu_count()} cores)"  # with any mask or library cap in force


def no_gpu_banner(script):
    if not CUDA:
        print(f"*** {script}: no GPU present. Timing the torch providers on CPU at small sizes only;\n"
              f"*** the Triton kernels are skipped (the interpreter is a correctness tool, not a speed one).")


def time_ms(fn, quick=False):
    """(median, p20, p80) milliseconds per call of fn()."""
    if CUDA:
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (first-call allocations, lazy init)
    times, budget = [], time.perf_counter() + (0.3 if quick else 1.0)
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def peak_copy_gbs(quick=False):
    """Measured copy bandwidth (read + write bytes per second) of a large copy_, in GB/s."""
    n = (1 << 30 if CUDA else 1 << 27) // (4 if quick else 1)
    src = torch.randn(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), quick)[0]
    return 2 * src.numel() * src.element_size() / ms / 1e6


def peak_matmul_tflops(dtype, quick=False):
    """Measured dense matmul rate in `dtype`, in TFLOP/s (the attention roofline)."""
    n = (4096 if quick else 8192) if CUDA else 1024
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = time_ms(lambda: torch.matmul(a, b), quick)[0]
    return 2 * n**3 / ms / 1e9


def print_table(rows, columns, title=None):
    if title:
        print(f"\n{title}")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_csv(bench, rows, out_dir=None):
    """Append rows to <out_dir>/<bench>-<device>.csv, each tagged with device and date."""
    out_dir = Path(out_dir or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()[:60]
    path = out_dir / f"{bench}-{slug}.csv"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = [{"date": stamp, "device": device, "torch": torch.__version__, **r} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    new = not path.exists()
    if not new:
        with open(path) as f:
            old_fields = next(csv.reader(f), [])
        if old_fields != fields:  # columns changed: start a fresh file rather than mix layouts
            path.rename(path.with_suffix(f".{stamp.replace(':', '')}.csv"))
            new = True
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {path}")
    return path
