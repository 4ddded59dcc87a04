"""Images: vision tower, merger, M-RoPE positions and scores equal the transformers reference."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite import ImageError, Reranker
from m0lite.images import preprocess
from m0lite.model import RaggedBatch
from m0lite.prompt import Side, build_prompt
from m0lite.rope import mrope_positions
from tests.reference import Reference

QUERY = "slm markdown"


def noise(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def images():
    # Different sizes and shapes: small (scaled up), wide, tall, and one over the 768-token cap.
    return [noise(56, 56, 0), noise(30, 40, 1), noise(300, 120, 2), noise(90, 400, 3, "L"), noise(1000, 900, 4)]


def test_vision_tower_and_merger_match(tiny_reranker, tiny_reference, images):
    feats = [preprocess(im) for im in images[:4]]
    pixels = torch.cat([p for p, _ in feats])
    grids = [g for _, g in feats]
    ref = tiny_reference.model.model.visual(pixels, grid_thw=torch.tensor(grids))
    ours_blocks = tiny_reranker.model.visual.blocks_forward(pixels, grids)
    assert torch.allclose(ours_blocks, ref.last_hidden_state, atol=1e-4)
    assert torch.allclose(tiny_reranker.model.visual.merger(ours_blocks), ref.pooler_output, atol=1e-4)


@pytest.mark.parametrize("query_type,doc_type", [("text", "image"), ("image", "text"), ("image", "image")])
def test_position_ids_match_get_rope_index(tiny_reranker, tiny_reference, images, query_type, doc_type):
    q = images[2] if query_type == "image" else QUERY
    d = images[3] if doc_type == "image" else "a text document"
    batch = tiny_reference.inputs([[q, d]], query_type=query_type, doc_type=doc_type)
    ref_pos, _ = tiny_reference.model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                           image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    sides = [Side(grid=preprocess(x)[1]) if t == "image" else Side(text=x) for x, t in ((q, query_type), (d, doc_type))]
    prompt = build_prompt(tiny_reranker.tokenizer, sides[0], sides[1], max_length=10240, max_doc_length=9728)
    assert prompt.input_ids == batch["input_ids"][0].tolist()
    assert torch.equal(mrope_positions(prompt.input_ids, prompt.grids, 151655, 2), ref_pos[:, 0])


@pytest.mark.parametrize("query_type,doc_type", [("text", "image"), ("image", "image")])
def test_forward_from_pixels_and_tokens_matches_reference(tiny_reranker, tiny_reference, images, query_type, doc_type):
    """JinaReranker.forward entered with the reference's own inputs (token ids and pixel values, one pair):
    vision tower, merger, decoder and score head in one call give the reference's raw score."""
    q = images[2] if query_type == "image" else QUERY
    inputs = tiny_reference.inputs([[q, images[3]]], query_type=query_type, doc_type=doc_type)
    ids = inputs["input_ids"][0].tolist()
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    batch = RaggedBatch.of([ids], [mrope_positions(ids, grids, 151655, 2)], [grids])
    ours = tiny_reranker.model(batch, inputs["pixel_values"])
    with torch.inference_mode():
        theirs = tiny_reference.model(**inputs)
    assert ours.tolist() == pytest.approx(theirs.float().tolist(), abs=1e-4)
    # The cached visual tokens are an override of the same computation, not another path.
    visual = tiny_reranker.model.visual(inputs["pixel_values"], grids)
    assert torch.equal(tiny_reranker.model(batch, image_embeds=visual), ours)


@pytest.mark.parametrize("query_type,doc_type", [("text", "image"), ("image", "text"), ("image", "image")])
def test_scores_match_reference(tiny_reranker, tiny_reference, images, query_type, doc_type):
    docs = images if doc_type == "image" else ["page one text", "第二页", "third page about markdown"]
    queries = images[:3] if query_type == "image" else [QUERY]
    pairs = [[q, d] for q in queries for d in docs]
    ours = tiny_reranker.compute_score(pairs, query_type=query_type, doc_type=doc_type, normalize_scores=False)
    theirs = tiny_reference.raw_scores(pairs, batch_size=1, query_type=query_type, doc_type=doc_type)
    assert ours == pytest.approx(theirs, abs=1e-4)
    # The reference's own left-padded batches agree too.
    assert ours == pytest.approx(tiny_reference.raw_scores(pairs, batch_size=4, query_type=query_type, doc_type=doc_type), abs=1e-4)


