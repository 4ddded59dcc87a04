"""End to end on one device, every side in this one process: m0lite against the transformers reference.

The GPU companion of bench_e2e.py, whose one-process-per-side design measures what matters on a CPU
(RSS, threads, a shared VM's drift). Here the checkpoint is loaded once per side: m0lite
(`compute_score` with its defaults), then the reference (tests/reference.py: transformers,
attn_implementation="sdpa", same dtype, same device), timed twice: as the original compute_score
(left-padded batches of 8, "ref8") and one pair at a time ("ref1"). Workloads, inputs and FLOP counts
are bench_e2e's and e2e_worker's, so every side scores identical pairs: warm-ups variants 0, 1, ...,
timed runs TIMED_VARIANTS + i (new documents or pixels each run, so that m0lite's caches serve none).
Each run is timed between two device synchronisations; peak memory is torch.cuda.max_memory_allocated
over one side's runs of one workload (weights included), reset in between.

    python bench/e2e_cuda.py --ckpt /tmp/m0lite-full --write-ckpt full             # a GPU, full size
    python bench/e2e_cuda.py --ckpt /tmp/m0lite-tiny --write-ckpt tiny --quick     # CPU: the dry run

Prints one table and the m0lite/reference ratios, writes the rows with common.write_csv
(e2e-<device>.csv) and exits 1 if a side failed or a normalised score is more than --tol from m0lite's
(the project's bf16 contract; the raw difference is reported beside it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_csv  # noqa: E402  (common puts the repository root on sys.path)

from bench.bench_e2e import flops, quick_config, write_checkpoint  # noqa: E402
from bench.e2e_worker import TIMED_VARIANTS, WARM_PAIR, WORKLOADS, make_workload, reference_sizes, sigmoid_shifted  # noqa: E402


def checkpoint_config(name: str):
    from m0lite.fixtures.random_checkpoint import FULL_CONFIG, TINY_CONFIG

    return {"full": FULL_CONFIG, "quick": quick_config(), "tiny": TINY_CONFIG}[name]


class Device:
    """Synchronisation and memory counters of one torch device (no-ops on a CPU)."""

    def __init__(self, name: str):
        import torch

        self.torch, self.dev = torch, torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset_peak(self):
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def allocated(self):
        return self.torch.cuda.memory_allocated(self.dev) if self.cuda else ""

    def peak(self):
        return self.torch.cuda.max_memory_allocated(self.dev) if self.cuda else ""

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def load(make, device: Device) -> tuple:
    """(score function, load seconds: weights onto the device plus one short pair scored, weights bytes)."""
    device.free()
    device.reset_peak()
    t = time.perf_counter()
    score = make()
    score([WARM_PAIR], "text", "text")
    device.sync()
    return score, time.perf_counter() - t, device.allocated()


def measure(side: str, score, inputs: dict, args, device: Device) -> dict:
    """Warm-ups, then timed runs of each workload; per workload the times, raw scores by variant, peak memory."""
    out = {}
    for w, variants in inputs.items():
        try:
            device.reset_peak()
            runs = {}
            for v, (pairs, qt, dt) in variants.items():
                device.sync()
                t = time.perf_counter()
                scores = score(pairs, qt, dt)
                device.sync()
                runs[v] = (time.perf_counter() - t, scores)
                print(f"[{side} {w}] variant {v}: {runs[v][0]:.3f}s", flush=True)
            timed = {v: r for v, r in runs.items() if v >= TIMED_VARIANTS}
            out[w] = {"times": [r[0] for r in timed.values()], "scores": {v: r[1] for v, r in runs.items()},
                      "peak": device.peak()}
        except Exception:  # one failing workload must not hide the others' numbers
            traceback.print_exc()
            out[w] = {"error": traceback.format_exc(limit=1).strip().splitlines()[-1]}
    return out


def profile(score, inputs: dict, path: Path, device: Device) -> None:
    """One more run of each workload under torch.profiler: the wall time, the device's kernel time within
    it (a share far below 1 means the host's launches, not the device, set the pace), and the top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.cuda else [])
    with open(path, "w") as f:
        for w, variants in inputs.items():
            pairs, qt, dt = variants[max(variants)]
            device.sync()
            with torch_profile(activities=activities) as prof:
                t = time.perf_counter()
                score(pairs, qt, dt)
                device.sync()
                wall = time.perf_counter() - t
            events = prof.key_averages()
            # Each device kernel is one event of its own (device_type CUDA); the ops that launched it are not.
            kernels = [e for e in prof.events() if e.device_type == device.torch.autograd.DeviceType.CUDA]
            busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
            line = f"{w}: wall {wall * 1e3:.1f} ms (profiled), device kernels {busy * 1e3:.1f} ms ({busy / wall:.0%} busy)"
            print(line, flush=True)
            sort = "self_cuda_time_total" if device.cuda else "self_cpu_time_total"
            f.write(f"== {line}\n{events.table(sort_by=sort, row_limit=15, max_name_column_width=60)}\n"
                    f"{events.table(sort_by='self_cpu_time_total', row_limit=15, max_name_column_width=60)}\n")


def max_diff(a: dict, b: dict, f=lambda x: x):
    common = set(a) & set(b)
    return max((abs(f(x) - f(y)) for v in common for x, y in zip(a[v], b[v])), default=math.nan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (written there first with --write-ckpt)")
    ap.add_argument("--write-ckpt", choices=["full", "quick", "tiny"],
                    help="write a random checkpoint of this config at --ckpt unless one is there (full: Qwen2-VL-2B sizes)")
    ap.add_argument("--write-only", action="store_true", help="only write the checkpoint")
    ap.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--sides", default="m0lite,ref8,ref1", help="comma list of m0lite, ref8, ref1")
    ap.add_argument("--quick", action="store_true", help="the workloads' quick shapes (text32: 16 docs of 64..1024)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=2e-2, help="max |diff| of normalised scores, each reference side vs m0lite")
    ap.add_argument("--out", default=None, help="CSV directory (default bench/results)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also profile one more m0lite run of each workload: device-busy share and top ops, to this file")
    args = ap.parse_args()

    import torch

    from m0lite.reranker import DTYPES

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = DTYPES[args.dtype]
    if args.write_ckpt:
        t = time.perf_counter()
        write_checkpoint(args.ckpt, checkpoint_config(args.write_ckpt), args.dtype)
        print(f"checkpoint {args.ckpt} ready after {time.perf_counter() - t:.1f}s", flush=True)
    if args.write_only:
        return
    device = Device(args.device)
    cfg = json.loads((args.ckpt / "config.json").read_text())
    workloads = [w for w in args.workloads.split(",") if w]
    sides = [s for s in args.sides.split(",") if s]
    name = torch.cuda.get_device_name(device.dev) if device.cuda else "cpu"
    print(f"# e2e on {name}: {args.dtype}, checkpoint {args.ckpt} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vision {cfg['vision_config']['depth']} x {cfg['vision_config']['embed_dim']}); sides {', '.join(sides)}; "
          f"warmup {args.warmup}, repeats {args.repeats}", flush=True)

    variants = [*range(args.warmup), *range(TIMED_VARIANTS, TIMED_VARIANTS + args.repeats)]
    inputs = {w: {v: make_workload(w, args.ckpt, args.quick, v) for v in variants} for w in workloads}
    results, loads, sizes, ok = {}, {}, {}, True

    if "m0lite" in sides:
        def make_m0lite():
            from m0lite import Reranker

            rr = Reranker.from_pretrained(args.ckpt, device=args.device, dtype=dtype)
            return lambda pairs, qt, dt: rr.compute_score(pairs, query_type=qt, doc_type=dt, normalize_scores=False)

        try:
            score, *loads["m0lite"] = load(make_m0lite, device)
            results["m0lite"] = measure("m0lite", score, inputs, args, device)
            if args.profile:
                profile(score, inputs, args.profile, device)
        except Exception:
            traceback.print_exc()
            ok = False
        score = None
    refs = [s for s in sides if s in ("ref8", "ref1")]
    if refs:
        import transformers

        from tests.reference import Reference

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        holder = {}

        def make_ref():
            holder["ref"] = Reference(args.ckpt, dtype, device=args.device)
            return lambda pairs, qt, dt: holder["ref"].raw_scores(pairs, batch_size=1, query_type=qt, doc_type=dt)

        try:
            _, *loads["ref"] = load(make_ref, device)
            ref = holder.pop("ref")
            for w, vs in inputs.items():
                sizes[w] = reference_sizes(ref, *vs[variants[0]], 8)
            for side in refs:
                bs = 8 if side == "ref8" else 1
                results[side] = measure(side, lambda pairs, qt, dt, bs=bs: ref.raw_scores(pairs, batch_size=bs, query_type=qt, doc_type=dt),
                                        inputs, args, device)
        except Exception:
            traceback.print_exc()
            ok = False

    rows = []
    for w in workloads:
        size = sizes.get(w)
        work = flops(cfg, size["prompt_tokens"], size["image_patches"]) if size else None
        base = results.get("m0lite", {}).get(w, {})
        for side, res in results.items():
            r = res[w]
            load_s, weights = loads["m0lite" if side == "m0lite" else "ref"]
            row = dict(workload=w, side=side, dtype=args.dtype, pairs=len(inputs[w][variants[0]][0]), load_s=load_s,
                       weights_gib=weights / 2**30 if weights != "" else "")
            if "error" in r:
                rows.append(dict(row, ok=False, error=r["error"]))
                ok = False
                continue
            med = statistics.median(r["times"])
            row.update(lat_median_s=med, lat_min_s=min(r["times"]), lat_max_s=max(r["times"]), pairs_per_s=row["pairs"] / med,
                       prompt_tokens=sum(size["prompt_tokens"]) if size else "",
                       padded_tokens=size["processed_tokens"] if size and side == "ref8" else "",
                       useful_tflops=work / med / 1e12 if work else "", peak_mem_gib=r["peak"] / 2**30 if r["peak"] != "" else "")
            if side != "m0lite" and "scores" in base:
                norm = max_diff(r["scores"], base["scores"], sigmoid_shifted)
                good = norm <= args.tol
                ok &= good
                row.update(speedup=med / statistics.median(base["times"]), max_raw_diff=max_diff(r["scores"], base["scores"]),
                           max_norm_diff=norm, ok=good)
            rows.append(row)
    if not rows:
        raise SystemExit("no results")
    print_table(rows, ["workload", "side", "lat_median_s", "pairs_per_s", "useful_tflops", "peak_mem_gib", "weights_gib", "load_s",
                       "speedup", "max_raw_diff", "max_norm_diff", "ok", "error"],
                title=f"end to end on {name}, {args.dtype} (speedup: reference latency / m0lite latency; diffs vs m0lite)")
    write_csv("e2e", rows, args.out)
    if not ok:
        print(f"\n!!! E2E: a side failed or a normalised score is more than {args.tol} from m0lite's (see above) !!!")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
