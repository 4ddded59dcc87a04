"""The CPU fast path (m0lite/transforms): packed weights with fused epilogues, row-wise chunks, the vision
rewrites, and giving mapped pages back."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from m0lite import InputError, Reranker, memory
from m0lite.context import Context
from m0lite.transforms import chunked, onednn, pack_weights, packable
from m0lite.transforms.chunked import (ROW_MULTIPLE, FastDecoderLayer, FastVisionBlock, apply_rotary_pairs, pair_order,
                                      rowwise)
from m0lite.transforms.epilogue import PlainLinear
from m0lite.transforms.onednn import CHUNK_ROWS, OneDNNLinear
from m0lite.weights.safetensors_mmap import read_tensors
from tests.reference import Reference

needs_packing = pytest.mark.skipif(not packable(torch.device("cpu"), torch.bfloat16),
                                   reason="this CPU has no native bf16 for oneDNN (packing is off here, as in use)")
QUERY = "small language model data extraction"
DOCS = ["ReaderLM-v2 converts raw HTML into markdown.", "数据提取是从非结构化文本中获取结构化信息的过程。",
        " ".join(f"token{i} 数据 word" for i in range(200))]  # the last is longer than one 256-row chunk


def _linear(n_in, n_out, bias, dtype):
    lin = torch.nn.Linear(n_in, n_out, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, n_in**-0.5)
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_unpacked_methods_are_the_plain_math(bias):
    plain = _linear(48, 80, bias, torch.float32)
    lin = PlainLinear(plain)
    x, other = torch.randn(7, 48), torch.randn(7, 80)
    y = F.linear(x, plain.weight, plain.bias)
    assert torch.equal(lin(x), y)
    assert torch.equal(lin.silu(x), F.silu(y))
    assert torch.equal(lin.mul(x, other), y * other)
    assert torch.equal(lin.add(x, other), other + y)


@needs_packing
@pytest.mark.parametrize("rows", [0, 1, 5, 256, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_methods_match_within_bf16_rounding(rows, bias):
    orig = _linear(96, 160, bias, torch.bfloat16)
    lin = PlainLinear(orig)
    x, other = torch.randn(rows, 96).bfloat16(), torch.randn(rows, 160).bfloat16()
    plain = [lin(x), lin.silu(x), lin.mul(x, other), lin.add(x, other)]
    lin = OneDNNLinear(orig)
    assert lin.packed is not None
    packed = [lin(x), lin.silu(x), lin.mul(x, other), lin.add(x, other)]
    for p, q in zip(plain, packed):
        assert p.shape == q.shape and p.dtype == q.dtype
        # Fused epilogues round once from fp32 where the plain path rounds after each step.
        torch.testing.assert_close(q.float(), p.float(), atol=0.05, rtol=0.02)
    assert packed[0].shape == lin(x.view(1, rows, 96)).shape[1:]  # leading dims pass through


@needs_packing
def test_packed_scales_move_into_the_weights():
    lin = _linear(96, 160, True, torch.bfloat16)
    x = torch.randn(40, 96).bfloat16()
    packed = OneDNNLinear(lin, weight_scale=1.702, bias_scale=3.0)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # the original layer is left as it was
    expected = F.linear(x.float(), lin.weight.float() * 1.702, lin.bias.float() * 3.0)
    torch.testing.assert_close(packed(x).float(), expected, atol=0.05, rtol=0.02)


@needs_packing
def test_packed_vision_mlp_is_quick_gelu():
    # Packed, fc1 runs with swish fused on weights scaled by 1.702 and fc2 takes the 1/1.702 back:
    # the result must still be residual + fc2(QuickGELU(fc1(x))), to bf16 rounding.
    from m0lite.config import VisionConfig
    from m0lite.vision import VisionBlock

    cfg = VisionConfig(embed_dim=64, num_heads=4, depth=1, hidden_size=96)
    block = VisionBlock(cfg).bfloat16()
    mlp = block.mlp
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    x, res = torch.randn(300, 64).bfloat16(), torch.randn(300, 64).bfloat16()
    u = F.linear(x.float(), mlp.fc1.weight.float(), mlp.fc1.bias.float())
    exact = res.float() + F.linear(u * torch.sigmoid(1.702 * u), mlp.fc2.weight.float(), mlp.fc2.bias.float())
    plain = (res + mlp(x)).float()
    fast = FastVisionBlock(block, OneDNNLinear)
    assert isinstance(mlp.fc1, OneDNNLinear) and isinstance(mlp.fc2, OneDNNLinear)
    packed = mlp.fc2.add(mlp.fc1.silu(x), res).float()  # how the fast block runs its MLP
    assert fast.mlp is mlp
    # Packed is as close to the exact fp32 result as the plain bf16 path is.
    err = lambda y: ((y - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()  # noqa: E731
    assert err(packed) < 1.5 * err(plain) + 1e-3, (err(packed), err(plain))
    assert err(plain) < 1e-2


def test_rotary_in_pair_order_is_the_same_rotation():
    from m0lite.rope import apply_rotary

    heads, hd, n = 3, 80, 37
    order = pair_order(heads, hd)
    assert sorted(order) == list(range(heads * hd))
    x, angles = torch.randn(n, heads, hd), torch.rand(n, hd // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = apply_rotary(x, cos, sin).flatten(1)[:, order].view(n, heads, hd)
    paired = apply_rotary_pairs(x.flatten(1)[:, order].view(n, heads, hd), torch.complex(angles.cos(), angles.sin()))
    torch.testing.assert_close(paired, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_materialized_attention_is_attention(dtype, monkeypatch):
    from m0lite.kernels import ops

    monkeypatch.setattr(chunked, "SCORE_ROWS", 7)  # several score matrices per sequence and head
    torch.manual_seed(0)
    lens, heads, hd = [1, 20, 9, 33], 3, 80
    cu = ops.cu_seqlens(lens)
    # Heads-major storage, as rowwise returns it for a long pass.
    q, k, v = (torch.randn(heads, sum(lens), hd).mul(2).to(dtype).transpose(0, 1) for _ in range(3))
    got = chunked.materialized_attention(q, k, v, cu, max(lens))
    exact = ops.attention_torch(q.float(), k.float(), v.float(), cu, max(lens), causal=False)
    assert got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    else:  # the scores rounded to bf16: a few times the flash kernel's error, and far from a wrong attention
        flash = (ops.attention_torch(q, k, v, cu, max(lens), causal=False).float() - exact).abs().mean()
        err = (got.float() - exact).abs().mean()
        assert err < 20 * flash and err < 0.02, (err, flash)
    with pytest.raises(ValueError, match="causal"):
        chunked.materialized_attention(q, k, v, cu, max(lens), causal=True)


@needs_packing
def test_packed_vision_block_matches_the_plain_one():
    # Packed, qkv emits queries and keys in rotary-pair order and fc1/fc2 carry QuickGELU's scale:
    # the block's output must not move by more than bf16 rounding.
    from m0lite.config import VisionConfig
    from m0lite.rope import inv_freq, vision_cos_sin, vision_positions
    from m0lite.vision import VisionBlock

    cfg = VisionConfig(embed_dim=160, num_heads=2, depth=1, hidden_size=96)
    block = VisionBlock(cfg).bfloat16()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
        block.attn.qkv.weight.normal_(0, 0.3)  # logits of several units: attention depends on the rotation
        block.norm1.weight.fill_(1.0)
    grid = [(1, 16, 20), (1, 8, 6)]
    cos, sin = vision_cos_sin(vision_positions(grid, 2), inv_freq(cfg.head_dim // 2, cfg.rope_theta))
    n = sum(t * h * w for t, h, w in grid)
    x, cu = torch.randn(n, 160).bfloat16(), torch.tensor([0, 320, n], dtype=torch.int32)
    with torch.inference_mode():
        exact = block.float()(x.float(), Context(cos, sin, cu, 320))
        block.bfloat16()
        plain = block(x, Context(cos, sin, cu, 320)).float()
        packed = FastVisionBlock(block, OneDNNLinear)(x, Context(cos, sin, cu, 320)).float()
    err = lambda y: ((y - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()  # noqa: E731
    assert err(plain) < 0.05 and err(packed) < 1.5 * err(plain) + 1e-3, (err(packed), err(plain))


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 700])
def test_rowwise_equals_the_whole(n, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_DTYPES", (torch.float32,))  # chunk fp32 too, to compare tightly
    lin = PlainLinear(_linear(16, 24, True, torch.float32))
    x, y = torch.randn(n, 16), torch.randn(n, 24)

    def fn(a, b):
        return lin.add(a, b), lin(a).view(-1, 4, 6)

    calls = []
    whole = fn(x, y)
    parts = rowwise(lambda a, b: calls.append(a.shape[0]) or fn(a, b), x, y)
    # Chunks of CHUNK_ROWS, a shorter last one padded to a multiple of ROW_MULTIPLE.
    assert calls == ([-(-min(CHUNK_ROWS, n - s) // ROW_MULTIPLE) * ROW_MULTIPLE for s in range(0, n, CHUNK_ROWS)] or [0])
    for w, p in zip(whole, parts):
        assert p.shape == w.shape
        torch.testing.assert_close(p, w, atol=1e-6, rtol=1e-6)
    assert rowwise(lin, x).shape == (n, 24)  # a single tensor comes back as one


@pytest.mark.parametrize("dtype, n, chunks", [
    (torch.bfloat16, 600, [256, 256, 96]), (torch.float16, 600, [256, 256, 96]),  # CHUNK_ROWS, for speed
    (torch.float32, 600, [608]), (torch.float32, 1024, [1024]),  # fp32: one chunk up to FP32_CHUNK_ROWS...
    (torch.float32, 2216, [768, 768, 704]), (torch.float32, 5000, [1024] * 4 + [928])])  # ...then equal chunks
def test_rowwise_chunks_16_bit_work_for_speed_and_long_fp32_work_for_memory(dtype, n, chunks):
    # Every chunk a multiple of ROW_MULTIPLE rows (padded), the padding's outputs dropped.
    seen = []
    out = rowwise(lambda a: seen.append(a.shape[0]) or a * 2, torch.arange(n, dtype=dtype)[:, None])
    assert seen == chunks and torch.equal(out[:, 0], torch.arange(n, dtype=dtype) * 2)


def test_chunked_fp32_model_matches_reference(tiny_ckpt, tiny_reference, images_for_packing, monkeypatch):
    """The fast forms change no score: forced on in fp32 (chunks, the vision rewrites, on plain linears),
    long prompts and a large image still match."""
    monkeypatch.setattr(chunked, "CHUNK_DTYPES", (torch.float32,))
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    for tower in (rr.model.model, rr.model.visual):
        assert chunked.apply(tower, PlainLinear) > 0
    pairs = [[QUERY, d] for d in DOCS]
    assert rr.compute_score(pairs, normalize_scores=False) == pytest.approx(tiny_reference.raw_scores(pairs), abs=1e-4)
    pairs = [[QUERY, im] for im in images_for_packing]
    assert rr.compute_score(pairs, doc_type="image", normalize_scores=False) == pytest.approx(
        tiny_reference.raw_scores(pairs, doc_type="image"), abs=1e-4)


@pytest.mark.parametrize("make", [PlainLinear, OneDNNLinear], ids=["plain-layout", "onednn-layout"])
def test_fp32_fast_form_scores_are_the_plain_math(tiny_ckpt, images_for_packing, make):
    """The fast forms in fp32 as they would run there (whole: these passes are shorter than an fp32 chunk), on
    either weight layout, score text, image and image+text documents as the plain math does, to fp32 rounding.
    fp32 keeps the plain math by default (onednn.packable); this holds the fast forms ready for it."""
    if make is OneDNNLinear and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    plain = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, pack_weights=False)
    fast = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, pack_weights=False)
    for tower in (fast.model.model, fast.model.visual):
        assert chunked.apply(tower, make) > 0
    image = images_for_packing[1]  # more patches than one 256-row chunk
    pairs = ([[QUERY, d] for d in DOCS] + [[QUERY, {"image": im}] for im in images_for_packing]
             + [[QUERY, {"image": image, "text": DOCS[1]}], [image, {"image": images_for_packing[0], "text": DOCS[0]}]])
    expected, _ = plain.score_pairs(pairs, normalize=False)
    got, _ = fast.score_pairs(pairs, normalize=False)
    assert got == pytest.approx(expected, abs=1e-4)


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
def test_packing_gives_the_mapped_pages_back_and_keeps_values(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(2048, 2048)}, str(path))  # 16 MiB
    w = read_tensors(path)["w"]
    expected = w.clone()
    total = float(w.sum())  # fault every page in
    before = _rss_file_kib()
    memory.release_mapped_pages(w, memory.file_mappings())
    assert before - _rss_file_kib() > 12 * 1024  # the tensor's pages left the resident set
    assert float(w.sum()) == total and torch.equal(w, expected)  # and fault back in from the file

    anon = torch.randn(2048, 2048)  # not file-backed: must be left alone (dropping would zero it)
    copy = anon.clone()
    memory.release_mapped_pages(anon, memory.file_mappings())
    assert torch.equal(anon, copy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_an_embedding_lookup_leaves_no_page_of_a_mapped_table_resident(tmp_path, kind):
    from m0lite.decoder import Embedding
    from m0lite.transforms.int8 import Int8Embedding

    vocab, dim = 16384, 1024  # 32 MiB in bf16, 16 MiB in int8
    table = torch.randn(vocab, dim).to(torch.bfloat16)
    path = tmp_path / "t.safetensors"
    if kind == "bf16":
        emb = Embedding(vocab, dim)
        save_file({"w": table}, str(path))
        emb.weight = torch.nn.Parameter(read_tensors(path)["w"], requires_grad=False)
    else:
        emb = Int8Embedding.quantized(Embedding(vocab, dim).requires_grad_(False))
        table = table.float().clamp(-1, 1).mul(127).round().to(torch.int8)
        save_file({"w": table, "s": torch.rand(vocab) + 0.5}, str(path))
        emb.weight, emb.weight_scale = read_tensors(path)["w"], read_tensors(path)["s"]
    ids = torch.randint(0, vocab, (3000,), generator=torch.Generator().manual_seed(0))  # rows on most pages
    before = _rss_file_kib()
    rows = emb(ids)
    assert _rss_file_kib() - before < 2 * 1024  # without the hand-back: most of the table, 16-32 MiB
    got = rows if kind == "bf16" else (rows / emb.weight_scale[ids, None]).round().to(torch.int8)
    assert torch.equal(got, torch.nn.functional.embedding(ids, table))
    assert torch.equal(emb(ids), rows)  # the pages fault back in from the file


def test_pack_weights_needs_bf16_on_cpu(tiny_ckpt):
    with pytest.raises(InputError, match="pack_weights=True needs bf16"):
        Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, pack_weights=True)
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    assert rr.packed == [] and rr.pack() == ["vision"]  # fp32: the vision tower's rewrites only, never packed
    assert all(isinstance(m, torch.nn.Linear) for layer in rr.model.model.layers for m in layer.mlp.children())
    with pytest.raises(InputError, match="do not go together"):
        Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, compile=True, pack_weights=True)


@needs_packing
def test_packed_scores_match_the_reference_bf16(tiny_ckpt, images_for_packing):
    packed = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, pack_weights=True)
    assert packed.packed == ["decoder", "vision"]
    plain = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, pack_weights=False)
    ref = Reference(tiny_ckpt, dtype=torch.bfloat16)
    pairs = [[QUERY, d] for d in DOCS]
    theirs = [Reranker.normalize(s) for s in ref.raw_scores(pairs, batch_size=1)]
    assert packed.compute_score(pairs) == pytest.approx(theirs, abs=1e-2)
    assert packed.compute_score(pairs) == pytest.approx(plain.compute_score(pairs), abs=1e-2)
    pairs = [[QUERY, im] for im in images_for_packing]
    theirs = [Reranker.normalize(s) for s in ref.raw_scores(pairs, batch_size=1, doc_type="image")]
    assert packed.compute_score(pairs, doc_type="image") == pytest.approx(theirs, abs=1e-2)
    # Batching never changes a packed score beyond rounding either.
    alone = [packed.compute_score(p, doc_type="image") for p in pairs]
    assert packed.compute_score(pairs, doc_type="image", batch_size=8) == pytest.approx(alone, abs=1e-3)


@needs_packing
def test_towers_pack_after_enough_work(tiny_ckpt, images_for_packing, monkeypatch):
    from m0lite.transforms import fast_forms

    monkeypatch.setattr(fast_forms, "PACK_AFTER_ROWS", 300)
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    short = rr.compute_score([QUERY, DOCS[0]])
    assert rr.packed == []  # a short pair does not pay for packing
    rr.compute_score([[QUERY, d] for d in DOCS])  # now past 300 tokens in all
    assert rr.packed == ["decoder"]
    assert all(isinstance(layer, FastDecoderLayer) for layer in rr.model.model.layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in rr.model.model.modules())
    assert not any(isinstance(m, (FastVisionBlock, OneDNNLinear)) for m in rr.model.visual.modules())
    assert rr.compute_score([QUERY, DOCS[0]]) == pytest.approx(short, abs=1e-2)
    rr.compute_score([[QUERY, im] for im in images_for_packing * 2], doc_type="image")
    assert rr.packed == ["decoder", "vision"]
    assert pack_weights(rr.model.model) == pack_weights(rr.model.visual) == 0  # nothing left to pack
    fresh = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert fresh.pack(["decoder"]) == ["decoder"]  # what a server does at start
    assert fresh.pack() == ["decoder", "vision"]
    assert fresh.compute_score([QUERY, DOCS[0]]) == pytest.approx(short, abs=1e-2)


@pytest.fixture(scope="module")
def images_for_packing():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # The second is larger than one 256-row chunk of patches.
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((56, 84), (300, 260))]


@needs_packing
def test_packed_document_cache_matches_uncached(tiny_ckpt):
    cached = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, pack_weights=True, doc_cache_bytes=2**26)
    plain = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, pack_weights=True)
    cached.rank("first query", DOCS)  # fills the cache
    for query in (QUERY, "another question about markdown"):
        assert cached.compute_score([[query, d] for d in DOCS]) == pytest.approx(
            plain.compute_score([[query, d] for d in DOCS]), abs=1e-2)
    assert len(cached.doc_cache) == len(DOCS)


def test_fp32_vision_tower_takes_its_rewrites(tiny_ckpt, images_for_packing):
    """In fp32 on CPU the vision tower's fast form is its block rewrites on plain linears (transforms.rewrite_fp32),
    taken as bf16's packing is; its scores are the plain math's to fp32 rounding. pack_weights=False keeps it plain."""
    plain = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, pack_weights=False)
    fast = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32)
    assert plain.pack() == [] and fast.pack() == ["vision"]
    assert all(isinstance(b, FastVisionBlock) for b in fast.model.visual.blocks)
    pairs = [[QUERY, {"image": im}] for im in images_for_packing] + [[images_for_packing[0], DOCS[0]]]
    got, _ = fast.score_pairs(pairs, normalize=False)
    expected, _ = plain.score_pairs(pairs, normalize=False)
    assert got == pytest.approx(expected, abs=1e-4)
