"""`m0lite batch` against a plain loop over `compute_score`, on the same table of pairs.

    python bench/bench_batch.py [--config quick|full] [--docs 16] [--queries 4] [--pages 2] [--repeats 2]

The table: every query against every document (text documents of ~--doc-words words, and noise page
images), rows shuffled, as a table of pairs usually comes. Sides, each from a fresh model load (the
load is timed apart and included in the end-to-end time, since every side pays it once):
  loop1    `for pair in pairs: rr.compute_score(pair)` (the Reranker's defaults: visual-token cache on,
           document cache off)
  loop32   `rr.compute_score(pairs[i:i + 32])` in the table's order, the same Reranker settings
  batch    `m0lite batch` in this process: rows grouped by document, the document cache on (1 GiB),
           weights packed at start, chunks saved as it goes
  batch-nodoc  the same with `--doc-cache-mb 0`: what the grouping gives without the document cache
Scores of every side are checked against loop1's. Writes bench/results/batch.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m0lite import Reranker  # noqa: E402
from m0lite.cli import main as cli  # noqa: E402
from m0lite.fixtures.random_checkpoint import FULL_CONFIG, write_random_checkpoint  # noqa: E402

from bench_cache import QUICK, WORDS, cpu_name  # noqa: E402


def table(root: Path, docs: int, queries: int, pages: int, doc_words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    documents = [{"document": " ".join(rng.choice(WORDS) for _ in range(doc_words))} for _ in range(docs)]
    for i in range(pages):
        arr = np.random.default_rng(seed + i).integers(0, 256, (560, 420, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"page{i}.png")
        documents.append({"document_image": f"page{i}.png"})
    qs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(queries)]
    rows = [{"query": q, **d} for q in qs for d in documents]
    rng.shuffle(rows)
    return rows


def api_pairs(rows: list[dict], root: Path) -> list[list]:
    return [[r["query"], {"image": str(root / r["document_image"])} if "document_image" in r else r["document"]] for r in rows]


def run_side(name: str, ckpt: Path, dtype: str, rows: list[dict], root: Path) -> tuple[float, float, list[float]]:
    """(load seconds, end-to-end seconds, scores)."""
    pairs = api_pairs(rows, root)
    t0 = time.perf_counter()
    if name.startswith("loop"):
        rr = Reranker.from_pretrained(ckpt, dtype=dtype)
        rr.compute_score(["warm", "up"])  # the first pass's one-off costs go with the load
        load = time.perf_counter() - t0
        step = 1 if name == "loop1" else 32
        scores = []
        for i in range(0, len(pairs), step):
            scores += rr.compute_score(pairs[i:i + step])
        return load, time.perf_counter() - t0, scores
    t = time.perf_counter()
    rr = Reranker.from_pretrained(ckpt, dtype=dtype)
    rr.pack()
    rr.compute_score(["warm", "up"])
    load = time.perf_counter() - t  # what batch's own load costs, measured alike
    del rr
    out = root / "scores.jsonl"
    extra = ["--doc-cache-mb", "0"] if name == "batch-nodoc" else []
    t0 = time.perf_counter()
    rc = cli(["batch", "--model", str(ckpt), "--dtype", dtype, "--input", str(root / "pairs.jsonl"), "--output", str(out),
              "--no-progress", *extra])
    total = time.perf_counter() - t0
    assert rc == 0
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    out.unlink()
    return load, total, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("quick", "full"), default="quick",
                    help="quick: 6 layers, hidden 512 (labelled); full: the real 2B dimensions")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--pages", type=int, default=2)
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--doc-words", type=int, default=180, help="about 256 tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sides", default="loop1,loop32,batch,batch-nodoc")
    args = ap.parse_args()

    label = "quick (6 layers, hidden 512)" if args.config == "quick" else "full Qwen2-VL-2B dimensions"
    ckpt = Path.home() / ".cache/m0lite" / f"bench-{args.config}-bf16"
    if not (ckpt / "config.json").exists():
        write_random_checkpoint(ckpt, QUICK if args.config == "quick" else FULL_CONFIG, dtype=torch.bfloat16)
    sides = args.sides.split(",")
    results = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = table(root, args.docs, args.queries, args.pages, args.doc_words)
        (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for _ in range(args.repeats):
            for s in sides:  # sides in turns, so a burst of load on the shared CPU hits all alike
                results[s].append(run_side(s, ckpt, args.dtype, rows, root))
    n = len(rows)
    base = statistics.median(t for _, t, _ in results[sides[0]])
    ref = results[sides[0]][0][2]
    print(f"batch vs compute_score loops: {n} pairs ({args.queries} queries x {args.docs} texts of ~{args.doc_words} words "
          f"+ {args.pages} pages), {label}, {args.dtype}, {torch.get_num_threads()} threads, {cpu_name()}")
    print(f"| side | end to end median [min..max] | of which load | pairs/s | speedup vs {sides[0]} | max abs score diff vs {sides[0]} |")
    print("|---|---|---|---|---|---|")
    csv_rows = []
    for s in sides:
        ts = [t for _, t, _ in results[s]]
        load = statistics.median(l for l, _, _ in results[s])
        med = statistics.median(ts)
        diff = max(abs(a - b) for r in results[s] for a, b in zip(r[2], ref))
        print(f"| {s} | {med:.2f} s [{min(ts):.2f}..{max(ts):.2f}] | {load:.2f} s | {n / med:.2f} | {base / med:.2f}x | {diff:.1e} |")
        csv_rows.append([s, f"{med:.4f}", f"{min(ts):.4f}", f"{max(ts):.4f}", f"{load:.4f}", f"{n / med:.3f}", f"{diff:.2e}"])
    out = Path(__file__).parent / "results" / "batch.csv"
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "cpu", "threads", "config", "dtype", "pairs", "side", "median_s", "min_s", "max_s", "load_s", "pairs_per_s", "max_diff"])
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        for r in csv_rows:
            w.writerow([stamp, cpu_name(), torch.get_num_threads(), label, args.dtype, n, *r])


if __name__ == "__main__":
    main()
