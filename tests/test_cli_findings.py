"""The command line's small findings: `demo --json` is JSON only, a mistyped image file is an error,
and `serve` says when its checkpoint holds random weights."""

from __future__ import annotations

import json
import shutil

from m0lite.cli import document_arg, main


def test_demo_json_is_one_json_document(tmp_path, capsys):
    assert main(["demo", "--cache", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # fails on any line printed before the JSON
    assert out["query"] == "small language model data extraction" and len(out["results"]) == 4


def test_rank_refuses_a_missing_image_file(tiny_ckpt, tmp_path, capsys):
    assert main(["rank", "--model", str(tiny_ckpt), "--query", "q", "a text", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err and "Traceback" not in err
    assert document_arg("see figure.png for details") == {"text": "see figure.png for details"}
    assert document_arg("release-notes") == {"text": "release-notes"}
    assert main(["rank", "--model", str(tiny_ckpt), "--query", "q", "http://[::1"]) == 2
    assert "malformed URL" in capsys.readouterr().err


def test_serve_knows_a_random_checkpoint(tiny_ckpt, tiny_reranker, tmp_path):
    from m0lite.server.settings import random_weights_reason

    assert "marks it as random weights" in random_weights_reason(tiny_reranker, tiny_ckpt)  # its writer marks it
    unmarked = tmp_path / "unmarked"
    shutil.copytree(tiny_ckpt, unmarked)
    config = json.loads((unmarked / "config.json").read_text())
    assert config.pop("m0lite_random_weights") is True
    (unmarked / "config.json").write_text(json.dumps(config))
    assert "not jina-reranker-m0's" in random_weights_reason(tiny_reranker, unmarked)  # known by its dimensions
