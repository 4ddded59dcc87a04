"""The parts of bench/llama_cpp_side.py that need no llama.cpp: m0lite's token ids for a workload, and the
checkpoint's score head applied outside the model, which is how the llama.cpp side's last-token states
become scores. If these hold, a score difference against llama.cpp is llama.cpp's."""

import pytest
import torch

from bench.e2e_worker import make_workload
from bench.llama_cpp_side import prompt_ids, score_head
from m0lite import Reranker
from m0lite.model import RaggedBatch


def test_the_score_head_outside_gives_compute_scores_raw_scores(tiny_ckpt):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    _, runs = prompt_ids(tiny_ckpt, "text8", [100])
    ids = runs[0][:3]
    assert all(len(p) == len(ids[0]) > 256 for p in ids)  # 256-token documents, the query and the score token
    # Text only: the three M-RoPE components are the token's index, as plain RoPE's position.
    batch = RaggedBatch.of(ids, [torch.arange(len(p)).expand(3, -1) for p in ids], [[] for _ in ids])
    states = rr.model.model(*rr.model.inputs(batch, None))  # final-norm last-token states: llama.cpp's pooling LAST
    pairs = make_workload("text8", tiny_ckpt, False, 100)[0][:3]
    assert score_head(tiny_ckpt)(states.tolist()) == pytest.approx(rr.compute_score(pairs, normalize_scores=False), abs=1e-5)
