"""Load test of `m0lite serve`: N concurrent clients for a bounded time.

Starts the server (the tiny random checkpoint unless --model is given) on
127.0.0.1, with a local http.server for image documents, and drives --clients
threads, each posting random subsets of one document pool for --seconds.
Every answer is classified:

    ok        200 with every score equal (1e-4) to a single direct call
              (Reranker.rank on the whole pool, in this process)
    wrong     200 with a score that differs: batching leaked between requests
    refused   503 (queue full) with Retry-After
    timeout   504 (deadline passed)
    other     any other status, or a transport error (connection lost, ...)

and the run fails unless sent == ok + refused + timeout, nothing is wrong or
other, and the server process is alive and healthy at the end. Meanwhile one
more client posts requests of --big-images large single-colour images, and the
server's RSS is sampled: idle before, peak under this mixed load, idle after.

Then fairness: --small-requests 2-document requests one after another, first
on an idle server, then while one large request (--large-docs documents of
--large-words words) runs; p50/p99 of each, and how long the large one took.

Side by side it times the same workload as direct, sequential
`Reranker.score_pairs` calls in this process, before and after the load (the
better of the two counts: the machine may be shared): `vs_direct` is the
server's pairs/s over that, i.e. what batching gains minus what HTTP costs.

    python bench/bench_server.py --clients 8 --seconds 20
    python bench/bench_server.py --model /path/to/jina-reranker-m0 --device cuda --docs 16
    python bench/bench_server.py --max-queue 2 --clients 16   # overload: expect 503s, nothing lost
    python bench/bench_server.py --max-queue 2 --clients 16 --no-backoff   # ...from impolite clients
    python bench/bench_server.py --clients 4 --seconds 10 --large-docs 100 --big-images 8   # small run
"""

from __future__ import annotations

import argparse
import http.server
import io
import itertools
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from common import ROOT, device_name, print_table, write_csv  # noqa: I001 (also puts ROOT on sys.path)

from m0lite import Reranker  # noqa: E402
from m0lite.images import load_image  # noqa: E402

QUERY = "slm markdown"
TEXTS = [
    "We present ReaderLM-v2, a compact 1.5 billion parameter language model for web content extraction, "
    "turning messy HTML into clean Markdown or JSON.",
    "During the California Gold Rush, some merchants made more money selling supplies than miners made finding gold.",
    "数据提取么？为什么不用正则啊，你用正则不就全解决了么？",
    "Die wichtigsten Beiträge unserer Arbeit sind zweifach: eine dreistufige Datensynthese-Pipeline und eine "
    "umfassende Trainingsstrategie.",
    "Markdown is a lightweight markup language for creating formatted text using a plain-text editor.",
    "Small language models trade breadth for speed and can run on a laptop.",
]
TOLERANCE = 1e-4


