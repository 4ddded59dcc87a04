"""`m0lite explain` and its pictures: the heatmap puts each region's colour on that region of the page."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from m0lite.cli import main
from m0lite.explain_render import colour, render

QUERY = "slm markdown"


def test_heatmap_colours_each_region_where_it_lies(tiny_reranker):
    page = Image.new("RGB", (300, 200), (128, 128, 128))  # plain grey: only the heatmap tints it
    out = tiny_reranker.explain(QUERY, {"image": page, "text": "a caption"}, method="occlusion")
    fig = render(out, QUERY, image=page, text="a caption")
    x0, y0, x1, y1 = fig.page_box
    assert (x1 - x0, y1 - y0) == (round(300 * fig.scale), round(200 * fig.scale))
    assert fig.image.width > x1 and fig.image.height > y1  # colour bar to the right, text below
    pixels = np.asarray(fig.image).astype(int)
    redness = []
    for r in out["image"]["regions"]:
        bx0, by0, bx1, by1 = r["box"]
        cx, cy = x0 + (bx0 + bx1) / 2 * fig.scale, y0 + (by0 + by1) / 2 * fig.scale
        red, _, blue = pixels[int(cy), int(cx)]
        redness.append(red - blue)  # grows with the region's score: red above zero, blue below
    scores = [r["score"] for r in out["image"]["regions"]]
    # The hottest region is drawn reddest, the coldest bluest, and the tint follows the score in between
    # (ties allowed: colours are 8-bit).
    assert redness[int(np.argmax(scores))] == max(redness)
    assert redness[int(np.argmin(scores))] == min(redness)
    by_score = [redness[i] for i in np.argsort(scores)]
    assert all(a <= b for a, b in zip(by_score, by_score[1:]))


def test_highlighted_text_uses_the_scale(tiny_reranker):
    text = "markdown tables and gold rush miners"
    out = tiny_reranker.explain(QUERY, text)
    fig = render(out, QUERY, text=text)
    assert fig.page_box is None  # no image: no page, no colour bar
    strongest = max(out["text"], key=lambda t: abs(t["score"]))
    full = colour(1.0 if strongest["score"] > 0 else -1.0)  # the strongest token takes the scale's end
    assert (np.asarray(fig.image) == full).all(-1).any()
    many = "markdown\ntables and\ngold " * 12
    lines = render(tiny_reranker.explain(QUERY, many, method="attention"), QUERY, text=many)  # breaks and wraps: taller
    assert lines.image.height > fig.image.height


def test_cli_explain_writes_json_and_png(tiny_ckpt, tiny_reranker, tmp_path, capsys):
    page = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    path = tmp_path / "page.png"
    page.save(path)
    png = tmp_path / "explain.png"
    args = ["explain", "--model", str(tiny_ckpt), "--dtype", "float32", "--query", QUERY, str(path), "--text", "its caption"]
    assert main(args + ["--json", "--out", str(png), "--method", "attention"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = tiny_reranker.explain(QUERY, {"image": page, "text": "its caption"}, method="attention")
    assert out["raw_score"] == pytest.approx(expected["raw_score"], abs=1e-5)
    assert [r["score"] for r in out["image"]["regions"]] == pytest.approx([r["score"] for r in expected["image"]["regions"]], abs=1e-6)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 640 and im.height > 384
    assert main(args) == 0
    assert "score" in capsys.readouterr().out
    assert main(["explain", "--model", str(tiny_ckpt), "--query", QUERY, "just text", "--text", "more"]) == 2
    assert "--text goes with an image DOC" in capsys.readouterr().err
