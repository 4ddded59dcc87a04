"""bench/bench_blocks.py runs on a tiny checkpoint and times every matmul its blocks run."""

import csv

import torch

from bench import bench_blocks
from m0lite import Reranker
from m0lite.transforms import chunked
from m0lite.transforms.epilogue import EpilogueLinear, PlainLinear


def test_matmul_calls_cover_every_linear_of_a_block(tiny_ckpt):
    # The "matmuls" stage must time exactly the block's own linear layers, each once, with a method
    # the block calls: if a block gains or loses a linear, the breakdown would silently drift.
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    for tower in (rr.model.model, rr.model.visual):
        chunked.apply(tower, PlainLinear)
    for block in (rr.model.model.layers[0], rr.model.visual.blocks[0]):
        timed = [lin for half in bench_blocks.matmul_calls(block) for lin, _ in half]
        assert len(timed) == len(set(timed))
        assert set(timed) == {m for m in block.modules() if isinstance(m, EpilogueLinear)}
        assert all(hasattr(EpilogueLinear, method) for half in bench_blocks.matmul_calls(block) for _, method in half)


def test_bench_blocks_runs(tiny_ckpt, tmp_path, capsys):
    bench_blocks.main(["--ckpt", str(tiny_ckpt), "--rounds", "3", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "decoder layer 1, text8" in out and "vision block 1, image4" in out
    rows = list(csv.DictReader(open(next(tmp_path.glob("blocks-*.csv")))))
    assert {r["stage"] for r in rows} == {"whole", "attention", "matmuls", "rest"}
    assert len(rows) == 3 * 4
    assert all(float(r["median_ms"]) > 0 for r in rows if r["stage"] != "rest")
