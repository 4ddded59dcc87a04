"""Keeping the server's memory bounded: a budget for images being decoded, and memory handed back.

A decoded image is large (width x height x 4 bytes in Pillow, more while it is
converted), the resized one the model takes is small (at most max_pixels x 3
bytes). So images are decoded under `ImageBudget`, a byte budget shared by all
requests, and resized at once; only the small image waits for its pass.

glibc keeps freed memory in its heaps, and large blocks freed by one thread
often stay resident (the dynamic mmap threshold grows after each free, so the
next large block comes from a heap). `limit_heap_growth` pins the threshold so
that large blocks are mapped and unmapped, and `trim` returns what the heaps
hold free to the operating system, once the queue is empty.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from ..memory import libc, trim_heap

log = logging.getLogger("m0lite.server")

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20  # blocks from this size up are mapped on their own, and unmapped when freed


def limit_heap_growth() -> bool:
    """Pin glibc's mmap threshold (see the module docstring); False where there is no glibc."""
    if libc() is None:
        return False
    return bool(libc().mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class Trimmer:
    """`malloc_trim(0)` after work, at most once a `min_interval_s`: returns freed heap memory."""

    def __init__(self, min_interval_s: float = 0.5):
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self.trims = 0

    def __call__(self) -> bool:
        """Trim now, or return False when the last trim was too recent (the caller tries again)."""
        if libc() is None:
            return True
        if time.monotonic() - self._last < self.min_interval_s:
            return False
        trim_heap()
        self._last = time.monotonic()
        self.trims += 1
        return True


def decode_cost(width: int, height: int) -> int:
    """Bytes an image takes while it is decoded and resized: Pillow holds 4 bytes a pixel, and a
    conversion (palette or greyscale to RGB, EXIF rotation) holds a second copy for a moment."""
    return 8 * width * height


class ImageBudget:
    """A byte budget for images being decoded, shared by all requests' loader threads.

    `hold(n)` waits until n bytes fit (an image larger than the whole budget waits until nothing
    else is held, then goes alone), so decoded pixels in memory stay under `max_bytes` plus one image.
    """

    def __init__(self, max_bytes: int, on_change=None):
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._on_change = on_change

    @contextlib.contextmanager
    def hold(self, n: int, timeout: float | None = None):
        with self._cond:
            if not self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.max_bytes, timeout):
                raise TimeoutError("image memory budget busy")
            self.used += n
            self.peak = max(self.peak, self.used)
            self._changed()
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._changed()
                self._cond.notify_all()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.used)
