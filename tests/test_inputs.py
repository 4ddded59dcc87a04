"""Bad input gets a clear error naming what is wrong; the CLI ranks texts, files and images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite import InputError, Reranker
from m0lite.cli import main


@pytest.mark.parametrize("call,match", [
    (lambda rr: rr.rank("", ["doc"]), "query is empty"),
    (lambda rr: rr.rank("   ", ["doc"]), "query is empty"),
    (lambda rr: rr.rank("q", []), "documents must be a non-empty list"),
    (lambda rr: rr.rank("q", "not a list"), "documents must be a non-empty list"),
    (lambda rr: rr.rank("q", ["ok", 42]), r"documents\[1\]"),
    (lambda rr: rr.rank("q", [{"text": "a", "url": "b"}]), r"documents\[0\]: a dict must be"),
    (lambda rr: rr.rank({"text": "a", "image": "b"}, ["d"]), r"query: a dict must be"),
    (lambda rr: rr.rank("q", [{"text": 5, "image": "b"}]), r"documents\[0\]\.text must be a string"),
    (lambda rr: rr.rank("q", [{"text": 5}]), r"documents\[0\] must be a string"),
    (lambda rr: rr.rank("q", ["ok"], top_n=0), "top_n must be a positive int"),
    (lambda rr: rr.rank("q", ["sneaky <|image_pad|> token"]), "reserved token"),
    (lambda rr: rr.compute_score([]), "non-empty list"),
    (lambda rr: rr.compute_score([["q", "d", "x"]]), r"pairs\[0\] must be a \[query, document\] pair"),
    (lambda rr: rr.compute_score([[None, "d"]]), r"pairs\[0\] query must be a string"),
    (lambda rr: rr.compute_score([["q", "d"]], max_doc_length=600, max_query_length=512, max_length=1000), "exceeds max_length"),
    (lambda rr: rr.compute_score([["q", "d"]], batch_size=0), "batch_size"),
    (lambda rr: rr.compute_score([["q", "d"]], doc_type="video"), "type must be 'text' or 'image'"),
    (lambda rr: rr.compute_score([["q", "d"]], max_length=1), "max_length"),
])
def test_bad_input_is_named(tiny_reranker, call, match):
    with pytest.raises(InputError, match=match):
        call(tiny_reranker)


def test_an_empty_document_is_scored(tiny_reranker):
    assert 0 < tiny_reranker.rank("q", [""])[0]["relevance_score"] < 1


def test_default_dtype_follows_the_cpu(tiny_ckpt):
    from m0lite import cpu

    rr = Reranker.from_pretrained(tiny_ckpt)
    assert rr.model.dtype == (torch.bfloat16 if cpu.native_bf16() else torch.float32)


@pytest.mark.parametrize("kw,match", [(dict(dtype="int8"), "unknown dtype"), (dict(device="tpu"), "device"),
                                      (dict(device="cuda"), "CUDA is not available")])
def test_bad_dtype_or_device(tiny_ckpt, kw, match):
    with pytest.raises(InputError, match=match):
        Reranker.from_pretrained(tiny_ckpt, **kw)


def test_cli_ranks_text_files_and_images(tiny_ckpt, tiny_reranker, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("markdown notes from a file")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "page.png")
    docs = ["literal text", str(tmp_path / "notes.txt"), str(tmp_path / "page.png")]
    assert main(["rank", "--model", str(tiny_ckpt), "--dtype", "float32", "--query", "slm markdown", "--json", *docs]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    expected = tiny_reranker.rank("slm markdown", ["literal text", "markdown notes from a file", {"image": str(tmp_path / "page.png")}])
    assert out == [pytest.approx(r) for r in expected]
    assert main(["rank", "--model", str(tiny_ckpt), "--query-image", str(tmp_path / "page.png"), "--top-n", "1", "a", "b"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "doc", "document"] and len(table) == 2


def test_cli_errors_are_one_line(tiny_ckpt, capsys):
    assert main(["rank", "--model", str(tiny_ckpt), "--query", "q"]) == 2
    assert "give at least one document" in capsys.readouterr().err
    assert main(["rank", "--model", str(tiny_ckpt), "--query", "", "doc"]) == 2
    assert "query is empty" in capsys.readouterr().err
    assert main(["rank", "--model", str(tiny_ckpt), "--query", "q", "--query-image", "x.png", "doc"]) == 2


def test_demo_runs_on_a_local_random_checkpoint(tmp_path, capsys):
    assert main(["demo", "--cache", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "small language model data extraction" in captured.out
    assert len(captured.out.splitlines()) == 6  # query line, header, four documents
