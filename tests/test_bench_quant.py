"""bench/bench_quant.py: its fidelity numbers are what they say (checked on a tiny checkpoint)."""

import pytest

from bench import bench_quant


def test_spearman():
    assert bench_quant.spearman([0.1, 0.5, 0.9, 0.3], [1, 5, 9, 3]) == 1
    assert bench_quant.spearman([0.1, 0.5, 0.9], [3, 2, 1]) == -1
    assert bench_quant.spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(0.8)


def test_fidelity_on_a_tiny_checkpoint(tiny_ckpt):
    fid = bench_quant.fidelity(tiny_ckpt, n_queries=3)
    assert fid["queries"] == 3 and fid["documents"] == bench_quant.TEXT_DOCS + len(bench_quant.IMAGE_SIZES)
    assert 0 < fid["mean_abs_d"] <= fid["max_abs_d"] < 0.03
    assert -1 <= fid["spearman_min"] <= fid["spearman_mean"] <= 1 and 0 <= fid["top1_agreement"] <= 1
    assert max(fid["max_abs_d_text"], fid["max_abs_d_image"]) == fid["max_abs_d"]
