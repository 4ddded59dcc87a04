"""PDF documents: peak resident memory and pages per second ranking one long PDF, on the tiny random checkpoint.

    python bench/bench_pdf.py                 # a 300-page PDF
    python bench/bench_pdf.py --pages 50

The PDF is written here (pypdfium2's writer, a picture on every page, so no two pages share pixels). The
reranker renders its pages in passes (`Reranker._pages_per_pass`, about one decoder pass of full-budget pages),
so peak RSS should stay near the load's plus one pass's pages and the vision cache (bounded by
--vision-cache-mb), whatever the page count. RSS is the process's high-water mark (VmHWM), read after loading
and after ranking.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--vision-cache-mb", type=int, default=256,
                    help="the reranker's vision cache (default: 256, the Reranker's); its visual tokens of pages seen "
                         "are part of the peak, up to this bound")
    args = ap.parse_args()

    import torch

    from bench.e2e_worker import vm_status
    from m0lite import Reranker, cpu
    from m0lite.fixtures.pdfs import picture_pdf
    from m0lite.fixtures.random_checkpoint import write_random_checkpoint

    data = picture_pdf([(595, 842)] * args.pages)  # A4 pages
    with tempfile.TemporaryDirectory() as tmp:
        rr = Reranker.from_pretrained(write_random_checkpoint(Path(tmp) / "tiny", seed=0), dtype=torch.float32,
                                      vision_cache_bytes=args.vision_cache_mb * 2**20)
        rr.rank("warm up", ["a text"])
        loaded = vm_status("VmHWM") / 2**20
        start = time.perf_counter()
        results = rr.rank("the table on page 7", [{"pdf": data}], pages_as_documents=True)
        seconds = time.perf_counter() - start
        peak = vm_status("VmHWM") / 2**20
    assert len(results) == args.pages
    print(f"CPU: {cpu.describe()}, torch threads {torch.get_num_threads()}")
    cached = rr.vision_cache.nbytes / 2**20 if rr.vision_cache is not None else 0
    print(f"PDF: {args.pages} A4 pages, {len(data) / 2**20:.1f} MiB; pages per pass {rr._pages_per_pass()}; "
          f"vision cache {cached:.0f} MiB held (bound {args.vision_cache_mb} MiB)")
    print(f"{'pages':>6} {'seconds':>8} {'pages/s':>8} {'RSS after load MiB':>19} {'peak RSS MiB':>13} {'peak - load':>12}")
    print(f"{args.pages:>6} {seconds:8.1f} {args.pages / seconds:8.2f} {loaded:19.0f} {peak:13.0f} {peak - loaded:12.0f}")


if __name__ == "__main__":
    main()
