"""Shared fixtures: tiny random checkpoints in the published layout, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.manual_seed(0)

# The modules whose outcome depends on what the CPU can do (dtype, packing, int8 width). `.ci/run` runs them a
# second time as an AVX2-only CPU (M0LITE_CPU_ISA=avx2, see m0lite/cpu.py), whatever machine CI lands on.
CPU_DEPENDENT = {"test_int8", "test_fast_path", "test_bench_blocks", "test_bench_quant", "test_compile", "test_inputs",
                 "test_weights", "test_explain", "test_text_parity", "test_image_parity", "test_cpu"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in CPU_DEPENDENT:
            item.add_marker(pytest.mark.cpu)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The default tiny config (GQA 4/2, 2 layers, mrope [2, 3, 3], a 2-block vision tower), fp32."""
    from m0lite.fixtures.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_reference(tiny_ckpt):
    from tests.reference import Reference

    return Reference(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_reranker(tiny_ckpt):
    from m0lite import Reranker

    return Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
