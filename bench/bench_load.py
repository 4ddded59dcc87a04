"""Load: peak resident memory and time from file to first score, the exact mode against the lean mode.

    python bench/bench_load.py                              # the cached full-size random bf16 checkpoint
    python bench/bench_load.py --baseline-repo /tmp/old     # also the same sides from another checkout
    M0LITE_CPU_ISA=avx2 python bench/bench_load.py          # as an AVX2-only CPU (m0lite/cpu.py)

Each side runs alone in a fresh process (peak RSS is the process's own high-water mark, VmHWM): load with
`Reranker.from_pretrained`, score one short pair, report. Sides, for each dtype:
  exact       the checkpoint in that dtype
  int8-load   quantize="int8" at load (the decoder quantised as it is read; the vision tower at its first pass)
  int8-file   the checkpoint written by `m0lite quantize` (made once, beside the cached checkpoint)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_e2e import ensure_checkpoint  # noqa: E402
from bench.common import print_table, write_csv  # noqa: E402
from m0lite import cpu  # noqa: E402

WORKER = """
import json, sys, time
t0 = time.perf_counter()
from m0lite import Reranker
folder, dtype, quantize = sys.argv[1], sys.argv[2], sys.argv[3] or None
rr = Reranker.from_pretrained(folder, dtype=dtype, quantize=quantize)
loaded = time.perf_counter() - t0
score = rr.compute_score([["warm up query", "a short first document to score"]], normalize_scores=False)
from bench.e2e_worker import vm_status
print(json.dumps({"load_s": loaded, "first_score_s": time.perf_counter() - t0, "peak": vm_status("VmHWM"),
                  "rss": vm_status("VmRSS"), "score": score}))
"""


def run(repo: Path, folder: Path, dtype: str, quantize: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", WORKER, str(folder), dtype, quantize], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"{repo} {dtype} {quantize or 'exact'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--baseline-repo", type=Path, default=None, help="another checkout: its sides run too, labelled")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    folder = ensure_checkpoint(quick=False)
    int8_folder = folder.with_name(folder.name + "-int8")
    if not (int8_folder / "model.safetensors").exists():
        from m0lite.weights.quantized import save_quantized

        save_quantized(folder, int8_folder)
    repos = {"this": REPO, **({"baseline": args.baseline_repo} if args.baseline_repo else {})}
    print(f"{cpu.describe()}, {args.threads} threads; full-size random bf16 checkpoint {folder}")
    rows = []
    for dtype in args.dtypes.split(","):
        exact = None
        for side, src, quantize in (("exact", folder, ""), ("int8-load", folder, "int8"), ("int8-file", int8_folder, "")):
            for label, repo in repos.items():
                r = run(repo, src, dtype, quantize, args.threads)
                exact = exact or r  # this checkout's exact side: what the ratios are against
                rows.append({"code": label, "dtype": dtype, "side": side, "load s": r["load_s"],
                             "file to first score s": r["first_score_s"], "peak RSS GiB": r["peak"] / 2**30,
                             "RSS after GiB": r["rss"] / 2**30, "peak x exact": r["peak"] / exact["peak"],
                             "load x exact": r["first_score_s"] / exact["first_score_s"], "raw score": r["score"]})
                print(rows[-1], flush=True)
    print_table(rows, list(rows[0]), title="load: file to first score (one short pair), each side in a fresh process")
    write_csv("load", rows, args.out_dir)


if __name__ == "__main__":
    main()
