"""Lean mode (int8) against exact m0lite: speed, memory, file size and fidelity, in one table.

    python bench/bench_quant.py                          # full Qwen2-VL-2B size, random weights (the cached checkpoint)
    python bench/bench_quant.py --quick                  # small labelled config, a few minutes
    python bench/bench_quant.py --model DIR --fidelity-only   # your checkpoint (the real weights): fidelity only

Speed and peak RSS come from bench/bench_e2e.py (sides m0lite and m0lite-int8, each
in its own process, timed in turns) on the workloads given; its full tables are
printed as it runs. Fidelity: the same model in bf16 and in int8, in one process
(one after the other), scores 64 queries x 16 documents (12 texts of 16..400
tokens, 4 images of 64..1564 patches); per query the normalised scores are compared
(max and mean |d|), ranked (Spearman correlation) and their best document
compared (top-1 agreement). The file row: bytes of the bf16 checkpoint's weights
against those `m0lite quantize` writes for it.

Random weights lack the activation outliers of trained models, so with the real
weights the error can be larger: run `--model DIR --fidelity-only` on them.
Writes bench/results/quant_<date>_<mode>.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_e2e import cpu_info, ensure_checkpoint  # noqa: E402
from bench.e2e_worker import QUERY, WORDS, noise_image, text_docs  # noqa: E402

N_QUERIES, TEXT_DOCS, IMAGE_SIZES = 64, 12, [(112, 112), (224, 224), (448, 336), (640, 480)]


def fidelity_inputs(folder: Path, n_queries: int) -> tuple[list[str], list]:
    rng = random.Random(64)
    queries = [QUERY] + [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n_queries - 1)]
    lengths = [16 + (400 - 16) * i // (TEXT_DOCS - 1) for i in range(TEXT_DOCS)]
    docs = [*text_docs(folder / "tokenizer.json", lengths, seed=6_400),
            *({"image": noise_image(w, h, seed=6_500 + i)} for i, (w, h) in enumerate(IMAGE_SIZES))]
    return queries, docs


def scores(folder: Path, quantize: str | None, queries, docs) -> list[list[float]]:
    """Normalised scores (query, document) of one mode, the documents cached across queries."""
    import torch

    from m0lite import Reranker

    rr = Reranker.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize, doc_cache_bytes=8 * 2**30)
    return [rr.compute_score([[q, d] for d in docs], doc_type="text") for q in queries]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ranks by sort order; float scores of random weights do not tie)."""
    def ranks(x):
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def fidelity(folder: Path, n_queries: int, int8_folder: Path | None = None) -> dict:
    """`int8_folder`: `m0lite quantize` of folder, whose scores equal quantising at load (tests/test_int8.py)."""
    queries, docs = fidelity_inputs(folder, n_queries)
    exact = scores(folder, None, queries, docs)
    lean = scores(int8_folder, None, queries, docs) if int8_folder else scores(folder, "int8", queries, docs)
    diffs = [abs(x - y) for e, q in zip(exact, lean) for x, y in zip(e, q)]
    # Per kind of document: an image's error is mostly its visual tokens', the same for every query.
    kinds = ["image" if isinstance(d, dict) else "text" for d in docs] * len(queries)  # of each pair, as diffs
    by_kind = {k: max(d for d, kind in zip(diffs, kinds) if kind == k) for k in ("text", "image")}
    rhos = [spearman(e, q) for e, q in zip(exact, lean)]
    top1 = [max(range(len(e)), key=e.__getitem__) == max(range(len(q)), key=q.__getitem__) for e, q in zip(exact, lean)]
    return {"queries": len(queries), "documents": len(docs), "max_abs_d": max(diffs), "mean_abs_d": statistics.mean(diffs),
            "max_abs_d_text": by_kind["text"], "max_abs_d_image": by_kind["image"],
            "spearman_mean": statistics.mean(rhos), "spearman_min": min(rhos), "top1_agreement": sum(top1) / len(top1)}


