"""A least-recently-used cache bounded by the bytes of the tensors it holds.

m0lite keeps two: the visual tokens of each image (keyed by a hash of its
preprocessed pixels, so the same page is encoded once) and the decoder's keys
and values of each document prompt prefix (so rescoring a known document
against a new query costs only the query's tokens). Both are exact: an entry is
what the uncached computation produces for the same input.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")


class TensorLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            t = self._items.get(key)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: bytes, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: not kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.numel() * old.element_size()
            self._items[key] = t
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def tensor_key(*parts) -> bytes:
    """A digest of tensors, ints and strings (content, shape and dtype of each tensor)."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(f"{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(repr(p).encode())
    return h.digest()


def through_cache(items: Sequence[T], key: Callable[[T], Hashable], cache: TensorLRU | None,
                  compute: Callable[[list[T]], list[torch.Tensor]]) -> list[torch.Tensor]:
    """The tensor of each item, in order: from the cache, else from one `compute` call over the distinct
    missing items (an item that appears twice is computed once), which then fills the cache."""
    found = {}
    for it in items:
        k = key(it)
        if k not in found and cache is not None and (hit := cache.get(k)) is not None:
            found[k] = hit
    todo = list({key(it): it for it in items if key(it) not in found}.values())
    if todo:
        for it, t in zip(todo, compute(todo)):
            found[key(it)] = t
            if cache is not None:
                cache.put(key(it), t)
    return [found[key(it)] for it in items]
