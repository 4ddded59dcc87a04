"""PDFs rendered for the server in a worker process that can die alone.

PDFium is native code fed untrusted bytes: a file crafted to crash it, or to
loop, must not take the server down. So the server never opens a PDF itself; a
long-lived worker process (spawned, not forked: the server has threads) renders
one PDF at a time with m0lite/pdf.py and sends back each page's pixels (at the
model's size, about 1.8 MB a page) and text. A worker that dies, or runs past
the timeout and is killed, becomes a `PdfError` naming the document (422), and
the next PDF gets a fresh worker.
"""

from __future__ import annotations

import multiprocessing
import threading

from PIL import Image

from m0lite.errors import PdfError, PdfTooLargeError
from m0lite.pdf import Page, render_pages


def _serve(conn) -> None:
    """The worker's loop: (data, name, pages, options) in, ("ok", pages) or ("error", kind, message) out."""
    while True:
        try:
            data, name, pages, options = conn.recv()
        except EOFError:
            return
        try:
            out = [(p.number, p.image.size, p.image.tobytes(), p.text)
                   for p in render_pages(data, name, pages, **options)]
            conn.send(("ok", out))
        except PdfTooLargeError as e:
            conn.send(("error", "too large", str(e)))
        except PdfError as e:
            conn.send(("error", "bad", str(e)))
        except Exception as e:  # noqa: BLE001 - anything else PDFium's bindings raise is still this file's fault
            conn.send(("error", "bad", f"{name}: cannot be rendered ({type(e).__name__})"))


class PdfRenderer:
    """Renders whole PDFs (the pages asked for) in one worker process, one PDF at a time."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._proc = self._conn = None
        self.restarts = 0  # workers lost to a file (died, or killed past the timeout)

    def render(self, data: bytes, name: str, pages, **options) -> list[Page]:
        with self._lock:
            conn = self._worker()
            try:
                conn.send((data, name, pages, options))
                ready = conn.poll(self.timeout)
                reply = conn.recv() if ready else None
            except (EOFError, OSError):
                self.close()
                self.restarts += 1
                raise PdfError(f"{name}: the PDF renderer died on this file (a malformed PDF)") from None
            if reply is None:
                self.close()
                self.restarts += 1
                raise PdfError(f"{name}: not rendered within {self.timeout:g} s (--pdf-timeout)")
        if reply[0] == "error":
            raise (PdfTooLargeError if reply[1] == "too large" else PdfError)(reply[2])
        return [Page(n, Image.frombytes("RGB", size, raw), text) for n, size, raw, text in reply[1]]

    def _worker(self):
        if self._proc is None or not self._proc.is_alive():
            self.close()
            ctx = multiprocessing.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(child,), name="m0lite-pdf", daemon=True)
            self._proc.start()
            child.close()
        return self._conn

    def close(self) -> None:
        """Stop the worker (killed: it may be stuck in native code)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
            self._conn.close()
        self._proc = self._conn = None