def png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):  # a few blocks, so the pages differ
        x, y = rng.randrange(width), rng.randrange(height)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(width, x + 20), min(height, y + 10)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def start_image_server(n_images: int) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    pages = {f"/page-{i}.png": png(224 + 28 * i, 280, seed=i) for i in range(n_images)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    return server, [base + path for path in pages]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "m0lite.server", "--model", model, "--port", str(port), "--allow-private-urls",
           "--device", args.device, "--max-queue", str(args.max_queue), "--max-batch-pairs", str(args.max_batch_pairs),
           "--request-timeout", str(args.request_timeout), "--log-level", "warning",
           "--max-request-tokens", str(10**9), "--max-body-bytes", str(256 << 20),
           # Packed bf16 weights change scores in the fourth decimal, and the reference here is unpacked.
           "--pack-weights", "never"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not come up within 600 s")


def client_loop(url: str, pool: list[dict], reference: list[float], k: int, until: float, seed: int,
                timeout: float, backoff: bool, out: list[dict]) -> None:
    """Post random k-subsets of the pool until `until`; append one record per request.
    With `backoff`, a refused client waits Retry-After seconds, as a polite client does."""
    rng = random.Random(seed)
    with httpx.Client(timeout=timeout) as http:
        while time.monotonic() < until:
            chosen = rng.sample(range(len(pool)), k)
            body = {"query": QUERY, "documents": [pool[i] for i in chosen], "return_documents": False}
            t0 = time.perf_counter()
            try:
                r = http.post(f"{url}/v1/rerank", json=body)
            except httpx.HTTPError as e:
                out.append({"kind": "other", "why": f"{type(e).__name__}: {e}", "ms": 0.0})
                continue
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code == 200:
                results = r.json()["results"]
                good = len(results) == k and all(
                    abs(x["relevance_score"] - reference[chosen[x["index"]]]) <= TOLERANCE for x in results)
                out.append({"kind": "ok" if good else "wrong", "ms": ms, "pairs": k})
            elif r.status_code == 503 and "retry-after" in r.headers:
                out.append({"kind": "refused", "ms": ms})
                if backoff:
                    time.sleep(max(min(float(r.headers["retry-after"]), until - time.monotonic()), 0))
            elif r.status_code == 504:
                out.append({"kind": "timeout", "ms": ms})
            else:
                out.append({"kind": "other", "why": f"HTTP {r.status_code}: {r.text[:200]}", "ms": ms})


def direct_pairs_per_s(reranker: Reranker, loaded: list, k: int, seconds: float) -> float:
    """The same workload as the clients', as sequential direct score_pairs calls on the
    pool's documents (images already loaded: the server too loads them outside the model).

    Every distinct k-subset is scored once untimed first: CPU kernels are set up
    per input shape, and the server, running longer, has met them all too."""
    subsets = list(itertools.combinations(range(len(loaded)), k))
    random.Random(0).shuffle(subsets)
    subsets = subsets[:200]
    for chosen in subsets:  # warm-up
        reranker.score_pairs([(QUERY, loaded[i]) for i in chosen])
    pairs, t0 = 0, time.perf_counter()
    while time.perf_counter() < t0 + seconds or pairs == 0:
        for chosen in subsets:
            reranker.score_pairs([(QUERY, loaded[i]) for i in chosen])
            pairs += k
    return pairs / (time.perf_counter() - t0)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


class RSSSampler:
    """The peak of a process's resident memory, sampled every 10 ms in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, StopIteration):
                return
            time.sleep(0.01)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def big_image_b64(seed: int, side: int = 4096) -> str:
    """A single-colour side x side PNG (a few KB of base64 that decodes to side^2 pixels)."""
    import base64

    rng = random.Random(seed)
    img = Image.new("P", (side, side), 0)
    img.putpalette([rng.randrange(256) for _ in range(3)] * 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_loop(url: str, n_images: int, until: float, timeout: float, out: list[dict]) -> None:
    """Requests of n distinct large images, one after another, until `until`."""
    seed = 1000
    with httpx.Client(timeout=timeout) as http:
        while time.monotonic() < until:
            docs = [{"image": big_image_b64(seed + i)} for i in range(n_images)]
            seed += n_images
            t0 = time.perf_counter()
            try:
                r = http.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": docs, "return_documents": False})
                out.append({"status": r.status_code, "ms": (time.perf_counter() - t0) * 1e3})
            except httpx.HTTPError as e:
                out.append({"status": f"{type(e).__name__}", "ms": 0.0})


def small_request_ms(http: httpx.Client, url: str) -> float:
    t0 = time.perf_counter()
    r = http.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [TEXTS[0], TEXTS[1]]})
    if r.status_code != 200:
        raise SystemExit(f"FAILED: small request answered {r.status_code}: {r.text[:300]}")
    return (time.perf_counter() - t0) * 1e3


def fairness(url: str, args) -> list[dict]:
    """p50/p99 of small requests on an idle server, then while one large request runs."""
    rng = random.Random(0)
    words = " ".join(TEXTS).split()
    large = {"query": QUERY, "return_documents": False,
             "documents": [" ".join(rng.choice(words) for _ in range(args.large_words)) for _ in range(args.large_docs)]}
    rows = []
    with httpx.Client(timeout=args.request_timeout + 10) as http:
        small_request_ms(http, url)  # warm
        idle = [small_request_ms(http, url) for _ in range(args.small_requests)]
        outcome = {}

        def run_large():
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/rerank", json=large, timeout=args.request_timeout + 10)
            outcome.update(status=r.status_code, s=time.perf_counter() - t0)

        thread = threading.Thread(target=run_large)
        thread.start()
        time.sleep(1.0)  # its passes have started
        loaded, during = [], 0
        while thread.is_alive() and len(loaded) < args.small_requests:
            loaded.append(small_request_ms(http, url))
        during = thread.is_alive()
        thread.join()
    for phase, ms in (("idle server", idle), ("large request in flight", loaded)):
        rows.append({"phase": phase, "requests": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
                     "large_docs": args.large_docs if ms is loaded else 0,
                     "large_s": outcome.get("s", float("nan")) if ms is loaded else float("nan"),
                     "large_status": outcome.get("status", "") if ms is loaded else "",
                     "all_during_large": during if ms is loaded else ""})
    return rows


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: a tiny random checkpoint)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--docs", type=int, default=4, help="documents per request")
    p.add_argument("--images", type=int, default=2, help="image documents in the pool (served from 127.0.0.1)")
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-batch-pairs", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=60)
    p.add_argument("--no-backoff", action="store_true", help="retry a 503 at once instead of after Retry-After")
    p.add_argument("--big-images", type=int, default=8,
                   help="distinct 4096x4096 images per request of the image client during the load (0: none)")
    p.add_argument("--small-requests", type=int, default=30, help="2-document requests per fairness phase")
    p.add_argument("--large-docs", type=int, default=200, help="documents of the large request")
    p.add_argument("--large-words", type=int, default=2000, help="words per document of the large request")
    args = p.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="m0lite-bench-")
    if args.model:
        model, label = args.model, Path(args.model).name
    else:
        from m0lite.fixtures.random_checkpoint import write_random_checkpoint

        model, label = str(write_random_checkpoint(Path(tmp.name) / "tiny", seed=0)), "tiny (random)"
    images, image_urls = start_image_server(args.images)
    pool = [{"image": u} for u in image_urls] + [{"text": t} for t in TEXTS]
    k = min(args.docs, len(pool))

    dtype = getattr(torch, args.dtype) if args.dtype else None
    reranker = Reranker.from_pretrained(model, device=args.device, dtype=dtype)
    reference = [0.0] * len(pool)
    for x in reranker.rank(QUERY, pool):
        reference[x["index"]] = x["relevance_score"]
    loaded = [d["text"] if "text" in d else load_image(d["image"]) for d in pool]
    direct_seconds = min(5.0, args.seconds / 4)
    direct_before = direct_pairs_per_s(reranker, loaded, k, direct_seconds)

    log_path = Path(tmp.name) / "server.log"
    proc, url = start_server(args, model, log_path)
    records: list[dict] = []
    image_records: list[dict] = []
    try:
        httpx.post(f"{url}/v1/rerank", json={"query": QUERY, "documents": [pool[0], pool[-1]]}, timeout=120)  # warm
        time.sleep(1.0)
        rss_before = rss_mb(proc.pid)
        sampler = RSSSampler(proc.pid)
        until = time.monotonic() + args.seconds
        per_client: list[list[dict]] = [[] for _ in range(args.clients)]
        threads = [threading.Thread(target=client_loop, args=(url, pool, reference, k, until, seed,
                                                              args.request_timeout + 10, not args.no_backoff,
                                                              per_client[seed]))
                   for seed in range(args.clients)]
        if args.big_images:
            threads.append(threading.Thread(target=image_loop, args=(url, args.big_images, until,
                                                                     args.request_timeout + 10, image_records)))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + args.request_timeout + 30)
        elapsed = time.monotonic() - t0
        rss_peak = sampler.stop()
        time.sleep(2.0)
        rss_after = rss_mb(proc.pid)
        hung = sum(t.is_alive() for t in threads)
        records = [r for recs in per_client for r in recs]
        fair_rows = fairness(url, args)
        alive = proc.poll() is None
        healthy = alive and httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        images.shutdown()

    # Timed again after the load: on a shared machine the better of the two is the fair baseline.
    direct_after = direct_pairs_per_s(reranker, loaded, k, direct_seconds)
    direct = max(direct_before, direct_after)
    count = {kind: sum(r["kind"] == kind for r in records) for kind in ("ok", "wrong", "refused", "timeout", "other")}
    ok_ms = [r["ms"] for r in records if r["kind"] == "ok"]
    pairs_per_s = sum(r.get("pairs", 0) for r in records if r["kind"] == "ok") / elapsed
    row = {
        "model": label, "server_device": args.device, "clients": args.clients, "docs_per_req": k,
        "images_in_pool": args.images, "max_queue": args.max_queue, "max_batch_pairs": args.max_batch_pairs,
        "backoff": not args.no_backoff,
        "seconds": round(elapsed, 1), "sent": len(records), "req_per_s": len(records) / elapsed,
        "ok_req_per_s": count["ok"] / elapsed, "pairs_per_s": pairs_per_s, "direct_before": direct_before,
        "direct_after": direct_after, "direct_pairs_per_s": direct,
        "vs_direct": pairs_per_s / direct, "p50_ms": percentile(ok_ms, 50), "p99_ms": percentile(ok_ms, 99),
        **count, "hung_clients": hung, "server_alive": alive,
    }
    print(f"\nserver load test: {label} on {args.device}; client machine {device_name()}")
    print_table([row], ["clients", "docs_per_req", "sent", "req_per_s", "pairs_per_s", "direct_pairs_per_s",
                        "vs_direct", "p50_ms", "p99_ms", "ok", "refused", "timeout", "wrong", "other"])
    write_csv("server", [row])

    image_ok = sum(r["status"] == 200 for r in image_records)
    rss_row = {"model": label, "clients": args.clients, "big_images_per_req": args.big_images,
               "image_requests": len(image_records), "image_ok": image_ok,
               "rss_idle_before_mb": rss_before, "rss_peak_mb": rss_peak, "rss_idle_after_mb": rss_after,
               "peak_growth_mb": rss_peak - rss_before}
    print("\nserver RSS over the mixed load (text clients + one client of large images)")
    print_table([rss_row], ["clients", "big_images_per_req", "image_requests", "image_ok", "rss_idle_before_mb",
                            "rss_peak_mb", "rss_idle_after_mb", "peak_growth_mb"])
    write_csv("server_rss", [rss_row])
    print("\nsmall (2-document) requests, one after another: idle server, then with one large request in flight")
    print_table(fair_rows, ["phase", "requests", "p50_ms", "p99_ms", "large_docs", "large_s", "large_status",
                            "all_during_large"])
    write_csv("server_fairness", fair_rows)

    failures = [r["why"] for r in records if r["kind"] == "other"][:5]
    problems = []
    if count["wrong"]:
        problems.append(f"{count['wrong']} answers with wrong scores")
    if count["other"]:
        problems.append(f"{count['other']} requests lost or failed, e.g. {failures}")
    if len(records) != count["ok"] + count["refused"] + count["timeout"] + count["wrong"] + count["other"]:
        problems.append("records do not add up")
    if hung:
        problems.append(f"{hung} clients still waiting at the end (a hang)")
    if not healthy:
        problems.append(f"server dead or unhealthy at the end:\n{log_path.read_text()[-3000:]}")
    if image_records and image_ok != len(image_records):
        problems.append(f"image requests failed: {[r for r in image_records if r['status'] != 200][:3]}")
    if problems:
        raise SystemExit("FAILED: " + "; ".join(problems))
    print("nothing lost: every request was answered correctly or refused with 503/504; the server is healthy")


if __name__ == "__main__":
    main()