def file_sizes(folder: Path, int8_folder: Path | None) -> tuple[int, int]:
    """(bytes of the checkpoint's weights, bytes of its int8 checkpoint's), writing the latter to a temp dir
    unless given."""
    from m0lite.weights.quantized import save_quantized

    src = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if int8_folder:
        return src, sum(f.stat().st_size for f in int8_folder.glob("*.safetensors"))
    tmp = Path(tempfile.mkdtemp(prefix="m0lite-int8-"))
    try:
        out = save_quantized(folder, tmp / "ckpt")
        return src, sum(f.stat().st_size for f in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def e2e(workloads: str, args) -> list[dict]:
    """bench_e2e.py's rows for the two sides (its tables print as it runs)."""
    out_dir = Path(tempfile.mkdtemp(prefix="m0lite-e2e-"))
    cmd = [sys.executable, str(REPO / "bench" / "bench_e2e.py"), "--sides", "m0lite,m0lite-int8", "--workloads", workloads,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--out-dir", str(out_dir)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--int8-ckpt", str(args.int8_ckpt)] if args.int8_ckpt else []
    subprocess.run(cmd, check=True)
    rows = list(csv.DictReader(open(next(out_dir.glob("e2e_*.csv")))))
    for f in out_dir.glob("e2e_*.csv"):  # keep the raw file next to the others
        shutil.copy2(f, REPO / "bench" / "results" / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small labelled config (see bench_e2e.py --quick)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the cached random one)")
    ap.add_argument("--workloads", default="text8,text32,image2", help="bench_e2e workloads for speed and memory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--queries", type=int, default=N_QUERIES, help="fidelity queries (each against all 16 documents)")
    ap.add_argument("--int8-ckpt", type=Path, default=None,
                    help="`m0lite quantize` of the checkpoint: the int8 side loads it (as a deployment would)")
    ap.add_argument("--fidelity-only", action="store_true", help="skip the speed, memory and file-size rows")
    ap.add_argument("--e2e-csv", type=Path, action="append", default=[],
                    help="take speed and memory from these bench_e2e.py CSVs (sides m0lite and m0lite-int8) "
                         "instead of running it")
    ap.add_argument("--activation-bits", type=int, choices=[7, 8], default=None,
                    help="with --fidelity-only: the int8 side quantises activations to this width instead of this "
                         "machine's (7: what CPUs without VNNI or AMX get; the integer products are the same on any CPU)")
    args = ap.parse_args(argv)
    if args.activation_bits and not args.fidelity_only:
        ap.error("--activation-bits goes with --fidelity-only (the speed rows run in their own processes)")
    folder = args.model or ensure_checkpoint(args.quick)
    model, _ = cpu_info()
    import torch

    from m0lite.transforms import int8

    if args.activation_bits:
        if not int8.exact_at(args.activation_bits):
            sys.exit(f"{args.activation_bits}-bit activations are not multiplied exactly on this machine")
        int8.activation_bits = lambda: args.activation_bits  # what every SharedInput of this process asks
    compute = int8.describe(int8.resolve_compute("auto", torch.device("cpu")))  # what the int8 side runs
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    print(f"# m0lite int8 vs bf16 — {stamp}\nmachine: {model}, {os.cpu_count()} cores; int8 {compute}; checkpoint {folder}")

    table = []
    if not args.fidelity_only:
        by = {}
        rows = [r for f in args.e2e_csv for r in csv.DictReader(open(f))] if args.e2e_csv else e2e(args.workloads, args)
        for r in rows:
            by.setdefault(r["workload"], {})[r["side"]] = r
        for w, sides in by.items():
            if not {"m0lite", "m0lite-int8"} <= set(sides):
                continue
            b, q = sides["m0lite"], sides["m0lite-int8"]
            table.append({"what": f"{w} latency (s)", "bf16": float(b["lat_median_s"]), "int8": float(q["lat_median_s"]),
                          "int8 / bf16": float(q["lat_median_s"]) / float(b["lat_median_s"]), "goal": "<= 0.67 (1.5x)"})
            table.append({"what": f"{w} peak RSS (GiB)", "bf16": int(b["peak_rss_bytes"]) / 2**30,
                          "int8": int(q["peak_rss_bytes"]) / 2**30,
                          "int8 / bf16": int(q["peak_rss_bytes"]) / int(b["peak_rss_bytes"]), "goal": "<= 0.55"})
        src, dst = file_sizes(folder, args.int8_ckpt)
        table.append({"what": "checkpoint weights (GiB)", "bf16": src / 2**30, "int8": dst / 2**30, "int8 / bf16": dst / src,
                      "goal": "<= 0.55"})
    fid = fidelity(folder, args.queries, args.int8_ckpt)
    table += [
        {"what": f"max |d normalised score| ({fid['queries']} q x {fid['documents']} docs)", "int8": fid["max_abs_d"], "goal": "<= 0.03"},
        {"what": f"  over the {TEXT_DOCS} text documents", "int8": fid["max_abs_d_text"], "goal": ""},
        {"what": f"  over the {len(IMAGE_SIZES)} image documents", "int8": fid["max_abs_d_image"], "goal": ""},
        {"what": "mean |d normalised score|", "int8": fid["mean_abs_d"], "goal": ""},
        {"what": "Spearman per query, mean", "int8": fid["spearman_mean"], "goal": ">= 0.98"},
        {"what": "Spearman per query, lowest", "int8": fid["spearman_min"], "goal": ""},
        {"what": "top-1 agreement", "int8": fid["top1_agreement"], "goal": ""},
    ]
    print(f"\n## int8 against bf16 m0lite, {'quick config' if args.quick else 'full size'}\n")
    print(f"| {'what':52} | {'bf16':>8} | {'int8':>8} | {'int8 / bf16':>11} | goal |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|{'-' * 13}|------|")
    for row in table:
        cell = lambda k: f"{row[k]:.4g}" if isinstance(row.get(k), float) else ""  # noqa: E731
        print(f"| {row['what']:52} | {cell('bf16'):>8} | {cell('int8'):>8} | {cell('int8 / bf16'):>11} | {row['goal']} |")
    out = REPO / "bench" / "results" / f"quant_{stamp}_{'quick' if args.quick else 'full'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "cpu", "int8_units", "what", "bf16", "int8", "int8 / bf16", "goal"])
        w.writeheader()
        for row in table:
            w.writerow({"date": stamp, "cpu": model, "int8_units": compute, **row})
    print(f"\nraw numbers: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
