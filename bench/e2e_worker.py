"""One side of one end-to-end workload, alone in its own process; prints one JSON line.

Run by `bench/bench_e2e.py`, one process per (workload, side), so that peak RSS
(VmHWM: the process's own high-water mark) and load time (file to first
score) belong to that side alone.

Sides:
  m0lite  `Reranker.from_pretrained` + `compute_score` with its defaults (no padding).
  m0lite-int8  the same with quantize="int8" (lean mode; int8_compute "auto").
  ref8    the transformers reference (`tests/reference.py`) as the original compute_score:
          left-padded batches of 8.
  ref1    the same reference one pair at a time (batch_size=1, no padding).

The reference (`tests/reference.py`) loads the model the way the original
does, with transformers' `from_pretrained` (weights memory-mapped from the
same safetensors file, in the requested dtype).

Protocol: load time = import of the side's library + weights read + the score
of one short pair. Then `--warmup` untimed runs (m0lite: more, until every tower
the workload runs is packed) and `--repeats` timed runs of the whole workload (tokenisation and image preprocessing included: end to end,
as a user calls it). Inputs are generated deterministically from the workload
name and the run's index, so every side scores identical pairs; each run gets
new documents or pixels of the same sizes, because m0lite caches visual tokens
and document prefixes and would otherwise serve repeats from its cache.
Each timed run also records how much CPU other processes took meanwhile
(from /proc/stat); see `--max-others` and `--retries`. With `--interleave` the
timed runs are made on the launcher's command instead, one at a time, taking turns
with the other sides' workers (the launcher's `--interleave`).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORE_SHIFT = 2.65

# A fixed word list: documents are seeded draws from it, cut to an exact token count.
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or "
    "has had not but first one their its new after who they have two been other when there all during "
    "into school time may years more most only over city some world would where later up such used many "
    "can state about national out known university united then made team american between three part "
    "page table figure markdown document query search ranking model language vision image token layer "
    "attention matrix vector score result system data network training learning retrieval index report "
    "river mountain history music film album season game player village station church market energy "
    "water paper court law army war house family county district population government company"
).split()
QUERY = "which documents describe ranking models for multilingual visual document retrieval"
WARM_PAIR = ["warm up query", "a short first document to score"]

# name -> what it holds. Quick mode uses the same shapes except where noted (fewer, shorter docs).
WORKLOADS = {
    "text8": "1 query x 8 documents of 256 tokens",
    "text32": "1 query x 32 documents of 64..2048 tokens (uniform, seeded; quick: 16 docs of 64..1024)",
    "image2": "1 query x 2 noise pages 1700x2200 -> 672x868 px, 2976 patches, 744 visual tokens each (cap 768)",
    "image4": "1 query x 4 small noise images (224x224, 280x336, 336x252, 392x308 -> 256..616 patches)",
}


@functools.cache
def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def text_docs(tokenizer_path: Path, lengths: list[int], seed: int) -> list[str]:
    """Documents of exactly `lengths` tokens (seeded words, token ids cut and decoded back)."""
    tok = _tokenizer(tokenizer_path)
    rng = random.Random(seed)
    docs = []
    for n in lengths:
        words = " ".join(rng.choice(WORDS) for _ in range(n + 16))
        docs.append(tok.decode(tok.encode(words, add_special_tokens=False).ids[:n]))
    return docs


def noise_image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


MAX_PACKING_WARMUPS = 16  # enough for image4 (8 runs to PACK_AFTER_ROWS decoder tokens)
TIMED_VARIANTS = 100  # timed run i scores variant 100 + i on every side (warm-ups use 0, 1, ...)
PROFILE_VARIANT = TIMED_VARIANTS + 1000  # the profile's input: seen by no run


def make_workload(name: str, folder: Path, quick: bool, variant: int = 0) -> tuple[list, str, str]:
    """(pairs, query_type, doc_type) for a workload; identical on every side. Each `variant` has new
    document words or image pixels (same lengths and sizes), so that no run is served from a cache
    filled by an earlier one."""
    tok = folder / "tokenizer.json"
    if name == "text8":
        return [[QUERY, d] for d in text_docs(tok, [256] * 8, seed=8_000 + variant)], "text", "text"
    if name == "text32":
        n, hi = (16, 1024) if quick else (32, 2048)
        rng = random.Random(32)
        lengths = [rng.randint(64, hi) for _ in range(n)]
        return [[QUERY, d] for d in text_docs(tok, lengths, seed=32_000 + variant)], "text", "text"
    if name == "image2":
        return [[QUERY, noise_image(1700, 2200, seed=2_000 + 10 * variant + i)] for i in range(2)], "text", "image"
    if name == "image4":
        sizes = [(224, 224), (280, 336), (336, 252), (392, 308)]
        return [[QUERY, noise_image(w, h, seed=4_000 + 10 * variant + i)] for i, (w, h) in enumerate(sizes)], "text", "image"
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def sigmoid_shifted(raw: float) -> float:
    return 1.0 / (1.0 + math.exp(-(raw - SCORE_SHIFT)))


def busy_cpu_s() -> tuple[float, float]:
    """(CPU-seconds busy on the whole machine since boot, CPU-seconds of this process): their
    difference over a run is what other processes took from the same cores meanwhile."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    t = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def vm_status(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load_side(side: str, folder: Path, dtype, compile: bool = False):
    """-> score(pairs, query_type, doc_type) returning normalised scores, and a description."""
    if side in ("m0lite", "m0lite-int8"):
        from m0lite import Reranker
        from m0lite.transforms import int8 as lean

        int8 = side == "m0lite-int8"
        rr = Reranker.from_pretrained(folder, dtype=dtype, compile=compile, quantize="int8" if int8 else None)
        desc = "m0lite compute_score (defaults" + (", compile=True)" if compile else ")")

        def score(pairs, qt, dt):
            return rr.compute_score(pairs, query_type=qt, doc_type=dt)

        if int8:  # the compute the reranker resolved (a tower's layers take it before the tower's first pass)
            desc = f"m0lite compute_score, quantize='int8' (int8_compute {lean.describe(rr.int8_compute)})"
        if rr.fast.with_form:
            score.packed = lambda: rr.packed  # towers in their fast form (taken after some work)
            score.with_form = set(rr.fast.with_form)
        return score, desc

    from tests.reference import Reference
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ref = Reference(folder, dtype)
    bs = 8 if side == "ref8" else 1
    desc = f"transformers {transformers.__version__} reference, " + ("left-padded batches of 8" if bs == 8 else "one pair at a time")

    def score(pairs, qt, dt):
        return [sigmoid_shifted(s) for s in ref.raw_scores(pairs, batch_size=bs, query_type=qt, doc_type=dt)]

    score.sizes = lambda pairs, qt, dt: reference_sizes(ref, pairs, qt, dt, bs)
    return score, desc


