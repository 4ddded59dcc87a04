"""Whole-model parity with the Triton kernels forced: on CUDA where there is a GPU, else under Triton's
interpreter on CPU.

The interpreter is chosen when the kernels are first imported, so the Triton-path
model runs in a subprocess (started with TRITON_INTERPRET=1 on a CPU) with M0LITE_KERNELS=triton;
its scores are compared here with the transformers reference on the same file. A second query over the
same documents runs from the document cache (attention over cached prefixes) and must give the scores
the model gives without the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUERY = "slm markdown"
DOCS = ["ReaderLM-v2 converts HTML to markdown.", "数据提取么？为什么不用正则啊", "Die Datenextraktion 🦊"]

WORKER = """
import json, sys, torch
from m0lite.kernels import ops
from m0lite import Reranker
calls = []
for name in ("attention_triton", "attention_with_past_triton", "rms_norm_triton"):
    fn = getattr(ops, name)
    setattr(ops, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
device = "cuda" if torch.cuda.is_available() else "cpu"
rr = Reranker.from_pretrained(sys.argv[1], device=device, dtype="float32", doc_cache_bytes=2**24)
query, docs, image = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
text = rr.compute_score([[query, d] for d in docs], normalize_scores=False)
img = rr.compute_score([[query, image]], doc_type="image", normalize_scores=False)
again = [[query + " again", d] for d in docs]
cached = rr.compute_score(again, normalize_scores=False)  # the documents' keys/values from the cache
uncached = Reranker.from_pretrained(sys.argv[1], device=device, dtype="float32").compute_score(again, normalize_scores=False)
print(json.dumps({"text": text, "image": img, "cached": cached, "uncached": uncached, "device": device,
                  "calls": sorted(set(calls))}))
"""


def test_triton_path_matches_reference(tiny_ckpt, tiny_reference, tmp_path):
    image = tmp_path / "page.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(image)
    env = {**os.environ, "M0LITE_KERNELS": "triton", "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tiny_ckpt), QUERY, json.dumps(DOCS), str(image)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["calls"] == ["attention_triton", "attention_with_past_triton", "rms_norm_triton"], \
        "the Triton kernels must actually run"
    assert out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert out["cached"] == pytest.approx(out["uncached"], abs=1e-5)
    assert out["text"] == pytest.approx(tiny_reference.raw_scores([[QUERY, d] for d in DOCS], batch_size=1), abs=1e-4)
    assert out["image"] == pytest.approx(tiny_reference.raw_scores([[QUERY, str(image)]], doc_type="image"), abs=1e-4)
