"""What the commands share: the model's options (every command that loads one), the lean mode's (those and
`m0lite serve`), and how a DOC argument, or a document given as JSON, is read."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import M0liteError
from .images import parse_image_source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights: half the memory, a lossy mode (see README: Lean mode)")
    p.add_argument("--int8-compute", choices=["auto", "dynamic", "weight-only"], default="auto",
                   help="int8 x int8 (dynamic) or weight-only; auto: dynamic on x86 CPUs with AVX2 or more (7-bit "
                        "activations without VNNI or AMX)")


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


def _is_url(arg: str) -> bool:
    return arg[:8].lower().startswith(("http://", "https://")) or arg[:11].lower() == "data:image/"


def _names_missing_image_file(arg: str, path: Path) -> bool:
    """A single word ending in an image suffix that is no file: a typo, not text or base64."""
    return len(arg) < 4096 and not any(c.isspace() for c in arg) and path.suffix.lower() in IMAGE_SUFFIXES


def document_arg(arg: str):
    """A DOC argument: an image URL or file becomes an image, a .pdf file a PDF, a text file its text, anything
    else is text.
    A word that names an image file (`missing.png`) must be one: a typo is an error, not a text to rank."""
    if _is_url(arg):
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
        if path.suffix.lower() == ".pdf":
            return {"pdf": str(path)}
        try:
            return {"text": path.read_text(encoding="utf-8")}
        except UnicodeDecodeError:
            raise M0liteError(f"{path}: not UTF-8 text and not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})") from None
    if _names_missing_image_file(arg, path) or (len(arg) < 4096 and path.suffix.lower() == ".pdf" and " " not in arg):
        raise M0liteError(f"{arg}: no such file (a document named like an image or PDF file is read as one)")
    return {"text": arg}


def json_document(value, where: str, base: Path = Path()):
    """A document given as JSON (`--doc-json`, a `--docs-jsonl` line): a string is text; an object has "text",
    "image" or both (a document of an image and its text), each a string. The text is the text itself, never
    a file; the image a file (a relative path from `base`), an http(s) URL, a data URI or base64."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict) and "pdf" in value:  # {"pdf": file, URL or base64, "pages": "1-20"}
        if set(value) - {"pdf", "pages"} or not isinstance(value["pdf"], str):
            raise M0liteError(f"{where}: a PDF document is {{\"pdf\": FILE_OR_URL, \"pages\": \"1-20\"}}, got keys {sorted(value)}")
        path = base / value["pdf"]
        return {**value, "pdf": str(path)} if len(value["pdf"]) < 4096 and path.is_file() else dict(value)
    if not isinstance(value, dict) or not value or set(value) - {"text", "image"}:
        got = f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
        raise M0liteError(f"{where}: a document is a JSON string or an object with 'text', 'image' or both, got {got}")
    for key, part in value.items():
        if not isinstance(part, str):
            raise M0liteError(f"{where}: '{key}' must be a string, got {type(part).__name__}")
    doc = dict(value)
    image = doc.get("image")
    if image is not None and not _is_url(image) and len(image) < 4096:
        path = base / image  # an absolute path stays as it is
        try:
            is_file = path.is_file()
        except OSError:  # not a name a file can have (base64, say)
            is_file = False
        if is_file:
            doc["image"] = str(path)
        elif _names_missing_image_file(image, path):
            raise M0liteError(f"{where}: image {image}: no such file")
    return doc


def jsonl_documents(name: str) -> list[dict]:
    """The documents of a JSON lines file (`-`: standard input), one `json_document` a line, blank lines
    skipped; relative image paths are from the file's folder. Errors name the file and line."""
    try:
        f = sys.stdin if name == "-" else open(name, encoding="utf-8")
    except OSError as e:
        raise M0liteError(f"{name}: cannot read ({e.strerror})") from None
    base = Path() if name == "-" else Path(name).parent
    try:
        with f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise M0liteError(f"{name}: not UTF-8 text") from None
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise M0liteError(f"{name}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        docs.append(json_document(value, f"{name}:{n}", base))
    return docs
