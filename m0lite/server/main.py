"""`m0lite serve` and `python -m m0lite.server`: load the model, build the app, run uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import time

from .settings import add_serve_arguments, random_weights_reason, settings_from_args

log = logging.getLogger("m0lite.server")


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve until interrupted."""
    import torch

    from m0lite.reranker import Reranker

    from .app import build_app  # FastAPI: the `serve` extra (the flags above work without it)
    from .memory import limit_heap_growth

    try:
        import uvicorn
    except ImportError:
        raise SystemExit("the server needs FastAPI and uvicorn: pip install 'm0lite[serve]'") from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_heap_growth()
    settings = settings_from_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    reranker = Reranker.from_pretrained(args.model, device=device, dtype=dtype,
                                        doc_cache_bytes=int(args.doc_cache_mb * 2**20),
                                        vision_cache_bytes=int(args.vision_cache_mb * 2**20), compile=args.compile,
                                        quantize=args.quantize, int8_compute=args.int8_compute,
                                        pack_weights=False if args.pack_weights == "never" or args.compile else None)
    if args.pack_weights == "start" and not args.compile and not reranker.quantized:
        log.info("weights packed for: %s", ", ".join(reranker.pack(["decoder"])) or "nothing (packing is for bf16 on CPU)")
    log.info("loaded %s on %s in %.1f s", args.model, device, time.perf_counter() - t0)
    if reranker.quantized:
        from m0lite.transforms.int8 import describe

        log.info("lean mode (int8 weights, lossy): %s", describe(reranker.int8_compute))
    if why := random_weights_reason(reranker, os.path.expanduser(args.model)):
        log.warning("%s: %s. Its scores MEAN NOTHING (random weights); serve jinaai/jina-reranker-m0 "
                    "for real ones", args.model, why)
    app = build_app(reranker, settings)
    from .guard import http_protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5,
                access_log=False, http=http_protocol(settings.header_timeout))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m0lite.server", description="Serve the reranking HTTP API.")
    add_serve_arguments(parser)
    serve(parser.parse_args(argv))