def test_mixed_rank_matches_reference(tiny_reranker, tiny_reference, images):
    docs = ["a text page", images[0], {"text": "markdown is a markup language"}, {"image": images[2]}]
    ranked = tiny_reranker.rank(QUERY, docs)
    expected = [
        tiny_reference.raw_scores([[QUERY, "a text page"]])[0],
        tiny_reference.raw_scores([[QUERY, images[0]]], doc_type="image")[0],
        tiny_reference.raw_scores([[QUERY, "markdown is a markup language"]])[0],
        tiny_reference.raw_scores([[QUERY, images[2]]], doc_type="image")[0],
    ]
    by_index = {r["index"]: r["relevance_score"] for r in ranked}
    assert [by_index[i] for i in range(4)] == pytest.approx([Reranker.normalize(s) for s in expected], abs=1e-5)
    # An image query against mixed documents.
    ranked = tiny_reranker.rank(images[1], docs[:2])
    expected = [tiny_reference.raw_scores([[images[1], "a text page"]], query_type="image")[0],
                tiny_reference.raw_scores([[images[1], images[0]]], query_type="image", doc_type="image")[0]]
    by_index = {r["index"]: r["relevance_score"] for r in ranked}
    assert [by_index[0], by_index[1]] == pytest.approx([Reranker.normalize(s) for s in expected], abs=1e-5)


def test_images_of_different_sizes_in_one_batch(tiny_reranker, images):
    pairs = [[QUERY, im] for im in images]
    together = tiny_reranker.compute_score(pairs, doc_type="image", batch_size=8, normalize_scores=False)
    alone = [tiny_reranker.compute_score(p, doc_type="image", normalize_scores=False) for p in pairs]
    assert together == pytest.approx(alone, abs=1e-5)
    saved, tiny_reranker.max_vision_patches = tiny_reranker.max_vision_patches, 1  # one image per tower pass
    try:
        one_by_one = tiny_reranker.compute_score(pairs, doc_type="image", batch_size=8, normalize_scores=False)
    finally:
        tiny_reranker.max_vision_patches = saved
    assert one_by_one == pytest.approx(alone, abs=1e-5)


def test_image_sources_are_equivalent(tiny_reranker, images, tmp_path):
    buf = io.BytesIO()
    images[2].save(buf, format="PNG")
    path = tmp_path / "page.png"
    path.write_bytes(buf.getvalue())
    b64 = base64.b64encode(buf.getvalue()).decode()
    sources = [images[2], str(path), path, b64, "data:image/png;base64," + b64, {"image": b64}]
    scores = [tiny_reranker.compute_score([QUERY, s], doc_type="image") for s in sources[:-1]]
    scores.append(tiny_reranker.rank(QUERY, [sources[-1]])[0]["relevance_score"])
    assert scores == pytest.approx([scores[0]] * len(sources), abs=1e-6)


def test_bf16_image_scores(tiny_ckpt, tiny_reranker, images):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    ref = Reference(tiny_ckpt, dtype=torch.bfloat16)
    pairs = [[QUERY, im] for im in images[:3]]
    ours = rr.compute_score(pairs, doc_type="image")
    assert ours == pytest.approx([Reranker.normalize(s) for s in ref.raw_scores(pairs, batch_size=1, doc_type="image")], abs=2e-2)
    assert ours == pytest.approx(tiny_reranker.compute_score(pairs, doc_type="image"), abs=2e-2)


def test_bad_image_names_the_document(tiny_reranker, tmp_path, images):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    notes = tmp_path / "notes.txt"
    notes.write_text("just text")
    for bad in (broken, notes, tmp_path / "missing.png", {"image": "bm90IGFuIGltYWdl"}):
        with pytest.raises(ImageError, match=r"documents\[1\]"):
            tiny_reranker.rank(QUERY, ["fine", {"image": bad} if not isinstance(bad, dict) else bad, images[0]])


def test_extreme_aspect_ratio_is_refused(tiny_reranker):
    with pytest.raises(ImageError, match="aspect ratio"):
        tiny_reranker.compute_score([QUERY, Image.new("RGB", (3000, 14))], doc_type="image")


def test_max_length_that_cuts_an_image_is_refused(tiny_reranker, images):
    with pytest.raises(Exception, match="cuts into an image"):
        tiny_reranker.compute_score([QUERY, images[4]], doc_type="image", max_length=64, max_query_length=8)