def reference_sizes(ref, pairs, qt: str, dt: str, batch_size: int) -> dict:
    """Prompt tokens per pair, patches per image, and the tokens the reference's padded batches process."""
    import torch

    lengths, patches, padded = [], [], 0
    for i in range(0, len(pairs), batch_size):
        batch = ref.inputs(pairs[i:i + batch_size], query_type=qt, doc_type=dt)
        padded += batch["input_ids"].numel()
        lengths += batch["attention_mask"].sum(1).tolist()
        patches += [t * h * w for t, h, w in batch.get("image_grid_thw", torch.zeros(0, 3)).tolist()]
    return {"prompt_tokens": lengths, "image_patches": patches, "processed_tokens": padded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", required=True, choices=["m0lite", "m0lite-int8", "ref8", "ref1"])
    ap.add_argument("--compile", action="store_true", help="m0lite side: compile=True (the warm-up absorbs the compile)")
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--workload", required=True, choices=list(WORKLOADS))
    ap.add_argument("--dtype", required=True, choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--retries", type=int, default=0, help="extra runs allowed to replace contended ones")
    ap.add_argument("--max-others", type=float, default=0.10,
                    help="a run is contended when other processes took more than this share of all CPUs")
    ap.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table of one extra run here")
    ap.add_argument("--interleave", action="store_true", help="timed runs on the launcher's command (stdin), see below")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(args.threads)
    tag = f"[{args.side} {args.workload}]"
    log = lambda msg: print(f"{tag} {msg}", file=sys.stderr, flush=True)  # noqa: E731
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]  # not m0lite.reranker.DTYPES: the reference's worker never imports m0lite

    # Inputs are made outside any timing; the first variant before loading, so that importing
    # `tokenizers` and PIL (both sides need them anyway) is not counted as either side's load.
    # Each run gets a fresh variant: m0lite caches visual tokens and document prefixes, and the
    # same pages again would be served from its cache.
    workload = lambda v: make_workload(args.workload, args.ckpt, args.quick, v)  # noqa: E731
    if args.workload.startswith("text"):
        # Text inputs are small: every variant a run can ask for is made now, with one tokenizer that is then
        # let go (with the heap it used), so that no side's peak RSS holds the harness's tokenizer or meets
        # its loading between runs.
        runs = args.repeats + args.retries
        made = {v: workload(v) for v in (*range(args.warmup + MAX_PACKING_WARMUPS),
                                         *range(TIMED_VARIANTS, TIMED_VARIANTS + runs), PROFILE_VARIANT)}
        _tokenizer.cache_clear()
        ctypes.CDLL(None).malloc_trim(0)
        workload = lambda v: made.pop(v) if v in made else make_workload(args.workload, args.ckpt, args.quick, v)  # noqa: E731
    first = workload(0)

    rss_before_load = vm_status("VmRSS")  # interpreter, torch, tokenizers, PIL and the inputs
    busy0, own0 = busy_cpu_s()
    t0 = time.perf_counter()
    score, desc = load_side(args.side, args.ckpt, dtype, args.compile)
    t_weights = time.perf_counter()
    score([WARM_PAIR], "text", "text")
    t_first = time.perf_counter()
    busy1, own1 = busy_cpu_s()
    load_foreign = max(0.0, (busy1 - busy0) - (own1 - own0))
    rss_after_load = vm_status("VmHWM")
    log(f"loaded: {t_weights - t0:.2f}s, first score after {t_first - t0:.2f}s, peak RSS {rss_after_load / 2**30:.2f} GiB")

    for i in range(args.warmup):
        t = time.perf_counter()
        score(*(first if i == 0 else workload(i)))
        log(f"warmup {i + 1}/{args.warmup}: {time.perf_counter() - t:.2f}s")
    variant = args.warmup
    if hasattr(score, "packed"):
        # m0lite packs a tower's weights once it has run PACK_AFTER_ROWS rows through it (a one-time cost of
        # about a second): warm up until every tower this workload runs is packed, so that the timed runs are
        # the steady state of a long-lived process. A small workload takes several runs to get there (image4
        # runs ~540 decoder tokens a run); the cap keeps a workload that never packs from looping.
        towers = ({"decoder", "vision"} if "image" in first[1:] else {"decoder"}) & score.with_form
        for _ in range(MAX_PACKING_WARMUPS):
            if towers <= set(score.packed()):
                break
            t = time.perf_counter()
            score(*workload(variant))
            variant += 1
            log(f"warmup until packed: {time.perf_counter() - t:.2f}s, packed now: {', '.join(score.packed()) or 'none'}")

    def timed_run(variant: int) -> dict:
        inputs = workload(variant)
        busy0, own0 = busy_cpu_s()
        t = time.perf_counter()
        scores = score(*inputs)
        wall = time.perf_counter() - t
        busy1, own1 = busy_cpu_s()
        own = own1 - own0
        others = max(0.0, (busy1 - busy0) - own) / (wall * cores)
        run = {"variant": variant, "time_s": wall, "cpu_s": own, "others": others,
               "clean": others <= args.max_others, "scores": scores}
        log(f"run (variant {variant}): {wall:.2f}s, own CPU {own:.2f}s, others {others:.0%}"
            + ("" if run["clean"] else " -> contended, not counted"))
        return run

    runs, cores = [], os.cpu_count()
    if args.interleave:
        # The launcher alternates the sides' timed runs, so that a machine whose speed drifts over
        # minutes (a shared VM) slows every side alike: "run V" -> one timed run of variant V; "done".
        print("@ready", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "done":
                break
            runs.append(timed_run(int(cmd[1])))
            print("@run " + json.dumps(runs[-1]), flush=True)
    else:
        # Timed runs. Other processes may share these cores: a run during which they took more than
        # `--max-others` of the machine's CPU time is kept in the record but not in the statistics,
        # and another run (a new variant) is made, up to `--retries` extra runs.
        while sum(r["clean"] for r in runs) < args.repeats and len(runs) < args.repeats + args.retries:
            runs.append(timed_run(TIMED_VARIANTS + len(runs)))
    variant = PROFILE_VARIANT

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            score(*workload(variant))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        args.profile.write_text(table)
        log(f"profile written to {args.profile}")

    sizes = score.sizes(*first) if hasattr(score, "sizes") else {}  # every variant has the same sizes
    print(json.dumps({**sizes,
        "side": args.side, "description": desc, "workload": args.workload, "pairs": len(first[0]),
        "load_s": t_first - t0, "weights_s": t_weights - t0, "first_score_s": t_first - t_weights,
        "load_others": load_foreign / ((t_first - t0) * cores), "runs": runs,
        "rss_before_load_bytes": rss_before_load, "rss_after_load_bytes": rss_after_load,
        # VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork+exec, so a worker would report the
        # launching process's peak whenever that is higher than its own.
        "peak_rss_bytes": vm_status("VmHWM"),
        # What the resident set is made of at the end: private memory vs pages of mapped files
        # (memory-mapped weights are file pages, shared with the page cache).
        "rss_anon_end_bytes": vm_status("RssAnon"), "rss_file_end_bytes": vm_status("RssFile"),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "packed_weights": ",".join(score.packed()) if hasattr(score, "packed") else "",
    }), flush=True)


if __name__ == "__main__":
    main()
