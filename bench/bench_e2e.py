"""End to end on CPU: m0lite against the transformers reference, same file, same pairs.

Each (workload, side) runs in its own process (`bench/e2e_worker.py`), so peak
RSS and load time (file to first score) are that side's alone. The sides load
one after another and then take turns for their timed runs (`--no-interleave`:
one side after the other), so that the drift of a shared VM's speed over minutes
does not land on one side only. Sides: m0lite's
`compute_score` with its defaults; the reference as the original compute_score
(left-padded batches of 8, "ref8"); the reference one pair at a time ("ref1").
Workloads are those of /work/shared/BENCH.md (see `--list`).

    python bench/bench_e2e.py --quick                      # small labelled config, all workloads
    python bench/bench_e2e.py --workloads text8,image4     # the real Qwen2-VL-2B sizes, random weights

Prints one table per workload (latency median [p20..p80], pairs/s, tokens/s,
useful GFLOP/s, peak RSS, load time) and the m0lite/reference ratios; checks
that the normalised scores agree; writes the raw numbers to
bench/results/e2e_<date>_<mode>_<dtype>_<workloads>.csv.

Budget (2 Xeon cores with AMX, bf16, full size): text8 + image2 + image4 with
--sides m0lite,ref1 --repeats 3 take about 8 minutes; text32 with all three sides
about 16 minutes with --repeats 2 --warmup 0 --retries 0 (a padded reference run
of text32 takes over 3 minutes). --quick runs everything in about 4 minutes.
The machine may be shared: each side waits for idle CPUs, measures what other
processes take during each run, and leaves contended runs out of the statistics.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "bench" / "e2e_worker.py"
CACHE = Path(os.environ.get("M0LITE_CACHE", Path.home() / ".cache" / "m0lite"))
SIDES = ("m0lite", "ref8", "ref1", "m0lite-int8", "m0lite-base")
TOLERANCE = {"bf16": 2e-2, "fp32": 1e-3}  # max |diff| of normalised scores
INT8_TOLERANCE = 0.03  # the lean mode's stated tolerance against exact m0lite (README)

sys.path.insert(0, str(REPO))
from bench.e2e_worker import TIMED_VARIANTS, WORKLOADS  # noqa: E402  (the worker module imports nothing heavy at top level)
# Before anything imports torch: M0LITE_CPU_ISA's caps on oneDNN and MKL go into this process's environment, so that
# the header names them and every side's worker, the reference's included, inherits them.
import m0lite.cpu  # noqa: E402


def quick_config():
    """Labelled small config for --quick: real vocab and head_dim, 4 decoder layers of width 512,
    a 4-block vision tower of width 320 (head_dim 80, as the real one)."""
    from m0lite.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        text=TextConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
        vision=VisionConfig(depth=4, embed_dim=320, num_heads=4, hidden_size=512),
    )


def ensure_checkpoint(quick: bool) -> Path:
    """A random bf16 checkpoint in the published layout, written once into the cache."""
    from m0lite.fixtures.random_checkpoint import FULL_CONFIG

    return write_checkpoint(CACHE / ("bench-quick-bf16" if quick else "bench-full-bf16"), quick_config() if quick else FULL_CONFIG)


def write_checkpoint(folder: Path, config, dtype: str = "bf16") -> Path:
    """A random checkpoint of `config` in the published layout at `folder`, unless one is there already
    (written beside it, then renamed: a folder that exists is complete)."""
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    from m0lite.fixtures.random_checkpoint import write_random_checkpoint
    from m0lite.reranker import DTYPES

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"writing a random checkpoint to {folder} (once; the full one takes a minute or two, ~10 GB RAM)", file=sys.stderr)
    write_random_checkpoint(tmp, config, seed=0, dtype=DTYPES[dtype])
    os.replace(tmp, folder)
    return folder


def warm_page_cache(path: Path) -> None:
    """Read the weights (a checkpoint folder's safetensors, or one file) once, so that no side pays a cold disk
    read another does not."""
    for f in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def cpu_info() -> tuple[str, set[str]]:
    """The CPU as m0lite sees it (m0lite/cpu.py): its name with any mask or library cap in force, and its flags
    less the masked ones."""
    return m0lite.cpu.describe(), set(m0lite.cpu.flags())


def default_dtype(flags: set[str]) -> tuple[str, str]:
    native = sorted(flags & set(m0lite.cpu.NATIVE_BF16))
    if native:
        return "bf16", f"the CPU has native bf16 ({', '.join(native)})"
    return "fp32", f"the CPU has no native bf16 (no {' / '.join(m0lite.cpu.NATIVE_BF16)} flag): bf16 would be emulated"


def git_state() -> tuple[str, str]:
    """Short commit and a note on uncommitted changes (read-only git commands)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [l[3:] for l in git("status", "--porcelain").splitlines()
             if l[3:].startswith(("m0lite/", "kernels/", "weights/", "tests/reference.py"))]
    return commit, (f"uncommitted changes in {len(dirty)} paths: {' '.join(dirty)}" if dirty else "clean")


def flops(cfg: dict, prompt_tokens: list[int], image_patches: list[int]) -> float:
    """Useful FLOPs of the forward passes (2 per multiply-add; padding not counted; causal attention
    counted as half the square). From config.json (the flat 4.x layout written by m0lite/fixtures/random_checkpoint.py)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // nh
    per_token = layers * (h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * inter)  # q,k,v,o and SwiGLU MACs
    total = sum(2 * per_token * n + layers * 4 * nh * hd * n * (n + 1) / 2 for n in prompt_tokens)
    total += len(prompt_tokens) * 2 * (h * h + h)  # score head, last token only
    v = cfg["vision_config"]
    e, depth = v["embed_dim"], v["depth"]
    mlp, patch_dim = int(e * v["mlp_ratio"]), 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    window = e * v["spatial_merge_size"] ** 2
    per_patch = patch_dim * e + depth * (4 * e * e + 2 * e * mlp)
    for p in image_patches:
        total += 2 * per_patch * p + depth * 4 * e * p * p + 2 * (p // 4) * (window * window + window * h)
    return total


def matmul_tflops(dtype_name: str, threads: int) -> float:
    """Measured dense matmul rate (2048^3, this dtype, these threads): the roof the GFLOP/s columns sit under."""
    import torch

    from m0lite.reranker import DTYPES

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    a, b = (torch.randn(2048, 2048).to(dtype) for _ in range(2))
    times = []
    for _ in range(12):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / statistics.median(times[2:]) / 1e12


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def machine_busy(seconds: float) -> float:
    """Share of all CPUs busy over the next `seconds` (this process idles meanwhile)."""
    def busy():
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        return user + nice + system + irq + softirq + steal, idle + iowait

    b0, i0 = busy()
    time.sleep(seconds)
    b1, i1 = busy()
    return (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))


def wait_for_quiet(args, tag: str) -> None:
    """Before starting a side, wait (up to --wait-quiet seconds) until other processes leave the CPUs idle."""
    start = time.monotonic()
    while (share := machine_busy(3.0)) > args.max_others:
        waited = time.monotonic() - start
        if waited > args.wait_quiet:
            print(f"{tag} the machine is still {share:.0%} busy with other processes; starting anyway", file=sys.stderr, flush=True)
            return
        if int(waited) % 30 < 3:
            print(f"{tag} waiting: other processes keep {share:.0%} of the CPUs busy", file=sys.stderr, flush=True)


def run_side(side: str, workload: str, args, folder: Path) -> dict:
    """A worker run; made again (up to --side-attempts in all) when other processes spoiled too many of
    its timed runs or its load; the attempt with the most uncontended runs (then an uncontended load) is kept."""
    best, quality = None, None
    for attempt in range(1, args.side_attempts + 1):
        res = run_worker(side, workload, args, folder)
        clean = sum(r["clean"] for r in res["runs"])
        res["attempt"] = attempt
        q = (clean, res["load_others"] <= args.max_others)
        if best is None or q > quality:
            best, quality = res, q
        if clean >= args.repeats and res["load_others"] <= args.max_others:
            break
        if attempt < args.side_attempts:
            print(f"[{side} {workload}] {clean}/{args.repeats} uncontended runs, load {res['load_others']:.0%} contended: "
                  f"trying again ({attempt + 1}/{args.side_attempts})", file=sys.stderr, flush=True)
    return best


def worker_command(side: str, workload: str, args, folder: Path) -> tuple[list[str], dict, Path]:
    """The worker's command line, environment and folder. "m0lite-base" is the m0lite side of another
    checkout (`--baseline`), run from there: the code before a change, against the code after it."""
    tree, worker_side = (args.baseline, "m0lite") if side == "m0lite-base" else (REPO, side)
    if side == "m0lite-int8" and args.int8_ckpt:  # what a lean deployment loads: the file `m0lite quantize` wrote
        folder = args.int8_ckpt
    cmd = [sys.executable, str(tree / "bench" / "e2e_worker.py"), "--side", worker_side, "--ckpt", str(folder), "--workload", workload,
           "--dtype", args.dtype, "--threads", str(args.threads), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--retries", str(args.retries), "--max-others", str(args.max_others)]
    if args.quick:
        cmd.append("--quick")
    if args.compile and side == "m0lite":
        cmd.append("--compile")
    if args.profile and side == "m0lite":
        args.out_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--profile", str(args.out_dir / f"profile_{args.stamp}_{args.mode}_{workload}_m0lite.txt")]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    return cmd, env, tree


def finish(side: str, workload: str, stdout: str, returncode: int, started: float, load_before: float) -> dict:
    """The worker's result line, with the timed runs the statistics use."""
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    if returncode or not lines:
        raise SystemExit(f"worker {side} {workload} failed (exit {returncode}):\n{stdout[-2000:]}")
    res = json.loads(lines[-1])
    clean = [r for r in res["runs"] if r["clean"]]
    if not clean:
        print(f"[{side} {workload}] every timed run was contended: statistics use all of them", file=sys.stderr)
    res["times_s"] = [r["time_s"] for r in clean or res["runs"]]
    res.update(wall_s=time.perf_counter() - started, loadavg_before=load_before, loadavg_after=os.getloadavg()[0])
    print(f"[{side} {workload}] done in {res['wall_s']:.0f}s", file=sys.stderr, flush=True)
    return res


def run_worker(side: str, workload: str, args, folder: Path) -> dict:
    cmd, env, tree = worker_command(side, workload, args, folder)
    wait_for_quiet(args, f"[{side} {workload}]")
    print(f"[{side} {workload}] start (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    return finish(side, workload, proc.stdout, proc.returncode, t, load_before)


def run_interleaved(sides: list[str], workload: str, args, folder: Path) -> dict[str, dict]:
    """Every side's worker up at once, loaded one after another (so each load runs alone); then their
    timed runs take turns, the order rotating each round, until every side has --repeats uncontended
    runs or --retries extra rounds are spent. The VM's speed drifts by 10% and more over minutes:
    sides timed minutes apart would compare that drift, sides timed in turns do not."""
    procs, starts, out = {}, {}, {}

    def expect(side: str, prefix: str) -> str:
        for line in procs[side].stdout:
            out[side] += line
            if line.startswith(prefix):
                return line[len(prefix):]
        procs[side].wait()
        raise SystemExit(f"worker {side} {workload} ended early (exit {procs[side].returncode}):\n{out[side][-2000:]}")

    try:
        for side in sides:
            cmd, env, tree = worker_command(side, workload, args, folder)
            wait_for_quiet(args, f"[{side} {workload}]")
            print(f"[{side} {workload}] start (load average {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
            starts[side] = (time.perf_counter(), os.getloadavg()[0])
            procs[side] = subprocess.Popen(cmd + ["--interleave"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, env=env, cwd=tree)
            out[side] = ""
            expect(side, "@ready")
        clean = dict.fromkeys(sides, 0)
        for i in range(args.repeats + args.retries):
            if min(clean.values()) >= args.repeats:
                break
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                procs[side].stdin.write(f"run {TIMED_VARIANTS + i}\n")
                procs[side].stdin.flush()
                clean[side] += json.loads(expect(side, "@run "))["clean"]
        results = {}
        for side in sides:
            procs[side].stdin.write("done\n")
            procs[side].stdin.close()
            rest = procs[side].stdout.read()  # the worker's result line, after "done"
            procs[side].wait()
            results[side] = finish(side, workload, out[side] + rest, procs[side].returncode, *starts[side])
        return results
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def score_diff(a: dict, b: dict) -> float | None:
    """Max |diff| of normalised scores over the input variants both sides scored."""
    sa = {r["variant"]: r["scores"] for r in a["runs"]}
    sb = {r["variant"]: r["scores"] for r in b["runs"]}
    common = sorted(set(sa) & set(sb))
    return max((abs(x - y) for v in common for x, y in zip(sa[v], sb[v])), default=None)


def report(workload: str, results: dict[str, dict], cfg: dict, args) -> tuple[list[dict], dict, bool]:
    """Print the workload's table; return CSV rows, the ratios and whether the scores agree."""
    sizes = next((r for r in results.values() if "prompt_tokens" in r), None)
    tokens = sum(sizes["prompt_tokens"]) if sizes else None
    work = flops(cfg, sizes["prompt_tokens"], sizes["image_patches"]) if sizes else None
    patches = sum(sizes["image_patches"]) if sizes else None
    print(f"\n## {workload}: {WORKLOADS[workload]}" + (" [quick]" if args.quick else ""))
    if sizes:
        print(f"   {len(sizes['prompt_tokens'])} pairs, {tokens} prompt tokens (min {min(sizes['prompt_tokens'])}, "
              f"max {max(sizes['prompt_tokens'])}), {patches} vision patches, {work / 1e12:.3f} TFLOP of useful work per run")
    head = (f"{'side':11} {'latency median [p20..p80] (min..max)':44} {'CPU-s':>6} {'pairs/s':>8} {'tok/s':>7} {'GFLOP/s':>8} "
            f"{'peak RSS':>10} {'load':>7} {'runs':>5} {'others':>6}  tokens run")
    print(head + "\n" + "-" * len(head))
    rows, base, contended = [], results.get("m0lite"), False
    for side, r in results.items():
        ts = r["times_s"]
        counted = [x for x in r["runs"] if x["clean"]] or r["runs"]
        med = statistics.median(ts)
        cpu = statistics.median(x["cpu_s"] for x in counted)
        others = statistics.mean(x["others"] for x in counted)
        diff = score_diff(r, base) if base else None
        row = {
            "workload": workload, "side": side, "pairs": r["pairs"], "prompt_tokens": tokens or "",
            "processed_tokens": r.get("processed_tokens", ""), "image_patches": patches if patches is not None else "",
            "useful_tflop": f"{work / 1e12:.5f}" if work else "",
            "load_s": r["load_s"], "weights_s": r["weights_s"], "first_score_s": r["first_score_s"], "load_others": r["load_others"],
            "lat_median_s": med, "lat_p20_s": percentile(ts, 0.2), "lat_p80_s": percentile(ts, 0.8),
            "lat_min_s": min(ts), "lat_max_s": max(ts), "cpu_median_s": cpu, "pairs_per_s": r["pairs"] / med,
            "tokens_per_s": tokens / med if tokens else "", "gflops_per_s": work / med / 1e9 if work else "",
            "peak_rss_bytes": r["peak_rss_bytes"], "rss_before_load_bytes": r["rss_before_load_bytes"],
            "rss_after_load_bytes": r["rss_after_load_bytes"],
            "rss_anon_end_bytes": r["rss_anon_end_bytes"], "rss_file_end_bytes": r["rss_file_end_bytes"],
            "runs_counted": len(ts), "runs_total": len(r["runs"]), "others_mean": others,
            "loadavg_before": r["loadavg_before"], "loadavg_after": r["loadavg_after"],
            "max_abs_diff_vs_m0lite": diff if diff is not None else "",
            "all_runs": ";".join(f"v{x['variant']}:{x['time_s']:.4f}s/{x['cpu_s']:.2f}cpu/{x['others']:.2f}others" for x in r["runs"]),
            "description": r["description"], "packed_weights": r.get("packed_weights", ""),
        }
        contended |= others > args.max_others or r["load_others"] > args.max_others
        rows.append(row)
        lat = f"{med:.3f}s [{row['lat_p20_s']:.3f}..{row['lat_p80_s']:.3f}] ({min(ts):.3f}..{max(ts):.3f})"
        pad = (f"{row['processed_tokens']}" if not side.startswith("m0lite")
               else f"{tokens or ''} (no padding; packed weights: {r.get('packed_weights') or 'none'})")
        tok_s = f"{tokens / med:.0f}" if tokens else "?"
        gflop_s = f"{work / med / 1e9:.1f}" if work else "?"
        print(f"{side:11} {lat:44} {cpu:6.2f} {row['pairs_per_s']:8.3f} {tok_s:>7} {gflop_s:>8} {gib(r['peak_rss_bytes']):>10} "
              f"{r['load_s']:6.2f}s {len(ts):>2}/{len(r['runs']):<2} {others:6.0%}  {pad}")
    print("(CPU-s: this process's CPU time per run; runs: counted/made; others: share of all CPUs that other processes "
          "used during the counted runs; peak RSS includes "
          + ", ".join(f"{s} {gib(r['rss_before_load_bytes'])}" for s, r in results.items())
          + " of interpreter, torch and inputs before loading; at the end, private + mapped-file RSS: "
          + ", ".join(f"{s} {gib(r['rss_anon_end_bytes'])} + {gib(r['rss_file_end_bytes'])}" for s, r in results.items()) + ")")
    if contended:
        print(f"!!! other processes used over {args.max_others:.0%} of the CPUs during some counted runs or a load: "
              "those numbers are inflated and noisy !!!")

    ratios, ok = {}, True
    if base:
        m_lat = statistics.median(base["times_s"])
        for side, r in results.items():
            if side == "m0lite":
                continue
            if side == "m0lite-int8":  # the other way round: the lean mode against exact m0lite
                ratios[side] = x = {"speedup": m_lat / statistics.median(r["times_s"]),
                                    "rss": r["peak_rss_bytes"] / base["peak_rss_bytes"], "load": r["load_s"] / base["load_s"]}
                diff = score_diff(r, base)
                good = diff is not None and diff <= INT8_TOLERANCE
                ok &= good
                print(f"int8 vs m0lite: speedup {x['speedup']:.2f}x (m0lite time / int8 time), memory {x['rss']:.2f}x "
                      f"(int8 RSS / m0lite RSS), load {x['load']:.2f}x; normalised scores max |diff| "
                      + (f"{diff:.2e} " if diff is not None else "n/a ")
                      + ("within" if good else "!!! OVER") + f" the stated {INT8_TOLERANCE} (lossy mode)")
                continue
            ratios[side] = x = {
                "speedup": statistics.median(r["times_s"]) / m_lat,
                "rss": base["peak_rss_bytes"] / r["peak_rss_bytes"],
                "load": base["load_s"] / r["load_s"],
            }
            diff = score_diff(r, base)
            good = diff is not None and diff <= TOLERANCE[args.dtype]
            ok &= good
            print(f"m0lite vs {side}: speedup {x['speedup']:.2f}x (ref time / m0lite time), memory {x['rss']:.2f}x "
                  f"(m0lite RSS / ref RSS), load {x['load']:.2f}x (m0lite / ref); normalised scores max |diff| "
                  + (f"{diff:.2e} " if diff is not None else "n/a ")
                  + ("OK" if good else f"!!! SCORE MISMATCH (tolerance {TOLERANCE[args.dtype]:.0e} in {args.dtype}) !!!"))
    return rows, ratios, ok


def goals(all_ratios: dict[str, dict]) -> None:
    """The issue's targets, for the workloads and sides that were run."""
    print("\n## Goals (only what was measured above)")
    checks = []  # (name, value, target, higher is better)
    for w, rs in all_ratios.items():
        rs.pop("m0lite-base", None)  # printed with the workload's table; no goal of its own
        if "m0lite-int8" in rs:
            x = rs.pop("m0lite-int8")
            checks.append((f"{w} int8 speedup vs m0lite >= 1.5x", x["speedup"], 1.5, True))
            checks.append((f"{w} int8 peak RSS / m0lite <= 0.55x", x["rss"], 0.55, False))
        if w == "text32" and "ref8" in rs:
            checks.append(("text32 speedup vs ref8 (original compute_score) >= 2x", rs["ref8"]["speedup"], 2.0, True))
        for side, x in rs.items():
            if w.startswith("text") and side == "ref1":
                checks.append((f"{w} speedup vs ref1 (one pair at a time) >= 1.3x", x["speedup"], 1.3, True))
            if w.startswith("image"):
                checks.append((f"{w} speedup vs {side} >= 1.3x", x["speedup"], 1.3, True))
            checks.append((f"{w} load time m0lite/{side} <= 0.25x", x["load"], 0.25, False))
            checks.append((f"{w} peak RSS m0lite/{side} <= 0.6x", x["rss"], 0.6, False))
    for name, value, target, higher in checks:
        met = value >= target if higher else value <= target
        print(f"  {'MET    ' if met else 'NOT MET'} {name}: {value:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small labelled config (hidden 512, 4 layers; vision 4 x 320), shorter text32")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 if the CPU has native bf16, else fp32")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--sides", default=",".join(SIDES[:3]),
                    help="comma list of m0lite, ref8, ref1, m0lite-int8 and m0lite-base (the m0lite side of --baseline)")
    ap.add_argument("--int8-ckpt", type=Path, default=None,
                    help="side m0lite-int8 loads this folder (`m0lite quantize` of the checkpoint) instead of "
                         "quantising at load")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout (e.g. a git worktree of an older commit) whose m0lite side is 'm0lite-base'")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median and spread reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed runs of the workload before timing (m0lite then warms up further, until a run "
                         "packs no more of its weights)")
    ap.add_argument("--retries", type=int, default=None,
                    help="extra timed runs allowed per side to replace runs contended by other processes (default: repeats)")
    ap.add_argument("--max-others", type=float, default=0.10,
                    help="a timed run is contended when other processes took more than this share of all CPUs (default 0.10)")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="before each side, wait up to this many seconds for other processes to leave the CPUs idle")
    ap.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="time each side's runs in one stretch instead of taking turns with the other sides")
    ap.add_argument("--side-attempts", type=int, default=3,
                    help="without interleaving: start a side again (in all up to this many times) when contention spoiled its runs or load")
    ap.add_argument("--compile", action="store_true", help="m0lite side with compile=True (torch.compile of the blocks)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides (default: all cores)")
    ap.add_argument("--ckpt", type=Path, default=None, help="use this checkpoint folder instead of the cached random one")
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler table of one m0lite run per workload")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = ap.parse_args()
    if args.retries is None:
        args.retries = args.repeats
    if args.list:
        for k, v in WORKLOADS.items():
            print(f"{k:8} {v}")
        return
    workloads = [w for w in args.workloads.split(",") if w]
    sides = [s for s in args.sides.split(",") if s]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for s in sides:
        if s not in SIDES:
            ap.error(f"unknown side {s!r}")
    if ("m0lite-base" in sides) != (args.baseline is not None):
        ap.error("the side m0lite-base and --baseline DIR go together")

    import torch

    model, flags = cpu_info()
    why = "given on the command line"
    if args.dtype is None:
        args.dtype, why = default_dtype(flags)
    args.mode = "quick" if args.quick else "full"
    args.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    commit, tree = git_state()
    folder = args.ckpt or ensure_checkpoint(args.quick)
    cfg = json.loads((folder / "config.json").read_text())
    label = (f"quick config (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vision {cfg['vision_config']['depth']} x "
             f"{cfg['vision_config']['embed_dim']}, vocab {cfg['vocab_size']})" if args.quick else "full Qwen2-VL-2B dimensions, random weights")
    cores = os.cpu_count()
    print(f"# m0lite end to end vs transformers reference — {args.stamp}")
    print(f"machine: {model}, {cores} cores, no GPU used; torch {torch.__version__}, {args.threads} threads per side")
    print(f"dtype: {args.dtype} ({why}); model: {label}; checkpoint {folder}")
    print(f"commit {commit} ({tree}); sides: {', '.join(sides)}; warmup {args.warmup}, repeats {args.repeats}")
    warm_page_cache(folder)
    wait_for_quiet(args, "[matmul peak]")
    args.peak = matmul_tflops(args.dtype, args.threads)
    print(f"measured dense {args.dtype} matmul rate (2048^3, {args.threads} threads): {args.peak:.2f} TFLOP/s")

    all_rows, all_ratios, all_ok = [], {}, True
    for w in workloads:
        if args.interleave and len(sides) > 1:
            results = run_interleaved(sides, w, args, folder)
        else:
            results = {s: run_side(s, w, args, folder) for s in sides}
        rows, ratios, ok = report(w, results, cfg, args)
        all_rows += rows
        all_ratios[w] = ratios
        all_ok &= ok
    goals(all_ratios)

    tags = {"date": args.stamp, "mode": args.mode, "config": label, "cpu": model, "cores": cores, "threads": args.threads,
            "torch": torch.__version__, "dtype": args.dtype, "commit": commit, "tree": tree,
            "warmup": args.warmup, "repeats": args.repeats, "matmul_peak_tflops": f"{args.peak:.3f}"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"e2e_{args.stamp}_{args.mode}_{args.dtype}_{'-'.join(workloads)}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*tags, *all_rows[0]])
        writer.writeheader()
        for row in all_rows:
            writer.writerow({**tags, **row})
    print(f"\nraw numbers: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if not all_ok:
        print("!!! SCORES DISAGREE WITH THE REFERENCE: the speed numbers above are not valid !!!")
        sys.exit(1)


if __name__ == "__main__":
    main()
