"""Text reranking: token ids and scores equal the transformers reference, on several tiny configs."""

from __future__ import annotations

import random

import pytest
import torch

from m0lite import Reranker
from m0lite.config import ModelConfig, TextConfig, VisionConfig
from m0lite.prompt import Side, build_prompt
from tests.reference import Reference
from m0lite.fixtures.random_checkpoint import TINY_CONFIG, write_random_checkpoint

QUERY = "small language model data extraction"
DOCS = [
    "ReaderLM-v2 is a 1.5B language model that converts raw HTML into markdown or JSON.",
    "数据提取是从非结构化文本中获取结构化信息的过程。小型语言模型也能做到。",
    "Die Datenextraktion mit kleinen Sprachmodellen ist schnell und günstig.",
    "استخراج البيانات باستخدام نماذج لغوية صغيرة",
    "Emoji party 🎉🦊👩‍💻 with flags 🇩🇪🇯🇵 and accents: café naïve",
    "def extract(html: str) -> dict:\n\treturn {'title': html.split('<title>')[1]}\r\n",
    "",
    "   lots   of    spaces\n\n\nand newlines   ",
]
LONG_DOC = " ".join(f"token{i} 数据 word" for i in range(300))

CONFIGS = {
    "tiny": TINY_CONFIG,
    # GQA group of 3 (not a power of two), 3 layers, other mrope sections.
    "gqa3": ModelConfig(
        text=TextConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=2, mrope_section=[4, 2, 2]),
        vision=VisionConfig(depth=1, embed_dim=32, hidden_size=96, num_heads=2),
    ),
    # Plain multi-head attention (no GQA), one layer.
    "mha": ModelConfig(
        text=TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, mrope_section=[8, 4, 4]),
        vision=VisionConfig(depth=1, embed_dim=48, hidden_size=64, num_heads=3),
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair_of_models(request, tmp_path_factory):
    folder = write_random_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=1)
    return Reranker.from_pretrained(folder, dtype="float32"), Reference(folder)


def prompt_ids(rr: Reranker, query: str, doc: str, max_length=10240, max_query_length=512, max_doc_length=None):
    if max_doc_length is None:
        max_doc_length = max(max_length - max_query_length, max_query_length)
    return build_prompt(rr.tokenizer, Side(text=query), Side(text=doc), max_length=max_length, max_doc_length=max_doc_length).input_ids


def test_scores_match_reference_fp32(pair_of_models):
    rr, ref = pair_of_models
    pairs = [[QUERY, d] for d in DOCS] + [["数据提取", DOCS[0]], ["🦊?", DOCS[4]]]
    ours = rr.compute_score(pairs, normalize_scores=False)
    theirs = ref.raw_scores(pairs, batch_size=1)
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert max(ours) - min(ours) > 1e-3, "scores should differ between documents"


@pytest.mark.parametrize("kw", [
    dict(max_doc_length=40, max_query_length=8, max_length=200),  # a long document cut and decoded back
    dict(max_length=30),  # the whole prompt cut at max_length - 1
    dict(max_query_length=4, max_length=600),  # a query longer than max_query_length is not cut
])
def test_truncation_matches_reference(pair_of_models, kw):
    rr, ref = pair_of_models
    pairs = [[QUERY + " and a much longer query text that keeps going", LONG_DOC], [QUERY, DOCS[1] * 20]]
    for p in pairs:
        assert prompt_ids(rr, *p, **kw) == ref.token_ids(p, **kw)
    assert rr.compute_score(pairs, normalize_scores=False, **kw) == pytest.approx(ref.raw_scores(pairs, batch_size=1, **kw), abs=1e-4)


def test_token_ids_match_reference(tiny_reranker, tiny_reference):
    for doc in DOCS + [LONG_DOC]:
        assert prompt_ids(tiny_reranker, QUERY, doc) == tiny_reference.token_ids([QUERY, doc])


def test_left_padded_reference_batches_agree(tiny_reranker, tiny_reference):
    """The original scores left-padded batches of 8; packing gives the same numbers."""
    pairs = [[QUERY, d] for d in DOCS]
    assert tiny_reranker.compute_score(pairs, normalize_scores=False) == pytest.approx(tiny_reference.raw_scores(pairs, batch_size=8), abs=1e-4)


def test_batching_and_order_do_not_change_scores(tiny_reranker):
    pairs = [[QUERY, d] for d in DOCS + [LONG_DOC]]
    alone = [tiny_reranker.compute_score(p, normalize_scores=False) for p in pairs]
    for bs in (1, 3, 8, 64):
        assert tiny_reranker.compute_score(pairs, batch_size=bs, normalize_scores=False) == pytest.approx(alone, abs=1e-5)
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    shuffled = tiny_reranker.compute_score([pairs[i] for i in order], normalize_scores=False)
    assert shuffled == pytest.approx([alone[i] for i in order], abs=1e-5)
    tiny_reranker.max_batch_tokens, saved = 50, tiny_reranker.max_batch_tokens  # forces many small batches
    try:
        assert tiny_reranker.compute_score(pairs, normalize_scores=False) == pytest.approx(alone, abs=1e-5)
    finally:
        tiny_reranker.max_batch_tokens = saved


def test_normalised_score_and_return_types(tiny_reranker):
    raw = tiny_reranker.compute_score([QUERY, DOCS[0]], normalize_scores=False)
    norm = tiny_reranker.compute_score([QUERY, DOCS[0]])
    assert isinstance(raw, float) and isinstance(norm, float)
    assert norm == pytest.approx(1 / (1 + torch.exp(torch.tensor(-(raw - 2.65))).item()), abs=1e-7)
    many = tiny_reranker.compute_score([[QUERY, DOCS[0]], [QUERY, DOCS[1]]])
    assert isinstance(many, list) and len(many) == 2 and many[0] == pytest.approx(norm, abs=1e-6)


def test_rank_orders_best_first(tiny_reranker):
    scores = tiny_reranker.compute_score([[QUERY, d] for d in DOCS])
    ranked = tiny_reranker.rank(QUERY, DOCS, return_documents=True)
    assert [r["index"] for r in ranked] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert [r["relevance_score"] for r in ranked] == pytest.approx(sorted(scores, reverse=True), abs=1e-6)
    assert all(r["document"] == DOCS[r["index"]] for r in ranked)
    top = tiny_reranker.rank(QUERY, DOCS, top_n=3)
    assert [r["index"] for r in top] == [r["index"] for r in ranked[:3]] and "document" not in top[0]
    assert [r["index"] for r in tiny_reranker.rank({"text": QUERY}, [{"text": d} for d in DOCS])] == [r["index"] for r in ranked]


def test_bf16_within_tolerance(tiny_ckpt, tiny_reference):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype="bfloat16")
    ref = Reference(tiny_ckpt, dtype=torch.bfloat16)
    pairs = [[QUERY, d] for d in DOCS]
    ours = rr.compute_score(pairs)
    assert ours == pytest.approx([Reranker.normalize(s) for s in ref.raw_scores(pairs, batch_size=1)], abs=2e-2)
    assert ours == pytest.approx(Reranker.from_pretrained(tiny_ckpt, dtype="float32").compute_score(pairs), abs=2e-2)
