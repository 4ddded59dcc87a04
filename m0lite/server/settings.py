"""`m0lite serve`'s settings and flags (the process that serves is main.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from m0lite.options import add_quantize_arguments


@dataclass
class ServerSettings:
    """Everything the app enforces; each field is a `m0lite serve` flag of the same name."""

    served_model_name: str = "jina-reranker-m0"  # reported in responses and /v1/models
    api_key: str | None = None  # bearer token for every scoring route and /v1/models; None = no auth
    max_documents: int = 1024  # per request
    max_images: int = 32  # per request, query included
    max_body_bytes: int = 32 * 1024 * 1024  # raw request body, checked before JSON parsing
    max_text_chars: int = 100_000  # query or one document; the model reads at most ~10k tokens anyway
    max_image_bytes: int = 20 * 1024 * 1024  # one image, after base64 decoding or download
    max_image_pixels: int = 4096 * 4096  # one image, checked from its header before decoding
    max_pdf_bytes: int = 20 * 1024 * 1024  # one PDF, after base64 decoding or download
    max_pdf_pages: int = 32  # pages rendered of one PDF (each scored as an image document)
    pdf_timeout: float = 30.0  # seconds the worker process may take to render one PDF
    # Per request, counted before any scoring (413 beyond): prompt tokens over all pairs, estimated
    # from the text's UTF-8 size (about 4 bytes a token) and cut as the model cuts a prompt; and
    # decoded pixels over all images, from their headers.
    max_request_tokens: int = 1 << 20
    max_request_pixels: int = 32 * 4096 * 4096
    # Memory for images being decoded, all requests together: a decoded image is held at full size
    # only while it is resized to the model's resolution, and decodes wait while this is spent.
    image_memory_mb: float = 512.0
    image_timeout: float = 10.0  # seconds, per URL fetch
    allow_private_urls: bool = False  # let image URLs reach loopback/private/link-local hosts
    image_threads: int = 8  # concurrent image fetches/decodes, all requests together
    max_queue: int = 64  # requests waiting for the model; beyond it: 503
    # One model pass: at most this many pairs, prompt tokens and image patches. The budget is the
    # unit of fairness: a request arriving while a large one runs waits for at most one pass.
    max_batch_pairs: int = 16
    max_pass_tokens: int = 8192
    max_pass_patches: int = 8192
    batch_wait_ms: float = 2.0  # how long the model thread waits for more requests to share a pass
    request_timeout: float = 60.0  # seconds from arrival to answer; then 504, and its pairs are dropped
    header_timeout: float = 10.0  # seconds for a client to send its request line and headers; then closed
    body_timeout: float = 30.0  # seconds for a client to send its whole body; then 408
    max_length: int = 10240  # prompt tokens per pair (the model's max_length)
    max_query_length: int = 512
    # Explanations ("explain": true): each keeps its strongest text tokens and, apart, its strongest image
    # regions, this many of each. Occlusion runs one decoder pass per part of each explained document, so
    # a request may ask it for documents of about this many prompt tokens in all (the attention method
    # costs one pass per document and needs no limit beyond --max-documents).
    max_explanation_parts: int = 256
    max_occlusion_parts: int = 1024


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # for argparse's "invalid int value" message
    return parse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `m0lite serve`; every ServerSettings field has one."""
    d, pint, pfloat = ServerSettings(), _positive(int), _positive(float)
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: the reranker's choice for the device)")
    parser.add_argument("--served-model-name", default=None,
                        help="model id in responses and /v1/models (default: the --model's last path part)")
    parser.add_argument("--api-key", default=os.environ.get("M0LITE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                             "(default: env M0LITE_API_KEY)")
    parser.add_argument("--max-documents", type=pint, default=d.max_documents, help="documents per request")
    parser.add_argument("--max-images", type=pint, default=d.max_images, help="images per request")
    parser.add_argument("--max-body-bytes", type=pint, default=d.max_body_bytes, help="raw request body")
    parser.add_argument("--max-text-chars", type=pint, default=d.max_text_chars, help="query or one document")
    parser.add_argument("--max-image-bytes", type=pint, default=d.max_image_bytes, help="one image, encoded")
    parser.add_argument("--max-image-pixels", type=pint, default=d.max_image_pixels, help="one image, decoded")
    parser.add_argument("--max-pdf-bytes", type=pint, default=d.max_pdf_bytes, help="one PDF, encoded")
    parser.add_argument("--max-pdf-pages", type=pint, default=d.max_pdf_pages, help="pages rendered of one PDF")
    parser.add_argument("--pdf-timeout", type=pfloat, default=d.pdf_timeout,
                        help="seconds to render one PDF (in a worker process, killed past it)")
    parser.add_argument("--max-request-tokens", type=pint, default=d.max_request_tokens,
                        help="prompt tokens over all pairs of one request (estimated before scoring)")
    parser.add_argument("--max-request-pixels", type=pint, default=d.max_request_pixels,
                        help="decoded pixels over all images of one request")
    parser.add_argument("--image-memory-mb", type=pfloat, default=d.image_memory_mb,
                        help="memory budget for images being decoded, all requests together (MiB); an image "
                             "is held at full size only until it is resized to the model's resolution")
    parser.add_argument("--image-timeout", type=pfloat, default=d.image_timeout, help="seconds per image URL")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="let image URLs reach loopback, private and link-local addresses")
    parser.add_argument("--image-threads", type=pint, default=d.image_threads, help="concurrent image loads")
    parser.add_argument("--max-queue", type=pint, default=d.max_queue, help="waiting requests; beyond: 503")
    parser.add_argument("--max-batch-pairs", type=pint, default=d.max_batch_pairs, help="pairs per model pass")
    parser.add_argument("--max-pass-tokens", type=pint, default=d.max_pass_tokens,
                        help="prompt tokens per model pass (the unit of fairness between requests)")
    parser.add_argument("--max-pass-patches", type=pint, default=d.max_pass_patches,
                        help="image patches per model pass")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="how long to wait for more requests to share a pass")
    parser.add_argument("--request-timeout", type=pfloat, default=d.request_timeout,
                        help="seconds from arrival to answer; then 504 and the request's pairs are dropped")
    parser.add_argument("--header-timeout", type=pfloat, default=d.header_timeout,
                        help="seconds a client has to send its request line and headers")
    parser.add_argument("--body-timeout", type=pfloat, default=d.body_timeout,
                        help="seconds a client has to send its whole body; then 408")
    parser.add_argument("--max-length", type=pint, default=d.max_length, help="prompt tokens per pair")
    parser.add_argument("--max-query-length", type=pint, default=d.max_query_length, help="query tokens")
    parser.add_argument("--max-explanation-parts", type=pint, default=d.max_explanation_parts,
                        help="explain: text tokens, and image regions, kept per explanation (the strongest)")
    parser.add_argument("--max-occlusion-parts", type=pint, default=d.max_occlusion_parts,
                        help="explain_method occlusion: prompt tokens over the documents a request explains "
                             "(one decoder pass per part; estimated before scoring)")
    parser.add_argument("--doc-cache-mb", type=float, default=0,
                        help="MiB of document keys/values kept to rescore known documents cheaply (0: off)")
    parser.add_argument("--vision-cache-mb", type=float, default=256, help="MiB of images' visual tokens kept")
    parser.add_argument("--pack-weights", choices=["start", "auto", "never"], default="start",
                        help="bf16 on CPU: lay the decoder's weights out for oneDNN at start (faster passes, "
                             "a second more to start; the vision tower's once 4,096 image patches have "
                             "run, so a text-only server never maps it), both after some work (auto), or never")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: torch.compile the blocks instead of packing weights (the first request compiles)")
    add_quantize_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in fields(ServerSettings) if getattr(args, f.name, None) is not None}
    values["served_model_name"] = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    values["api_key"] = args.api_key or None
    return ServerSettings(**values)


