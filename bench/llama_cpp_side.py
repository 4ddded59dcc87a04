"""m0lite against llama.cpp on text, same checkpoint, same token ids, same threads.

llama.cpp runs jina-reranker-m0 as a GGUF of its language model alone, the score
head applied outside (as Jina publishes it). This script makes that side from the
random benchmark checkpoint, times it beside m0lite, and checks that both run the
same model: llama.cpp's last-token state through the checkpoint's score head gives
m0lite's raw score (text prompts: the three M-RoPE components are equal, so plain
RoPE is the same rotation).

    python bench/llama_cpp_side.py setup     # llama-cpp-python from the package registry, built from source
    python bench/llama_cpp_side.py convert   # the checkpoint's language model -> GGUF f32 (llama.cpp's converter), Q8_0, Q4_K_M
    python bench/llama_cpp_side.py run --workloads text8 --sides m0lite,llama-f32,llama-q8_0

`setup` builds llama.cpp for the CPU as m0lite sees it: with `M0LITE_CPU_ISA=avx2`
(m0lite/cpu.py) or on a CPU without AVX-512, for AVX2 (`GGML_NATIVE=OFF`), else
for the native CPU. Everything lives in `$M0LITE_CACHE/llama-cpp-<isa>/`. It is a
benchmark, not a test dependency: nothing in m0lite or its tests imports it.

Sides (each alone in a fresh process, one after the other, the files read into the
page cache first; load = import + weights + the score of one short pair):
  m0lite          `compute_score` with its defaults, in --dtype (bench/e2e_worker.py)
  m0lite-int8     the same on the checkpoint `m0lite quantize` wrote (--int8-ckpt)
  llama-f32, llama-q8_0, llama-q4_k_m   llama-cpp-python, pooling LAST on the final norm,
                  one pair per decode (`-one`, the default) or as many as fit in one
                  decode of --pack-tokens tokens (`-packed`, as llama.cpp's embedding example)
The llama.cpp sides get m0lite's token ids (m0lite.prompt), so tokenisation is not
in their time; it is in m0lite's (a few ms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The standard library only at the top: the worker runs this file in the llama venv, which has no torch.
from bench.e2e_worker import SCORE_SHIFT, TIMED_VARIANTS, WARM_PAIR, make_workload, vm_status  # noqa: E402

CACHE = Path(os.environ.get("M0LITE_CACHE", Path.home() / ".cache" / "m0lite"))
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
QUANTS = {"f32": None, "q8_0": 7, "q4_k_m": 15}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_M
AVX2_BUILD = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
              "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DLLAMA_CURL=OFF"]


def isa() -> str:
    from m0lite import cpu

    return "avx512" if "avx512f" in cpu.flags() else "avx2"


def home() -> Path:
    return CACHE / f"llama-cpp-{isa()}"


def venv_python() -> Path:
    return home() / "venv" / "bin" / "python"


def source_dir() -> Path:
    return home() / "src"


def setup(_args) -> None:
    """A venv with llama-cpp-python built for this CPU (as m0lite sees it), and its source for the converter."""
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    if not source_dir().exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(h),
                        LLAMA_CPP_PYTHON], check=True)
        sdist = next(h.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(h, filter="data")
        next(p for p in h.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_python-")).rename(source_dir())
    has = lambda module: subprocess.run([str(venv_python()), "-c", f"import {module}"],  # noqa: E731
                                        capture_output=True).returncode == 0
    if not has("llama_cpp"):
        subprocess.run([sys.executable, "-m", "venv", str(h / "venv")], check=True)
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count()),
               "CMAKE_ARGS": " ".join(AVX2_BUILD if isa() == "avx2" else ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"])}
        print(f"building llama.cpp for {isa()} ({env['CMAKE_ARGS']}): about 15 minutes on 2 cores", flush=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", str(source_dir()), "numpy"], check=True, env=env)
    if not has("torch, transformers, sentencepiece, safetensors"):
        # llama.cpp's converter (convert_hf_to_gguf.py) runs in the same venv, with what it imports: the CPU
        # wheel of torch, as m0lite's setup.sh pins it. The worker that times llama.cpp imports none of these.
        subprocess.run([str(venv_python()), "-m", "pip", "install", "torch==2.13.0"], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "transformers", "sentencepiece", "safetensors"],
                       check=True)
    print(f"llama-cpp-python and llama.cpp's converter are installed in {h / 'venv'}")


def gguf_path(ckpt: Path, quant: str) -> Path:
    return home() / f"{ckpt.name}-{quant}.gguf"


def convert(args) -> None:
    """The checkpoint's language model as a Hugging Face Qwen2 folder (its tensors under the same names, its
    tokenizer), then llama.cpp's own converter to a GGUF f32, then llama.cpp's quantiser to Q8_0 and Q4_K_M."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = args.ckpt
    hf = home() / f"{ckpt.name}-qwen2"
    if not gguf_path(ckpt, "f32").exists():
        hf.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((ckpt / "config.json").read_text())
        keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "tie_word_embeddings", "hidden_act")
        qwen2 = {k: cfg[k] for k in keep if k in cfg} | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                                          "torch_dtype": "float32", "use_sliding_window": False}
        (hf / "config.json").write_text(json.dumps(qwen2, indent=2))
        for f in ckpt.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
                (hf / f.name).write_bytes(f.read_bytes())
        tensors = {}
        with safe_open(ckpt / "model.safetensors", "pt") as f:
            for name in f.keys():
                if name.startswith("model."):  # not visual.*, not score.*
                    tensors[name] = f.get_tensor(name).to(torch.float32)
        save_file(tensors, hf / "model.safetensors")
        del tensors
        src = source_dir()
        env = {**os.environ, "PYTHONPATH": f"{src / 'vendor/llama.cpp/gguf-py'}"}
        subprocess.run([str(venv_python()), str(src / "vendor/llama.cpp/convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                        "--outfile", str(gguf_path(ckpt, "f32"))], check=True, env=env)
    for quant, ftype in QUANTS.items():
        if ftype is not None and not gguf_path(ckpt, quant).exists():
            code = (f"import llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); p.ftype = {ftype}; "
                    f"p.nthread = {os.cpu_count()}; "
                    f"raise SystemExit(llama_cpp.llama_model_quantize({str(gguf_path(ckpt, 'f32')).encode()!r}, "
                    f"{str(gguf_path(ckpt, quant)).encode()!r}, p))")
            subprocess.run([str(venv_python()), "-c", code], check=True)
    for quant in QUANTS:
        print(f"{gguf_path(ckpt, quant)}: {gguf_path(ckpt, quant).stat().st_size / 2**30:.2f} GiB")


# --- the llama.cpp worker: runs in the llama venv (llama_cpp, numpy, the standard library; no torch) ---

def llama_worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    t0 = time.perf_counter()
    import llama_cpp

    longest = max(len(ids) for run in job["runs"] for ids in run)
    n_batch = max(job["pack_tokens"], longest) if job["packed"] else longest
    llm = llama_cpp.Llama(job["model"], n_ctx=n_batch, n_batch=n_batch, n_ubatch=n_batch, embedding=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST, n_threads=job["threads"],
                          n_threads_batch=job["threads"], flash_attn=job["flash_attn"], verbose=False)
    n_embd = llm.n_embd()

    def score(prompts: list[list[int]]) -> list[list[float]]:
        """Last-token final-norm states, one per prompt: one decode per prompt, or whole prompts packed."""
        out, batch, seqs = [], [], 0

        def decode():
            nonlocal batch, seqs
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(llm._batch)
            out.extend(list(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, i)[:n_embd]) for i in range(seqs))
            llm._batch.reset()
            batch, seqs = [], 0

        for ids in prompts:
            if seqs and (not job["packed"] or len(batch) + len(ids) > n_batch):
                decode()
            llm._batch.add_sequence(ids, seqs, True)
            batch += ids
            seqs += 1
        decode()
        return out

    score([job["warm"]])
    load_s = time.perf_counter() - t0
    runs = []
    for prompts in job["runs"]:
        t = time.perf_counter()
        states = score(prompts)
        runs.append({"time_s": time.perf_counter() - t, "states": states})
    print(json.dumps({"load_s": load_s, "runs": runs, "peak_rss_bytes": vm_status("VmHWM"),
                      "version": llama_cpp.__version__, "n_batch": n_batch}), flush=True)


# --- the launcher ---

def prompt_ids(ckpt: Path, workload: str, variants: list[int]) -> tuple[list[int], list[list[list[int]]]]:
    """m0lite's token ids for the warm-up pair and for each variant's pairs (compute_score's defaults)."""
    from m0lite.prompt import Side, Tokenizer, build_prompt, default_max_doc_length

    tok = Tokenizer(ckpt / "tokenizer.json")
    ids = lambda q, d: build_prompt(tok, Side(text=q), Side(text=d), max_length=10240,  # noqa: E731
                                    max_doc_length=default_max_doc_length(10240, 512)).input_ids
    runs = [[ids(q, d) for q, d in make_workload(workload, ckpt, False, v)[0]] for v in variants]
    return ids(*WARM_PAIR), runs


def score_head(ckpt: Path):
    """The checkpoint's score head in fp32: final-norm last-token state -> raw score."""
    import torch
    from safetensors import safe_open

    with safe_open(ckpt / "model.safetensors", "pt") as f:
        w = {k: f.get_tensor(k).float() for k in f.keys() if k.startswith("score.")}
    return lambda h: (torch.relu(torch.tensor(h) @ w["score.0.weight"].T + w["score.0.bias"]) @ w["score.2.weight"].T
                      + w["score.2.bias"]).squeeze(-1).tolist()


def raw_from_normalised(s: float) -> float:
    return math.log(s / (1 - s)) + SCORE_SHIFT


def run_side(side: str, workload: str, args) -> dict:
    """One side alone in a fresh process, its file read into the page cache first."""
    from bench.bench_e2e import warm_page_cache

    variants = list(range(TIMED_VARIANTS, TIMED_VARIANTS + args.repeats))
    if side.startswith("m0lite"):
        ckpt = args.int8_ckpt if side == "m0lite-int8" else args.ckpt
        warm_page_cache(ckpt)
        cmd = [sys.executable, str(REPO / "bench" / "e2e_worker.py"), "--side", "m0lite", "--ckpt", str(ckpt),
               "--workload", workload, "--dtype", args.dtype, "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--max-others", "1.0"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return {"load_s": r["load_s"], "peak_rss_bytes": r["peak_rss_bytes"], "times": [x["time_s"] for x in r["runs"]],
                "raw": [[raw_from_normalised(s) for s in x["scores"]] for x in r["runs"]],
                "what": f"{r['description']}, {args.dtype}" + (f", int8 file {ckpt.name}" if side == "m0lite-int8" else "")}
    quant, _, mode = side.removeprefix("llama-").partition("-")
    model = gguf_path(args.ckpt, quant)
    warm_page_cache(model)
    warm, runs = prompt_ids(args.ckpt, workload, variants)
    job = home() / f"job-{workload}.json"
    job.write_text(json.dumps({"model": str(model), "threads": args.threads, "packed": mode == "packed",
                               "pack_tokens": args.pack_tokens, "flash_attn": not args.no_flash_attn,
                               "warm": warm, "runs": runs}))
    out = subprocess.run([str(venv_python()), __file__, "worker", str(job)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{side}: {out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    head = score_head(args.ckpt)
    return {"load_s": r["load_s"], "peak_rss_bytes": r["peak_rss_bytes"], "times": [x["time_s"] for x in r["runs"]],
            "raw": [head(x["states"]) for x in r["runs"]],
            "what": f"llama-cpp-python {r['version']}, {quant}, " + (f"packed decodes of <= {r['n_batch']} tokens"
                                                                       if mode == "packed" else "one pair per decode")
                    + (", flash attention" if not args.no_flash_attn else "")}


def run(args) -> None:
    import torch

    from m0lite import cpu

    torch.set_num_threads(args.threads)
    sides = [s if s.startswith("m0lite") or s.count("-") == 2 else s + "-one" for s in args.sides.split(",")]
    print(f"# CPU: {cpu.describe()}; threads {args.threads}; torch {torch.__version__}; m0lite --dtype {args.dtype}; "
          f"checkpoint {args.ckpt}", flush=True)
    rows = []
    for workload in args.workloads.split(","):
        results = {}
        for side in sides:
            print(f"[{workload}] {side} ...", file=sys.stderr, flush=True)
            results[side] = run_side(side, workload, args)
            r = results[side]
            print(f"[{workload}] {side}: load {r['load_s']:.1f}s, runs {', '.join(f'{t:.1f}' for t in r['times'])}s, "
                  f"peak {r['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
        ref = results.get("m0lite")
        print(f"\n## {workload}\n\n| side | what | median run | x llama-f32-one | load | peak RSS | max raw diff vs m0lite |"
              "\n|---|---|---|---|---|---|---|")
        base = results.get("llama-f32-one")
        for side, r in results.items():
            med = statistics.median(r["times"])
            diff = (max(abs(a - b) for ra, rb in zip(r["raw"], ref["raw"]) for a, b in zip(ra, rb)) if ref else float("nan"))
            speed = f"{statistics.median(base['times']) / med:.2f}x" if base else "-"
            print(f"| {side} | {r['what']} | {med:.2f} s [{min(r['times']):.2f}..{max(r['times']):.2f}] | {speed} | "
                  f"{r['load_s']:.1f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {diff:.2e} |", flush=True)
            rows.append({"workload": workload, "side": side, **{k: v for k, v in r.items() if k != "raw"}, "raw": r["raw"]})
    out = args.out_dir / f"llama_cpp_{time.strftime('%Y%m%d-%H%M')}_{isa()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu.describe(), "threads": args.threads, "rows": rows}, indent=1))
    print(f"\nraw: {out}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "worker":  # in the llama venv: nothing above but the stdlib is used
        return llama_worker(sys.argv[2])
    from m0lite import cpu  # before torch: M0LITE_CPU_ISA's caps reach every worker this process starts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["setup", "convert", "run"])
    ap.add_argument("--ckpt", type=Path, default=CACHE / "bench-full-bf16")
    ap.add_argument("--int8-ckpt", type=Path, default=CACHE / "bench-full-bf16-int8")
    ap.add_argument("--workloads", default="text8")
    ap.add_argument("--sides", default="m0lite,m0lite-int8,llama-f32,llama-q8_0,llama-q4_k_m")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cpu.native_bf16() else "fp32")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0, help="m0lite sides' untimed runs (fp32 and int8 files pack nothing later)")
    ap.add_argument("--pack-tokens", type=int, default=4096, help="the -packed llama.cpp sides' decode size")
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    {"setup": setup, "convert": convert, "run": run}[args.step](args)


if __name__ == "__main__":
    main()
