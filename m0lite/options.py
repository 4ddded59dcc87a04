"""What the commands share: the model's options (every command that loads one), the lean mode's (those and
`m0lite serve`), and how a DOC argument is read."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import M0liteError
from .images import parse_image_source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights: half the memory, a lossy mode (see README: Lean mode)")
    p.add_argument("--int8-compute", choices=["auto", "dynamic", "weight-only"], default="auto",
                   help="int8 x int8 (dynamic) or weight-only; auto: dynamic where the CPU has int8 matmul units")


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="checkpoint folder or hub repo id (e.g. jinaai/jina-reranker-m0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA and on CPUs with native bf16, else float32)")
    add_quantize_arguments(p)


def load_reranker(args, **kwargs):
    """The Reranker the model arguments describe."""
    from .reranker import Reranker

    return Reranker.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                    int8_compute=args.int8_compute, **kwargs)


def document_arg(arg: str):
    """A DOC argument: an image URL or file becomes an image, a text file its text, anything else is text.
    A word that names an image file (`missing.png`) must be one: a typo is an error, not a text to rank."""
    if arg[:8].lower().startswith(("http://", "https://")) or arg[:11].lower() == "data:image/":
        parse_image_source(arg, allow_paths=False)  # a malformed URL or data URI fails here, naming itself
        return {"image": arg}
    path = Path(arg)
    try:
        is_file = len(arg) < 4096 and path.is_file()
    except OSError:  # not a name a file can have (too long for the file system, say): text
        is_file = False
    if is_file:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return {"image": str(path)}
        try:
            return {"text": path.read_text(encoding="utf-8")}
        except UnicodeDecodeError:
            raise M0liteError(f"{path}: not UTF-8 text and not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})") from None
    if len(arg) < 4096 and not any(c.isspace() for c in arg) and path.suffix.lower() in IMAGE_SUFFIXES:
        raise M0liteError(f"{arg}: no such file (a document named like an image file is read as one)")
    return {"text": arg}
