"""PDF documents: open a PDF safely and render its pages at the model's pixel budget (PDFium, via pypdfium2).

A page is drawn straight at the size the vision tower takes. `render_size` is
what `smart_resize` gives a picture of the page scaled, aspect ratio kept, to
exactly `max_pixels`; PDFium then maps the page onto a bitmap of that size (a
horizontal and a vertical scale from the page's size in points, which differ
only by smart_resize's rounding to multiples of 28, as they would for an image).
That size is a fixed point of smart_resize (sides multiples of 28, area within
the bounds), so the image path's preprocess resizes nothing: a page is never
rendered larger and resized down, and its pixels are exactly the rendered ones.

Everything here refuses bad input with a `PdfError` naming the PDF and page:
encrypted, corrupt or truncated files, no pages, a page of absurd size or
aspect ratio, more pages or bytes than allowed (checked before any page is
rendered), and the decompression-bomb guard of m0lite/images on the rendered
pixels (checked before rendering). PDFium is native code and not thread-safe:
every call holds one lock. A server that must survive a file crafted to crash
PDFium renders in a worker process (m0lite/server/pdfs.py).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from .errors import ImageError, ImageTooLargeError, PdfError, PdfTooLargeError
from .images import MAX_PIXELS, MIN_PIXELS, smart_resize
from .images.decode import DECODE_MAX_PIXELS, DEFAULT_TIMEOUT, check_pixels, read_source
from .images.preprocess import FACTOR, MAX_ASPECT_RATIO

MAX_PDF_BYTES = 64 * 2**20  # as an image file (images/source.py's DEFAULT_MAX_BYTES)
MAX_PDF_PAGES = 1000  # pages rendered of one PDF: the work a document costs is linear in it
_LOCK = threading.RLock()  # PDFium keeps global state; one call at a time in a process


def _pdfium():
    try:
        import pypdfium2
    except ImportError:
        raise PdfError("PDF documents need pypdfium2: pip install 'm0lite[pdf]'") from None
    return pypdfium2


def is_pdf_header(data: bytes) -> bool:
    """Whether `data` starts a PDF: readers accept the `%PDF-` marker anywhere in the first 1024 bytes."""
    return b"%PDF-" in data[:1024]


@dataclass
class Page:
    """One rendered page: its 1-based number, its RGB image at the model's size, its text if asked for."""

    number: int
    image: Image.Image
    text: str | None = None


def read_pdf(src, *, allow_paths: bool = True, max_bytes: int = MAX_PDF_BYTES, timeout: float = DEFAULT_TIMEOUT,
             allow_private_urls: bool = True) -> tuple[bytes, str]:
    """A PDF's bytes and how errors name it, from bytes, a path, an http(s) URL, base64 or a data URI (read
    as an image source is, under the same limits; `max_bytes` counted before parsing)."""
    try:
        data, name = read_source(src, timeout=timeout, max_bytes=max_bytes, allow_private_urls=allow_private_urls,
                                 allow_paths=allow_paths, noun="PDF", recognise=is_pdf_header)
    except ImageTooLargeError as e:
        raise PdfTooLargeError(str(e)) from None
    except ImageError as e:
        raise PdfError(str(e)) from None
    if not is_pdf_header(data):
        raise PdfError(f"{name}: not a PDF (no %PDF- header in its first 1024 bytes)")
    return data, name


def parse_pages(spec, count: int, name: str) -> list[int]:
    """1-based page numbers from a spec: None (all), an int, or a string such as "3", "1-20", "1,3,5-7" or
    "5-" (5 to the end). A range's end past the last page is cut to it; a page or range start past the end,
    a page 0 or a range backwards is an error."""
    if spec is None:
        return list(range(1, count + 1))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise PdfError(f"{name}: pages must be a string such as '1-20' or '1,3,5-7', got {spec!r}"[:200])
    out: dict[int, None] = {}  # ordered, without repeats
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d{1,9})\s*(?:(-)\s*(\d{1,9})?\s*)?", part)
        if not m:
            raise PdfError(f"{name}: pages {spec!r}: {part.strip()!r} is not a page number or range (e.g. '1-20')"[:300])
        first = int(m.group(1))
        last = first if not m.group(2) else (int(m.group(3)) if m.group(3) else count)
        if first < 1 or last < first:
            raise PdfError(f"{name}: pages {spec!r}: {part.strip()!r} is not a range of pages counted from 1"[:300])
        if first > count:
            raise PdfError(f"{name}: pages {spec!r}: page {first} asked for, the PDF has {count} pages"[:300])
        out.update(dict.fromkeys(range(first, min(last, count) + 1)))
    return list(out)


