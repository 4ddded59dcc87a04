"""Images in, patches out: loading and preprocessing as jina-reranker-m0 does it.

Two steps, each reproducing the reference pixel for pixel:

1. `load_image` turns a source (PIL image, path, http(s) URL, base64 string,
   `data:` URI, or `{"image": ...}`) into an RGB PIL image. The original routes
   strings through `transformers.image_utils.load_image` (EXIF rotation, then
   `.convert("RGB")`, which drops alpha) and hands PIL images straight to the
   processor (no EXIF rotation); the processor's `convert_to_rgb` then
   composites any transparency over white. Unlike the original, the
   decompression-bomb guard stays on, downloads are capped in time and size,
   and every failure is an `ImageError` that names the image.
2. `preprocess` is Qwen2VLImageProcessor (the PIL backend, transformers 5.x
   `image_processing_pil_qwen2_vl`): `smart_resize` to multiples of 28, PIL
   bicubic on uint8, rescale by 1/255 in float64 then float32, normalise with
   the CLIP mean/std in float32, and flatten 14x14 patches so that the four
   patches of each 2x2 merge window sit next to each other.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError, InputError

# --- Constants ------------------------------------------------------------
# Vision geometry: the checkpoint's vision_config and preprocessor_config.json
# (patch_size 14, temporal_patch_size 2, merge_size 2), as in transformers'
# Qwen2VLImageProcessor defaults.
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch
# Pixel bounds the reranker passes to its processor (jina-reranker-m0 modeling.py:
# min_pixels=3136, max_pixels=602112), i.e. 4 to 768 visual tokens.
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 768 * 28 * 28  # 602112
MAX_ASPECT_RATIO = 200  # smart_resize refuses anything more elongated
# Rescale and normalisation: preprocessor_config.json (rescale_factor
# 0.00392156862745098 == 1/255, image_mean/std = OPENAI_CLIP_MEAN/STD in
# transformers.image_utils).
RESCALE_FACTOR = 1 / 255
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = Image.Resampling.BICUBIC

# Loading limits (ours; the original has none).
DEFAULT_TIMEOUT = 10.0  # seconds per socket operation, and about the whole download
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # encoded size of a file, download or base64 payload
# Pillow's own default for Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3),
# fixed here so that code elsewhere setting it to None cannot switch the check off.
DECODE_MAX_PIXELS = 89_478_485

_URL_PREFIXES = ("http://", "https://")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# --- Loading --------------------------------------------------------------


def load_image(
    src: Any,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DECODE_MAX_PIXELS,
    allow_private_urls: bool = True,
) -> Image.Image:
    """Load `src` into the RGB image that the reference processor would see.

    `src` is a PIL image, a `pathlib.Path` or `str` path, an http(s) URL, a
    base64 string, a `data:` URI, raw encoded bytes, or `{"image": src}`.
    `max_bytes` caps the encoded size (file, download, base64 payload);
    `max_pixels` caps the declared width * height, checked before decoding (a
    decompression-bomb guard; Pillow's own guard, `Image.MAX_IMAGE_PIXELS`,
    also stays on, so raising `max_pixels` above it has no effect unless that
    is raised too). With `allow_private_urls=False`, a URL whose host resolves
    to a loopback, private, link-local, reserved or multicast address is
    refused, on every redirect hop, and no proxy is used.

    Raises `ImageTooLargeError` past a limit, `ImageError` for anything else.
    """
    if not timeout or timeout <= 0:
        raise InputError(f"load_image: timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(src, dict):
        if "image" not in src:
            raise ImageError(f"image dict has no 'image' key (keys: {sorted(map(str, src))})")
        src = src["image"]

    if isinstance(src, Image.Image):
        # The reference passes PIL images to the processor as they are: no EXIF rotation.
        name = f"PIL image ({src.mode}, {src.width}x{src.height})"
        with _decoding(name):
            _check_pixels(src.size, max_pixels, name)
            return _processor_rgb(src)

    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = f"{len(data)} bytes of image data"
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"{name}: over the limit of {max_bytes} bytes")
    elif isinstance(src, os.PathLike):
        name = f"file {os.fspath(src)!r}"
        data = _read_file(Path(src), max_bytes, name)
    elif isinstance(src, str):
        data, name = _read_str(src, timeout=timeout, max_bytes=max_bytes, allow_private_urls=allow_private_urls)
    else:
        raise ImageError(
            f"unsupported image source of type {type(src).__name__}: expected a PIL image, a path, "
            "an http(s) URL, a base64 string, a data: URI, bytes, or {'image': ...}"
        )

    img = _decode(data, name, max_pixels)
    with _decoding(name):
        # As transformers.image_utils.load_image: upright by EXIF, then RGB (alpha dropped, not composited).
        img = ImageOps.exif_transpose(img).convert("RGB")
        # ...and then the processor's convert_to_rgb, which still composites if `info` holds a
        # transparency colour (an L or RGB PNG with a tRNS chunk, a P image with one transparent index).
        return _processor_rgb(img)


def _read_str(s: str, *, timeout: float, max_bytes: int, allow_private_urls: bool) -> tuple[bytes, str]:
    """Classify a string as transformers does (URL, existing file, data: URI, base64) and read its bytes."""
    if not s.strip():
        raise ImageError("empty string given as an image")
    if s[:8].lower().startswith(_URL_PREFIXES):
        name = f"URL {_shorten(_redact(s))!r}"
        return _fetch(s, name, timeout=timeout, max_bytes=max_bytes, allow_private_urls=allow_private_urls), name
    if os.path.isfile(s):
        name = f"file {_shorten(s)!r}"
        return _read_file(Path(s), max_bytes, name), name
    if s.startswith("data:"):
        name = f"data URI of {len(s)} chars"
        header, comma, payload = s.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageError(f"{name}: only base64 data URIs are supported (got header {_shorten(header, 60)!r})")
        return _b64decode(payload, name, max_bytes), name
    if m := _SCHEME_RE.match(s):
        raise ImageError(f"URL {_shorten(_redact(s))!r}: unsupported scheme {m.group(1)!r} (only http and https)")
    if _looks_like_path(s):
        if os.path.exists(s):
            raise ImageError(f"file {_shorten(s)!r}: not a regular file")
        name = f"{_shorten(s)!r} (no such file; read as base64 string of {len(s)} chars)"
        try:
            return _b64decode(s, name, max_bytes), name
        except ImageTooLargeError:
            raise
        except ImageError:
            raise ImageError(f"file {_shorten(s)!r}: no such file (nor is it a URL or valid base64)") from None
    name = f"base64 string of {len(s)} chars"
    return _b64decode(s, name, max_bytes), name


def _looks_like_path(s: str) -> bool:
    # No encoded image fits in fewer than ~90 base64 chars, and '.', '\\' and '~' are not in
    # the base64 alphabet; such strings are reported as missing files rather than bad base64.
    return len(s) < 256 or any(c in s for c in ".\\~")


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


def _read_file(path: Path, max_bytes: int, name: str) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot access ({e.strerror or e})") from None
    if not path.is_file():
        raise ImageError(f"{name}: not a regular file")
    if st.st_size > max_bytes:
        raise ImageTooLargeError(f"{name}: {st.st_size} bytes, over the limit of {max_bytes}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: over the limit of {max_bytes} bytes")
    return data


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open, check the declared size, then fully decode (so truncation fails here)."""
    with _decoding(name):
        img = Image.open(io.BytesIO(data), formats=_formats())
        _check_pixels(img.size, max_pixels, name)
        img.load()
    return img


