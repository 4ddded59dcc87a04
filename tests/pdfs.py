"""PDFs the tests write themselves: with pypdfium2's writer (pages holding pictures) or by hand (text, and the
malformed files a writer will not produce)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def picture_pdf(sizes: list[tuple[float, float]], seed: int = 0) -> bytes:
    """A page per (width, height) in points, each holding a random picture over its lower-left quarter."""
    import pypdfium2 as pdfium

    rng = np.random.default_rng(seed)
    pdf = pdfium.PdfDocument.new()
    for w, h in sizes:
        page = pdf.new_page(w, h)
        picture = pdfium.PdfImage.new(pdf)
        pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        picture.set_bitmap(pdfium.PdfBitmap.from_pil(Image.fromarray(pixels)))
        picture.set_matrix(pdfium.PdfMatrix().scale(w / 2, h / 2))
        page.insert_obj(picture)
        page.gen_content()
        page.close()
    buf = io.BytesIO()
    pdf.save(buf)
    pdf.close()
    return buf.getvalue()


def text_pdf(pages: list[tuple[float, float, str | None]], *, encrypt: bool = False) -> bytes:
    """A PDF written by hand: a page per (width, height, text) in points, the text in Helvetica 12 pt.
    With `encrypt`, the trailer names a standard security handler whose user password is not empty."""
    objs: list[bytes | None] = []

    def add(body: bytes | None) -> int:
        objs.append(body)
        return len(objs)

    catalog, tree = add(None), add(None)
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for w, h, text in pages:
        content = b""
        if text:
            esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
            content = b"BT /F1 12 Tf 20 %d Td (" % max(int(h) - 30, 5) + esc + b") Tj ET"
        stream = add(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
        kids.append(add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %s %s] /Resources << /Font << /F1 %d 0 R >> >> "
                        b"/Contents %d 0 R >>" % (tree, repr(w).encode(), repr(h).encode(), font, stream)))
    objs[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % tree
    objs[tree - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    enc = add(b"<< /Filter /Standard /V 1 /R 2 /O <" + b"ab" * 32 + b"> /U <" + b"cd" * 32 + b"> /P -4 >>") if encrypt else None
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    trailer = b"/Size %d /Root %d 0 R" % (len(objs) + 1, catalog)
    if enc:
        trailer += b" /Encrypt %d 0 R /ID [<%s> <%s>]" % (enc, b"0f" * 16, b"0f" * 16)
    out += b"trailer\n<< " + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)
