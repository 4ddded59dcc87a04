"""compile=True (torch.compile of the blocks, CPU) gives the same scores as the eager model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m0lite import InputError, Reranker


def test_compiled_blocks_give_the_same_scores(tiny_ckpt, tiny_reranker):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype="float32", compile=True, doc_cache_bytes=2**20)
    page = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8))
    docs = ["a short text", "数据提取 " * 40, page]
    for query in ("slm markdown", "a different, longer query about pages", page):  # new shapes each time
        assert rr.rank(query, docs) == [pytest.approx(r, abs=1e-5) for r in tiny_reranker.rank(query, docs)]


def test_compile_is_cpu_only(tiny_ckpt, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InputError, match="CPU path"):
        Reranker.from_pretrained(tiny_ckpt, device="cuda", compile=True)
