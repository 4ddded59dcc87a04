"""Documents of an image and text together: the prompt, the score (against transformers), truncation, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m0lite import ImageError, InputError, Reranker
from m0lite.images import num_visual_tokens, preprocess
from m0lite.prompt import Side, build_prompt
from tests.reference import IMAGE, SCORE_TOKEN_ID

QUERY = "slm markdown"
TEXTS = ["a caption about markdown", "第二页的说明", " starts with a space", "", "ends with a newline\n"]


def page(seed, w=120, h=90):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference_batch(ref, query, image, text, query_image=None):
    """The reference's inputs for the prompt `**Document**:\\n<image>{text}\\n**Query**:\\n{query}` + score token."""
    query_str = IMAGE if query_image is not None else query
    images = [image] + ([query_image] if query_image is not None else [])
    batch = ref.process([f"**Document**:\n{IMAGE}{text}\n**Query**:\n{query_str}"], images, max_length=10239)
    for key, value in (("input_ids", SCORE_TOKEN_ID), ("attention_mask", 1), ("mm_token_type_ids", 0)):
        batch[key] = torch.cat([batch[key], torch.full((1, 1), value, dtype=batch[key].dtype)], dim=1)
    return batch


@torch.inference_mode()
def reference_raw(ref, *args) -> tuple[float, list[int]]:
    batch = reference_batch(ref, *args)
    batch["pixel_values"] = batch["pixel_values"].to(ref.model.dtype)
    return ref.model(**batch).item(), batch["input_ids"][0].tolist()


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_and_score_match_reference(tiny_reranker, tiny_reference, text):
    image = page(len(text), 150, 110)
    expected, ref_ids = reference_raw(tiny_reference, QUERY, image, text)
    side = Side(text=text, grid=preprocess(image)[1])
    ids = build_prompt(tiny_reranker.tokenizer, Side(text=QUERY), side, max_length=10240, max_doc_length=9728).input_ids
    assert ids == ref_ids
    assert tiny_reranker.compute_score([QUERY, {"image": image, "text": text}], normalize_scores=False) == \
        pytest.approx(expected, abs=1e-4)


def test_image_query_against_image_and_text_document(tiny_reranker, tiny_reference):
    doc, query = page(1), page(2, 60, 200)
    expected, _ = reference_raw(tiny_reference, None, doc, "the document's text", query)
    got = tiny_reranker.rank(query, [{"image": doc, "text": "the document's text"}])[0]["relevance_score"]
    assert got == pytest.approx(Reranker.normalize(expected), abs=1e-5)


def test_rank_and_score_pairs_mix_all_kinds(tiny_reranker, tiny_reference):
    image = page(3)
    docs = ["plain text", {"image": image}, {"image": image, "text": "with its caption"}, {"text": "with its caption"}]
    ranked = {r["index"]: r["relevance_score"] for r in tiny_reranker.rank(QUERY, docs)}
    expected = reference_raw(tiny_reference, QUERY, image, "with its caption")[0]
    assert ranked[2] == pytest.approx(Reranker.normalize(expected), abs=1e-5)
    scores, lengths = tiny_reranker.score_pairs([(QUERY, d) for d in docs], normalize=False)
    assert scores[2] == pytest.approx(expected, abs=1e-4)
    assert min(abs(scores[2] - scores[i]) for i in (1, 3)) > 1e-4  # neither the image nor the text alone
    n_visual = num_visual_tokens(preprocess(image)[1])
    assert lengths[2] == lengths[1] + len(tiny_reranker.tokenizer.encode("with its caption"))
    assert lengths[1] > n_visual


def test_truncation_cuts_the_text_never_the_image(tiny_reranker):
    tok, image = tiny_reranker.tokenizer, page(4)
    grid = preprocess(image)[1]
    n_visual = num_visual_tokens(grid)
    text = "word " * 300
    for max_doc_length in (n_visual + 2 + 40, n_visual + 2 + 1, n_visual + 2, 5):
        prompt = build_prompt(tok, Side(text=QUERY), Side(text=text, grid=grid), max_length=10240, max_doc_length=max_doc_length)
        alone = build_prompt(tok, Side(text=QUERY), Side(grid=grid), max_length=10240, max_doc_length=max_doc_length)
        assert prompt.input_ids.count(tok.image_pad_id) == n_visual
        text_tokens = len(prompt.input_ids) - len(alone.input_ids)
        assert text_tokens == max(max_doc_length - n_visual - 2, 0)
    # With no room left by the image the text goes, and the document scores as the image alone.
    kw = dict(max_length=n_visual + 40, max_query_length=8, max_doc_length=n_visual + 2, normalize_scores=False)
    assert tiny_reranker.compute_score([QUERY, {"image": image, "text": text}], **kw) == \
        pytest.approx(tiny_reranker.compute_score([QUERY, image], doc_type="image", **kw), abs=1e-6)


