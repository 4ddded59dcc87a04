"""Shared fixtures: tiny random checkpoints in the published layout, written once per test session."""

from __future__ import annotations

import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.manual_seed(0)


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
