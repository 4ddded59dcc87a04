"""The CPU as one fact (m0lite/cpu.py): a mask makes a richer CPU behave as a poorer one, down to oneDNN's
arithmetic, and bf16 asked for where it is emulated runs with a warning that says what to use instead."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from m0lite import Reranker, cpu
from m0lite.reranker import EmulatedBF16Warning, resolve_dtype

PROBE = """
import json, os, torch
from m0lite import cpu
from m0lite.reranker import resolve_dtype
from m0lite.transforms import int8, packable
print(json.dumps({"flags": sorted(cpu.flags()), "native_bf16": cpu.native_bf16(),
                  "dtype": str(resolve_dtype(None, torch.device("cpu"))),
                  "packable": packable(torch.device("cpu"), torch.bfloat16),
                  "onednn": os.environ.get("ONEDNN_MAX_CPU_ISA"), "bits": int8.activation_bits(),
                  "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def probe(level):
    env = {k: v for k, v in os.environ.items() if k not in cpu.CAPS}
    env["M0LITE_CPU_ISA"] = level
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("level", ["avx2", "avx512"])
def test_mask_reaches_every_choice_and_onednn(level):
    native = probe("native")
    masked = probe(level)
    dropped = cpu.LEVELS[level][0]
    assert not any(f.startswith(dropped) for f in masked["flags"])
    assert set(masked["flags"]) <= set(native["flags"])
    assert masked["native_bf16"] is False and masked["dtype"] == "torch.float32" and masked["packable"] is False
    assert masked["onednn"] == cpu.LEVELS[level][1]
    order = ["DEFAULT", "AVX2", "AVX512"]  # torch's own kernels: the level's, or the CPU's where it has less
    if native["aten"] in order:
        assert masked["aten"] == order[min(order.index(native["aten"]), order.index(cpu.LEVELS[level][3].upper()))]
    if "avx2" in native["flags"] and masked["bits"] is not None:
        # Measured, not read from flags: oneDNN held to a level without VNNI saturates full-range u8 x s8
        # products (int8.activation_bits), so the cap really reached its arithmetic.
        assert masked["bits"] == 7


def test_unknown_level_is_refused(monkeypatch):
    monkeypatch.setenv("M0LITE_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="M0LITE_CPU_ISA must be one of avx2, avx512 or native"):
        cpu.level()


def test_bf16_where_emulated_warns_and_runs(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    with pytest.warns(EmulatedBF16Warning, match=r"without native bf16 \(avx512_bf16 or amx_bf16 missing.*Use float32"):
        rr = Reranker.from_pretrained(tiny_ckpt, dtype="bfloat16")
    assert rr.model.dtype == torch.bfloat16 and len(rr.compute_score([["q", "a document"]] * 2)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype(None, torch.device("cpu")) == torch.float32  # the default never warns
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