def random_weights_reason(reranker, folder) -> str | None:
    """Why a loaded checkpoint is probably random weights (a test or demo one), or None.

    The published model has the Qwen2-VL-2B dimensions (TextConfig's and VisionConfig's defaults);
    a checkpoint of other dimensions cannot be it. A random checkpoint of the published size is
    recognised only by a marker from its writer (`m0lite_random_weights` in config.json or in the
    safetensors metadata)."""
    import json
    from pathlib import Path

    from m0lite.config import TextConfig, VisionConfig

    folder = Path(folder)
    try:
        if json.loads((folder / "config.json").read_text()).get("m0lite_random_weights"):
            return "its config.json marks it as random weights"
        from safetensors import safe_open

        for f in sorted(folder.glob("*.safetensors"))[:1]:
            with safe_open(str(f), "pt") as st:
                if (st.metadata() or {}).get("m0lite_random_weights"):
                    return "its safetensors metadata marks it as random weights"
    except (OSError, ValueError):
        pass
    cfg = getattr(getattr(reranker, "model", None), "cfg", None)
    if cfg is None:
        return None
    published = (TextConfig().hidden_size, TextConfig().num_hidden_layers, VisionConfig().embed_dim, VisionConfig().depth)
    got = (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.vision.embed_dim, cfg.vision.depth)
    if got != published:
        return (f"its dimensions (hidden_size {got[0]}, {got[1]} layers, vision {got[2]} x {got[3]}) are not "
                f"jina-reranker-m0's, so it is a test or demo checkpoint")
    return None
