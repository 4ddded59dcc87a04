"""Fuzz the server's PDF documents: mutated PDFs posted to /v1/rerank of an in-process app; no 5xx, no crash.

    python bench/fuzz_pdf.py                   # 3000 cases
    python bench/fuzz_pdf.py --cases 500 --seed 7

Each case takes a valid PDF (hand-written text pages, or pypdfium2-written pages holding pictures) and mutates
it: bytes flipped, cut short, an object spliced in from elsewhere in the file, bytes inserted, or a number
changed in the page tree or a MediaBox. The app runs around a stand-in scorer (what is fuzzed is the PDF path:
source decoding, the worker process, PDFium, the limits), with pages rendered small so that cases are quick.
Prints cases, status counts, 5xx count, renders the worker died on, and the peak RSS of this process and of the
largest worker process (ended ones: the app's last worker is ended when it shuts down).
"""

from __future__ import annotations

import argparse
import base64
import collections
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MUTATIONS = ("flip", "truncate", "splice", "insert", "number")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of a PDF (see the module docstring)."""
    kind = rng.choice(MUTATIONS)
    b = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[: rng.randrange(1, len(b))]
    elif kind == "splice":
        objects = [m.span() for m in re.finditer(rb"\d+ 0 obj.*?endobj", data, re.S)]
        if objects:
            a, z = rng.choice(objects)
            at = rng.randrange(len(b))
            b[at:at] = data[a:z]
    elif kind == "insert":
        at = rng.randrange(len(b))
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:  # a number in the file (a /Count, a MediaBox side, an offset, a /Length) made absurd
        numbers = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", data)]
        if numbers:
            a, z = rng.choice(numbers)
            b[a:z] = rng.choice([b"0", b"-1", b"99999999999", b"1e308", b"2147483648", b"0.0001", b"3.5"])
    return bytes(b)


def seeds() -> list[bytes]:
    from m0lite.fixtures.pdfs import picture_pdf, text_pdf

    return [text_pdf([(595, 842, "first page"), (612, 792, "second (page)")]),
            picture_pdf([(595, 842), (960, 540)], seed=1)]


class StandIn:
    """Scores every pair 0.5; pages render at a small budget, so that a case costs the PDF path only."""

    min_pixels, max_pixels = 56 * 56, 4 * 56 * 56

    def score_pairs(self, pairs, normalize=True, **kw):
        return [0.0] * len(pairs), [10] * len(pairs)

    @staticmethod
    def normalize(raw: float) -> float:
        return 0.5


def run(client, cases: int, seed: int, deadline: float | None = None) -> collections.Counter:
    """Post `cases` mutated PDFs (fewer if `deadline`, a time.monotonic(), passes); the status counts."""
    rng, base = random.Random(seed), seeds()
    statuses: collections.Counter = collections.Counter()
    for i in range(cases):
        if deadline is not None and time.monotonic() > deadline:
            break
        pdf = mutate(rng.choice(base), rng)
        src = base64.b64encode(pdf).decode()
        if i % 3 == 1:
            src = "data:application/pdf;base64," + src
        r = client.post("/v1/rerank", json={"query": "q", "documents": ["text", {"pdf": src}], "pdf_text": i % 2 == 0})
        statuses[r.status_code] += 1
        assert r.status_code < 500, (i, r.status_code, r.text)
    return statuses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop posting after this long (fewer cases)")
    args = ap.parse_args()

    import resource

    from fastapi.testclient import TestClient

    from m0lite.server import ServerSettings, build_app

    start = time.perf_counter()
    with TestClient(build_app(StandIn(), ServerSettings(pdf_timeout=10))) as client:
        died_before = _deaths(client)
        deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
        statuses = run(client, args.cases, args.seed, deadline)
        died = _deaths(client) - died_before
    seconds = time.perf_counter() - start
    print(f"cases {sum(statuses.values())} in {seconds:.1f} s ({sum(statuses.values()) / seconds:.1f}/s), seed {args.seed}")
    print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    print(f"5xx: {sum(v for k, v in statuses.items() if k >= 500)}; worker deaths and timeouts: {died}")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; of the "
          f"largest PDF worker process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")


def _deaths(client) -> int:
    return client.app.state.loader.pdfs.restarts


if __name__ == "__main__":
    main()