def render_size(width_pt: float, height_pt: float, *, min_pixels: int = MIN_PIXELS,
                max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) in pixels at which a page of this size in points is rendered: what smart_resize keeps of
    the page pictured at exactly max_pixels. Raises ImageError (empty page, aspect ratio over 200)."""
    if not (math.isfinite(width_pt) and math.isfinite(height_pt)) or width_pt <= 0 or height_pt <= 0:
        raise ImageError(f"page of {width_pt:g}x{height_pt:g} points has no area")
    ratio = max(width_pt, height_pt) / min(width_pt, height_pt)
    if ratio > MAX_ASPECT_RATIO:  # smart_resize would refuse it too, but in pixels of a size never rendered
        raise ImageError(f"page of {width_pt:g}x{height_pt:g} points has aspect ratio {ratio:.4g}, over the "
                         f"limit of {MAX_ASPECT_RATIO}")
    scale = math.sqrt(max_pixels / (width_pt * height_pt))
    height, width = smart_resize(height_pt * scale, width_pt * scale, FACTOR, min_pixels, max_pixels)
    return width, height


class PdfFile:
    """An open PDF. Pages are loaded and rendered one at a time, on demand, so that a long PDF is never held
    rendered whole; close it (or use `with`) to free PDFium's copy."""

    def __init__(self, data: bytes, name: str):
        pdfium = _pdfium()
        c = pdfium.raw
        self.name = name
        with _LOCK:
            # Opened by hand rather than by PdfDocument(data), which reads PDFium's last error also when
            # the document opened and has no pages (the error then is an earlier document's).
            raw = c.FPDF_LoadMemDocument64(data, len(data), None)
            if not raw:
                raise PdfError(f"{name}: {_load_error(c.FPDF_GetLastError())}")
            self._data = data  # PDFium reads from this buffer while the document is open
            self._pdf = pdfium.PdfDocument(raw)
            self.page_count = c.FPDF_GetPageCount(raw)
            if self.page_count < 1:
                self._pdf.close()
                raise PdfError(f"{name}: has no pages")

    def close(self) -> None:
        with _LOCK:
            self._pdf.close()

    def __enter__(self) -> "PdfFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def render(self, number: int, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               max_render_pixels: int = DECODE_MAX_PIXELS, with_text: bool = False) -> Page:
        """Page `number` (1-based) drawn at `render_size` on white, annotations included, and its text with
        `with_text`. The size is checked against `max_render_pixels` (the decompression-bomb guard) before
        anything is drawn."""
        pdfium = _pdfium()
        c = pdfium.raw
        where = f"{self.name}: page {number}"
        with _LOCK:
            try:
                page = self._pdf[number - 1]
            except pdfium.PdfiumError:
                raise PdfError(f"{where}: cannot be loaded (a broken page object)") from None
            try:
                w_pt, h_pt = page.get_size()
                try:
                    width, height = render_size(w_pt, h_pt, min_pixels=min_pixels, max_pixels=max_pixels)
                    check_pixels((width, height), max_render_pixels, f"page of {w_pt:g}x{h_pt:g} points")
                except ImageTooLargeError as e:
                    raise PdfTooLargeError(f"{where}: {e}") from None
                except ImageError as e:
                    raise PdfError(f"{where}: {e}") from None
                # RGB straight from PDFium (BGR with its byte order reversed), the page composited over white.
                bitmap = pdfium.PdfBitmap.new_native(width, height, c.FPDFBitmap_BGR, rev_byteorder=True)
                bitmap.fill_rect((255, 255, 255, 255), 0, 0, width, height)
                # size_x and size_y map the page (its /Rotate applied) onto the whole bitmap.
                c.FPDF_RenderPageBitmap(bitmap, page, 0, 0, width, height, 0, c.FPDF_ANNOT | c.FPDF_REVERSE_BYTE_ORDER)
                image = bitmap.to_pil().copy()  # the copy owns its pixels; the bitmap's buffer goes with it
                bitmap.close()
                text = _page_text(page) if with_text else None
            finally:
                page.close()
        return Page(number, image, text)


def _page_text(page) -> str:
    textpage = page.get_textpage()
    try:
        # PDFium ends lines with \r\n; a document's text elsewhere in m0lite ends them with \n.
        return textpage.get_text_range().replace("\r\n", "\n").replace("\x00", "")
    finally:
        textpage.close()


def _load_error(code: int) -> str:
    """PDFium's reason (FPDF_GetLastError) a document does not open, in words."""
    return {
        2: "cannot be read",
        3: "not a valid PDF (corrupt or truncated)",
        4: "is encrypted (password-protected); give an unencrypted PDF",
        5: "is encrypted with a security handler PDFium does not support",
        6: "has no readable pages",
    }.get(code, f"cannot be opened (PDFium error {code})")


def check_page_count(pages: list[int], max_pages: int, name: str) -> None:
    if len(pages) > max_pages:
        raise PdfTooLargeError(f"{name}: {len(pages)} pages to render, over the limit of {max_pages} pages "
                               f"(max_pdf_pages); choose fewer with 'pages', e.g. '1-{max_pages}'")


def render_pages(data: bytes, name: str, pages=None, *, max_pages: int = MAX_PDF_PAGES, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, max_render_pixels: int = DECODE_MAX_PIXELS,
                 with_text: bool = False) -> Iterator[Page]:
    """The selected pages (`parse_pages` spec), rendered one by one as they are asked for. The PDF is
    opened, its pages counted and `max_pages` checked before the first page is rendered."""
    pdf = PdfFile(data, name)
    try:
        numbers = parse_pages(pages, pdf.page_count, name)
        check_page_count(numbers, max_pages, name)
    except BaseException:
        pdf.close()
        raise
    return _each(pdf, numbers, min_pixels=min_pixels, max_pixels=max_pixels, max_render_pixels=max_render_pixels,
                 with_text=with_text)


def _each(pdf: PdfFile, numbers: list[int], **kwargs) -> Iterator[Page]:
    with pdf:
        for n in numbers:
            yield pdf.render(n, **kwargs)


def render_page(src, number: int, *, max_bytes: int = MAX_PDF_BYTES, min_pixels: int = MIN_PIXELS,
                max_pixels: int = MAX_PIXELS, with_text: bool = False) -> Page:
    """Page `number` (1-based) of a PDF from any source `read_pdf` takes, rendered as a PDF document's pages
    are: the page a ranking scored, as an image document on its own (to explain it, say)."""
    data, name = read_pdf(src, max_bytes=max_bytes)
    if isinstance(number, bool) or not isinstance(number, int):
        raise PdfError(f"{name}: a page is a number counted from 1, got {number!r}"[:200])
    pages = render_pages(data, name, number, max_pages=1, min_pixels=min_pixels, max_pixels=max_pixels,
                         with_text=with_text)
    try:
        return next(pages)
    finally:
        pages.close()