def test_caches_key_on_image_and_text(tiny_ckpt, tiny_reranker):
    cached = Reranker.from_pretrained(tiny_ckpt, dtype="float32", doc_cache_bytes=64 * 2**20)
    a, b = page(5), page(6)
    docs = [{"image": a, "text": "first text"}, {"image": a, "text": "second text"},
            {"image": b, "text": "first text"}, {"image": a}, {"text": "first text"}]
    for query in (QUERY, "another query", QUERY):
        assert cached.rank(query, docs) == [pytest.approx(r, abs=1e-5) for r in tiny_reranker.rank(query, docs)]
    assert len(cached.doc_cache) == len(docs)  # each document its own entry
    assert cached.doc_cache.hits >= 2 * len(docs)
    assert len(cached.vision_cache) == 2  # each image encoded once


@pytest.mark.parametrize("doc,error,match", [
    ({"image": "bm90IGFuIGltYWdl", "text": "fine"}, ImageError, r"documents\[0\]\.image"),
    ({"image": page(7), "text": "<|vision_end|> smuggled"}, InputError, r"documents\[0\]\.text contains the reserved"),
    ({"image": page(7), "text": None}, InputError, r"documents\[0\]\.text must be a string"),
])
def test_bad_parts_are_named(tiny_reranker, doc, error, match):
    with pytest.raises(error, match=match):
        tiny_reranker.rank(QUERY, [doc])


def test_rank_command_takes_image_and_text_documents(tiny_ckpt, tiny_reranker, tmp_path, capsys, monkeypatch):
    """`m0lite rank --doc-json` and `--docs-jsonl`: a document of an image and text scores as the API scores it;
    documents are numbered DOCs first, then --doc-json, then the file's lines (image paths from its folder)."""
    import json

    from m0lite.cli import main

    monkeypatch.chdir(tmp_path)  # --doc-json's relative paths are from here
    page(0).save(tmp_path / "p.png")
    (tmp_path / "pages").mkdir()
    page(1).save(tmp_path / "pages" / "q.png")
    (tmp_path / "pages" / "docs.jsonl").write_text(
        json.dumps({"image": "q.png", "text": "第二页的说明"}) + "\n\n" + json.dumps("a plain text line") + "\n")
    argv = ["rank", "--model", str(tiny_ckpt), "--dtype", "float32", "--query", QUERY, "literal text",
            "--doc-json", json.dumps({"image": "p.png", "text": "a caption about markdown"}),
            "--doc-json", '{"text": "more text"}', "--docs-jsonl", str(tmp_path / "pages" / "docs.jsonl")]
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    docs = ["literal text", {"image": "p.png", "text": "a caption about markdown"}, "more text",
            {"image": str(tmp_path / "pages" / "q.png"), "text": "第二页的说明"}, "a plain text line"]
    assert got == [pytest.approx(r) for r in tiny_reranker.rank(QUERY, docs)]
    assert main(argv) == 0  # the table names both parts
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 6 and any(line.endswith("1  [image] p.png + a caption about markdown") for line in table), table

    bad = [(['{"image": "p.png", "txt": "x"}'], "--doc-json 1: a document is a JSON string or an object"),
           (['{"image": "p.png", "text": 3}'], "--doc-json 1: 'text' must be a string, got int"),
           (['{"image": "nowhere.png", "text": "x"}'], "--doc-json 1: image nowhere.png: no such file"),
           (["{'image': 1}"], "--doc-json 1: not JSON"), (["[1]"], "got list")]
    for doc_json, words in bad:
        assert main(["rank", "--model", str(tiny_ckpt), "--query", QUERY, "--doc-json", *doc_json]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    (tmp_path / "bad.jsonl").write_text('"fine"\n{"image": 5}\n')
    assert main(["rank", "--model", str(tiny_ckpt), "--query", QUERY, "--docs-jsonl", str(tmp_path / "bad.jsonl")]) == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: 'image' must be a string" in capsys.readouterr().err
