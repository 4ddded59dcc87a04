"""From an image source to the RGB picture the reference processor sees.

The original routes strings through `transformers.image_utils.load_image` (EXIF
rotation, then `.convert("RGB")`, which drops alpha) and hands PIL images
straight to the processor (no EXIF rotation); the processor's `convert_to_rgb`
then composites any transparency over white. `load_image` does the same, but
the decompression-bomb guard stays on, downloads are capped in time and size,
and every failure is an `ImageError` that names the image.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError, InputError
from .fetch import fetch
from .source import DEFAULT_MAX_BYTES, parse_image_source

DEFAULT_TIMEOUT = 10.0  # seconds per socket operation, and about the whole download
# Pillow's own default for Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3),
# fixed here so that code elsewhere setting it to None cannot switch the check off.
DECODE_MAX_PIXELS = 89_478_485


def load_image(
    src: Any,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DECODE_MAX_PIXELS,
    allow_private_urls: bool = True,
    allow_paths: bool = True,
) -> Image.Image:
    """Load `src` into the RGB image that the reference processor would see.

    `src` is a PIL image, a `pathlib.Path` or `str` path, an http(s) URL, a
    base64 string, a `data:` URI, raw encoded bytes, or `{"image": src}`; a
    string is read by `parse_image_source` (paths only with `allow_paths`).
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
        with _decoding(name, max_pixels):
            check_pixels(src.size, max_pixels, name)
            return processor_rgb(src)

    if not isinstance(src, (bytes, bytearray, memoryview, os.PathLike, str)):
        raise ImageError(
            f"unsupported image source of type {type(src).__name__}: expected a PIL image, a path, "
            "an http(s) URL, a base64 string, a data: URI, bytes, or {'image': ...}"
        )
    data, name = read_source(src, timeout=timeout, max_bytes=max_bytes, allow_private_urls=allow_private_urls,
                             allow_paths=allow_paths)
    return decode(data, name, max_pixels)


def read_source(src, *, timeout: float, max_bytes: int, allow_private_urls: bool, allow_paths: bool,
                noun: str = "image", recognise=None) -> tuple[bytes, str]:
    """The encoded bytes of a file given as bytes, a path, an http(s) URL, base64 or a data URI, and how
    errors name it; every limit of `load_image` applies. `noun` and `recognise` as in `parse_image_source`
    (a PDF is read through here too)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = f"{len(data)} bytes of {noun} data"
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"{name}: over the limit of {max_bytes} bytes")
        return data, name
    if isinstance(src, os.PathLike):
        name = f"file {os.fspath(src)!r}"
        if not allow_paths:
            raise ImageError(f"{name}: files are not read here")
        return read_file(Path(src), max_bytes, name), name
    if not isinstance(src, str):
        raise ImageError(f"unsupported {noun} source of type {type(src).__name__}: expected a path, an http(s) "
                         "URL, a base64 string, a data: URI or bytes")
    source = parse_image_source(src, allow_paths=allow_paths, max_bytes=max_bytes, noun=noun, recognise=recognise)
    if source.kind == "url":
        return fetch(source.value, source.name, timeout=timeout, max_bytes=max_bytes,
                     allow_private_urls=allow_private_urls), source.name
    if source.kind == "path":
        return read_file(Path(source.value), max_bytes, source.name), source.name
    return source.value, source.name


def decode(data: bytes, name: str, max_pixels: int = DECODE_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB image as `load_image` gives it; errors name `name`."""
    img = _open(data, name, max_pixels)
    del data
    with _decoding(name, max_pixels):
        # As transformers.image_utils.load_image: upright by EXIF, then RGB (alpha dropped, not composited).
        # In place and only when needed: each copy of a large image is its width x height x 4 bytes.
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode != "RGB":
            img = img.convert("RGB")
        # ...and then the processor's convert_to_rgb, which still composites if `info` holds a
        # transparency colour (an L or RGB PNG with a tRNS chunk, a P image with one transparent index).
        return processor_rgb(img)


def image_size(data: bytes, name: str, max_pixels: int = DECODE_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as the header declares it, without decoding the pixels."""
    with _decoding(name, max_pixels):
        with Image.open(io.BytesIO(data), formats=_formats()) as img:
            check_pixels(img.size, max_pixels, name)
            return img.size


def read_file(path: Path, max_bytes: int, name: str) -> bytes:
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


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open, check the declared size, then fully decode (so truncation fails here)."""
    with _decoding(name, max_pixels):
        img = Image.open(io.BytesIO(data), formats=_formats())
        check_pixels(img.size, max_pixels, name)
        img.load()
    return img


def _formats() -> list[str]:
    # Every format Pillow knows, in its own order, except EPS: Pillow decodes EPS by running
    # Ghostscript on the file, which untrusted input should not reach.
    Image.init()
    return [f for f in Image.ID if f != "EPS"]


def _limit(max_pixels: int) -> int:
    """The pixel limit in force: ours, or Pillow's where that is lower (it stays on)."""
    pillow = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow) if pillow else max_pixels


def check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (decompression-bomb guard)"
        )


@contextlib.contextmanager
def _decoding(name: str, max_pixels: int = DECODE_MAX_PIXELS):
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
        # Pillow refuses in Image.open, before our own check sees the size; quote the limit in force,
        # not Pillow's constant.
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{m.group(1)} pixels" if m else "too many pixels"
        raise ImageTooLargeError(
            f"{name}: {size}, over the limit of {_limit(max_pixels):,} (decompression-bomb guard)"
        ) from None
    except MemoryError:
        raise ImageTooLargeError(f"{name}: out of memory while decoding") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image in any format Pillow can read") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError...
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def processor_rgb(img: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: composite any transparency over white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
