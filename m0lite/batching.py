"""From prompts to what the model runs: sequences with their M-RoPE positions, grouped into ragged batches.

A pair's prompt (prompt.py) becomes one `Sequence`: its token ids, its (3, tokens)
positions and its images. With the document cache on, a sequence whose document
part can be split off carries that part as its `Prefix`, and only the rest runs
with the prefix's cached keys and values. Sequences are grouped under a token
budget (`budget_groups`), and a group becomes one `RaggedBatch` (model.py): no
padding, so a score never depends on the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caches import tensor_key
from .model import RaggedBatch
from .prompt import Prompt, Side
from .rope import mrope_positions


@dataclass
class Prepared:
    """One side of a pair, ready for the model: text, or an image's patches and grid."""

    side: Side
    pixels: torch.Tensor | None = None
    size: tuple[int, int] | None = None  # an image's (width, height) as decoded, before resizing (explain's boxes)
    _key: bytes | None = None

    @property
    def key(self) -> bytes:
        """Digest of the image's pixels and grid: the visual-token cache's key."""
        if self._key is None:
            self._key = tensor_key(self.pixels, self.side.grid)
        return self._key


@dataclass
class Prefix:
    """A document part ("**Document**:\n{doc}\n**Query**:\n") whose keys/values the document cache holds."""

    key: bytes  # digest of its token ids and its image's pixels
    ids: list[int]
    positions: torch.Tensor
    images: list[Prepared]


@dataclass
class Sequence:
    """What one pair runs through the decoder: its whole prompt, or the rest after a cached prefix."""

    ids: list[int]
    positions: torch.Tensor  # (3, len(ids)) M-RoPE positions, counted from the prompt's start
    images: list[Prepared]  # the images among ids, in order
    prefix: Prefix | None = None


def budget_groups(sizes: list[int], max_items: int, max_total: int):
    """Consecutive indices in groups of at most max_items and a total size of at most max_total
    (an item larger than max_total goes alone)."""
    group, total = [], 0
    for i, n in enumerate(sizes):
        if group and (len(group) == max_items or total + n > max_total):
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def sequence(prompt: Prompt, images: list[Prepared], doc_is_image: bool, image_token_id: int, merge: int) -> Sequence:
    """The whole prompt, or, when its document part can be cached (prompt.prefix_len), that part and the rest.
    `images`: the pair's images in prompt order (the document's first)."""
    pos = mrope_positions(prompt.input_ids, prompt.grids, image_token_id, merge)
    n = prompt.prefix_len
    if not n:
        return Sequence(prompt.input_ids, pos, images)
    doc_images = images[:1] if doc_is_image else []
    key = tensor_key(prompt.input_ids[:n], *[im.key for im in doc_images])
    prefix = Prefix(key, prompt.input_ids[:n], pos[:, :n], doc_images)
    return Sequence(prompt.input_ids[n:], pos[:, n:], images[len(doc_images):], prefix)


def ragged(parts: list[Sequence] | list[Prefix]) -> RaggedBatch:
    """Sequences (or prefixes) side by side in one batch."""
    return RaggedBatch.of([p.ids for p in parts], [p.positions for p in parts], [[im.side.grid for im in p.images] for p in parts])