def _formats() -> list[str]:
    # Every format Pillow knows, in its own order, except EPS: Pillow decodes EPS by running
    # Ghostscript on the file, which untrusted input should not reach.
    Image.init()
    return [f for f in Image.ID if f != "EPS"]


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (decompression-bomb guard)"
        )


@contextlib.contextmanager
def _decoding(name: str):
    """Turn whatever Pillow raises while decoding into ImageError naming the image."""
    try:
        # catch_warnings swaps process-wide filters; under concurrent use the worst outcome is this
        # "error" filter outliving the block, which only makes the bomb guard stricter.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except MemoryError:
        raise ImageTooLargeError(f"{name}: out of memory while decoding") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in any format Pillow can read") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def _processor_rgb(img: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: composite any transparency over white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _shorten(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _redact(url: str) -> str:
    """The URL without a password, fit for an error message."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username}:***@" + parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


# --- Downloading ----------------------------------------------------------


class _PrivateAddressError(OSError):
    """A URL host resolves to an address that allow_private_urls=False refuses."""


def _is_public_address(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 scope id
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


def _create_public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *args):
    """socket.create_connection that first checks EVERY resolved address, then connects to those.

    Checking at connect time covers every redirect hop and DNS answers that change between a
    check and the connection.
    """
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        if not _is_public_address(sockaddr[0]):
            raise _PrivateAddressError(f"host {host!r} resolves to non-public address {sockaddr[0]}")
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"cannot resolve {host!r}")


class _PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _create_public_connection


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PublicHTTPConnection, req)


_HAS_SSL = hasattr(http.client, "HTTPSConnection")  # False on a Python built without ssl
if _HAS_SSL:

    class _PublicHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = _create_public_connection

    class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_PublicHTTPSConnection, req, context=self._context)


class _HTTPOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects (as the original's httpx does), but never off http/https."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to unsupported scheme {scheme!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(allow_private_urls: bool) -> urllib.request.OpenerDirector:
    # Built by hand: only http(s), no file:/ftp:/data: handlers that a redirect could reach.
    opener = urllib.request.OpenerDirector()
    if allow_private_urls:
        handlers = [urllib.request.ProxyHandler(), urllib.request.HTTPHandler()]  # proxies from the environment
        handlers += [urllib.request.HTTPSHandler()] if _HAS_SSL else []
    else:
        # No proxy: the connection must go to the checked address itself.
        handlers = [_PublicHTTPHandler()]
        handlers += [_PublicHTTPSHandler()] if _HAS_SSL else []
    handlers += [
        urllib.request.HTTPDefaultErrorHandler(),
        _HTTPOnlyRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ]
    for h in handlers:
        opener.add_handler(h)
    return opener


def _fetch(url: str, name: str, *, timeout: float, max_bytes: int, allow_private_urls: bool) -> bytes:
    """GET `url` with stdlib urllib: http(s) only, a socket timeout, an overall deadline, a byte cap."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks brackets, .port the port number; both raise ValueError
    except ValueError as e:
        raise ImageError(f"{name}: malformed URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageError(f"{name}: unsupported scheme {parts.scheme!r} (only http and https)")
    if not parts.hostname:
        raise ImageError(f"{name}: no host in URL")
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])),
        headers={"User-Agent": "m0lite", "Accept": "image/*, */*;q=0.5"},
    )
    if parts.username is not None:  # user:password@host becomes Basic auth, as httpx does
        userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        # "unredirected": never sent on to wherever a redirect points.
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(userinfo.encode()).decode())
    deadline = time.monotonic() + timeout
    try:
        with _opener(allow_private_urls).open(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > max_bytes:
                raise ImageTooLargeError(f"{name}: Content-Length {int(length)} bytes, over the limit of {max_bytes}")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"{name}: download timed out after {timeout:g} s")
                # read1: at most one blocking socket read, so the deadline is checked often.
                chunk = resp.read1(min(1 << 16, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise ImageTooLargeError(f"{name}: body over the limit of {max_bytes} bytes")
            return b"".join(chunks)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        e.close()
        raise ImageError(f"{name}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, _PrivateAddressError):
            raise ImageError(f"{name}: refused, {reason} (allow_private_urls=False)") from None
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise ImageError(f"{name}: timed out after {timeout:g} s") from None
        raise ImageError(f"{name}: cannot fetch ({reason})") from None
    except (TimeoutError, socket.timeout):
        raise ImageError(f"{name}: timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ImageError(f"{name}: download failed ({type(e).__name__}: {e})") from None


# --- Preprocessing --------------------------------------------------------


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of `factor`, area within [min_pixels, max_pixels].

    Rounds each side to the nearest multiple of `factor`; if the area is then too large, scales
    down by sqrt(area / max_pixels) rounding down, if too small, up by sqrt(min_pixels / area)
    rounding up. Same arithmetic as transformers' `smart_resize`.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image of {width}x{height} pixels (width x height) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {width}x{height} pixels (width x height) has aspect ratio {ratio:.1f}, "
            f"over the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _normalise_table() -> np.ndarray:
    """(3, 256) float32: every uint8 level of each channel, rescaled and normalised.

    Same operations and dtypes as the reference (`rescale`: float64 multiply, cast to float32;
    `normalize`: float32 subtract and divide), so a table lookup is bit-identical to it.
    """
    levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.array(IMAGE_MEAN, dtype=np.float32)[:, None]
    std = np.array(IMAGE_STD, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


_NORMALISED = _normalise_table()
_CHANNELS = np.arange(3)[:, None, None]


def preprocess(
    image: Image.Image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pixels of one image, as the vision tower takes them.

    Returns `pixel_values`, float32 (grid_h * grid_w, 3 * 2 * 14 * 14), rows ordered so that
    each 2x2 merge window's four patches are consecutive, each row (channel, frame, row, col)
    with the single frame repeated twice; and `grid_thw` = (1, grid_h, grid_w).
    """
    image = _processor_rgb(image)
    height, width = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    if image.size != (width, height):  # the reference resizes anyway, but PIL then returns a plain copy
        image = image.resize((width, height), resample=RESAMPLE)
    pixels = np.asarray(image)  # (H, W, C) uint8
    gh, gw, m, p = height // PATCH_SIZE, width // PATCH_SIZE, MERGE_SIZE, PATCH_SIZE
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, 3)  # (gh/m, mh, ph, gw/m, mw, pw, C)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    x = x.reshape(gh * gw, 3, 1, p * p)  # (N, C, 1, ph*pw), still uint8
    values = torch.from_numpy(_NORMALISED[_CHANNELS, x])  # (N, C, 1, ph*pw) float32
    values = values.expand(gh * gw, 3, TEMPORAL_PATCH_SIZE, p * p)  # (N, C, T, ph*pw)
    return values.reshape(gh * gw, PATCH_DIM), (1, gh, gw)


def num_visual_tokens(grid_thw: tuple[int, int, int], merge: int = MERGE_SIZE) -> int:
    """Number of `<|image_pad|>` tokens for one image: one per merge x merge patches."""
    t, h, w = grid_thw
    return t * h * w // (merge * merge)
