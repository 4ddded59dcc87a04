"""What a string given as an image is: an http(s) URL, a data URI, base64, or a file path.

One function, `parse_image_source`, reads a source the same way for the Python
API, the command line and the server. Only the caller decides whether a path
may be read: the API and the CLI allow paths, the server never does (a client
must not read the server's files), and says so when a string looks like one.
The order follows transformers' `load_image`: URL, existing file, data URI,
base64.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from ..errors import ImageError, ImageTooLargeError
from .fetch import redact, shorten

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # encoded size of a file, download or base64 payload

_URL_PREFIXES = ("http://", "https://")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_NOT_A_SOURCE = "{noun} is not an http(s) URL, a data URI or valid base64"


@dataclass(frozen=True)
class ImageSource:
    """A classified image string: `value` is the URL, the path, or the decoded bytes."""

    kind: Literal["url", "path", "bytes"]
    value: str | bytes
    name: str  # how error messages name the image


def parse_image_source(s: str, *, allow_paths: bool, max_bytes: int = DEFAULT_MAX_BYTES, noun: str = "image",
                       recognise=None) -> ImageSource:
    """Classify `s` and decode it where it carries the bytes itself (data URI, base64).

    Nothing is fetched or read here; `kind` says what the caller does next. A
    base64 payload over `max_bytes` raises `ImageTooLargeError`, anything
    malformed `ImageError` naming the source. `noun` and `recognise` (bytes ->
    whether they start a file of that kind; default: an image Pillow knows)
    let other kinds of file (a PDF) be read the same way.
    """
    recognise = recognise or _is_image_header
    if not isinstance(s, str):
        raise ImageError(f"{noun} source must be a string, got {type(s).__name__}")
    if not s.strip():
        raise ImageError(f"empty string given as {'an' if noun[0] in 'aeiou' else 'a'} {noun}")
    t = s.strip()
    if t[:8].lower().startswith(_URL_PREFIXES):
        name = f"URL {shorten(redact(t))!r}"
        try:
            parts = urllib.parse.urlsplit(t)
            parts.port  # noqa: B018 - urlsplit checks brackets, .port the port number; both raise ValueError
        except ValueError as e:
            raise ImageError(f"{name}: malformed URL: {e}") from None
        if not parts.hostname:
            raise ImageError(f"{name}: no host in URL")
        return ImageSource("url", t, name)
    if allow_paths and os.path.isfile(s):
        return ImageSource("path", s, f"file {shorten(s)!r}")
    if t[:5].lower() == "data:":
        name = f"data URI of {len(s)} chars"
        header, comma, payload = t.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageError(f"{name}: only base64 data URIs are supported (got header {shorten(header, 60)!r})")
        return ImageSource("bytes", _b64decode(payload, name, max_bytes), name)
    if m := _SCHEME_RE.match(t):
        raise ImageError(f"unsupported URL scheme {m.group(1)!r} in {shorten(redact(t))!r} "
                         f"(give an http(s) URL, a data URI or base64)")
    name = f"base64 string of {len(s)} chars"
    if allow_paths:
        if _looks_like_path(s):
            if os.path.exists(s):
                raise ImageError(f"file {shorten(s)!r}: not a regular file")
            try:
                return ImageSource("bytes", _b64decode(s, name, max_bytes), name)
            except ImageTooLargeError:
                raise
            except ImageError:
                raise ImageError(f"file {shorten(s)!r}: no such file (nor is it a URL or valid base64)") from None
        return ImageSource("bytes", _b64decode(s, name, max_bytes), name)
    # No paths: a string that reads as one gets a message saying so, not "N bytes: not an image".
    path_hint = f"; {shorten(s, 80)!r} looks like a file path, and files are not read here"
    try:
        data = _b64decode(s, name, max_bytes)
    except ImageTooLargeError:
        raise
    except ImageError:
        raise ImageError(_NOT_A_SOURCE.format(noun=noun) + (path_hint if _looks_like_path(s) else "")) from None
    if _looks_like_path(s) and not recognise(data):
        raise ImageError(_NOT_A_SOURCE.format(noun=noun) + path_hint)
    return ImageSource("bytes", data, name)


def _looks_like_path(s: str) -> bool:
    # No encoded image (nor PDF) fits in fewer than ~90 base64 chars, and '.', '\\' and '~' are not in
    # the base64 alphabet; such strings are reported as missing files rather than bad base64.
    return len(s) < 256 or any(c in s for c in ".\\~")


def _is_image_header(data: bytes) -> bool:
    """Whether Pillow recognises `data` as the start of an image (reads the header only)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)):
                return True
    except UnidentifiedImageError:
        return False
    except Exception:  # a format was recognised, then refused (a bomb, a broken header): decoding says why
        return True


def _b64decode(payload: str, name: str, max_bytes: int) -> bytes:
    compact = re.sub(r"\s+", "", payload)
    if not compact:
        raise ImageError(f"{name}: empty base64 payload")
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageTooLargeError(f"{name}: decodes to over the limit of {max_bytes} bytes")
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    altchars = b"-_" if ("-" in compact or "_" in compact) else None  # URL-safe alphabet
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: invalid base64 ({e})") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: decodes to {len(data)} bytes, over the limit of {max_bytes}")
    return data
