"""Lean mode (int8): close to fp32 in every modality combination, exact through save and load, strict on scales."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from m0lite import InputError, Reranker, WeightsError, cpu
from m0lite.cli import main
from m0lite.transforms import int8
from m0lite.transforms import chunked
from m0lite.transforms.chunked import FastDecoderLayer, rowwise
from m0lite.weights.quantized import save_quantized

# The stated tolerance (README, Lean mode): int8 normalised scores within 0.03 of the exact ones. The tiny
# random checkpoints of the tests are well inside it; bench/bench_quant.py measures the full-size model.
TOL = 0.03
QUERY = "small language model data extraction"
DOCS = ["ReaderLM-v2 converts raw HTML into markdown.", "数据提取是从非结构化文本中获取结构化信息的过程。",
        " ".join(f"token{i} 数据 word" for i in range(200))]  # longer than one 256-row chunk


def page(seed, w=150, h=110):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# "dynamic" runs wherever torch has oneDNN's int8 ops (fast only with int8 matmul units, which "auto" asks for).
HAS_ONEDNN_INT8 = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
COMPUTE = ["weight-only", *(["dynamic"] if HAS_ONEDNN_INT8 else [])]


@pytest.fixture(scope="module")
def quantized_ckpt(tiny_ckpt, tmp_path_factory):
    return save_quantized(tiny_ckpt, tmp_path_factory.mktemp("int8") / "ckpt")


@pytest.mark.parametrize("compute", COMPUTE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_modality_within_tolerance_of_fp32(tiny_ckpt, tiny_reranker, compute, dtype):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=dtype, quantize="int8", int8_compute=compute)
    assert rr.quantized and all(m.compute == compute for m in rr.model.modules() if isinstance(m, int8.Int8Linear))
    cases = [  # text -> text, text -> image, image -> text, image -> image
        ([[QUERY, d] for d in DOCS], "text", "text"),
        ([[QUERY, page(0)], [QUERY, page(1, 300, 260)]], "text", "image"),
        ([[page(2), d] for d in DOCS], "image", "text"),
        ([[page(3), page(4, 90, 200)]], "image", "image"),
    ]
    for pairs, qt, dt in cases:
        got = rr.compute_score(pairs, query_type=qt, doc_type=dt)
        want = tiny_reranker.compute_score(pairs, query_type=qt, doc_type=dt)
        assert got == pytest.approx(want, abs=TOL), (qt, dt)
        assert got != want  # lossy: it really runs on int8 weights
    mixed = [DOCS[0], page(5), {"image": page(6, 60, 300)}, DOCS[2]]
    got = {r["index"]: r["relevance_score"] for r in rr.rank(QUERY, mixed)}
    want = {r["index"]: r["relevance_score"] for r in tiny_reranker.rank(QUERY, mixed)}
    assert sorted(got) == list(range(len(mixed))) and all(abs(got[i] - want[i]) < TOL for i in want)


def test_linears_are_int8_where_stated(tiny_ckpt):
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, quantize="int8", int8_compute="weight-only")
    m = rr.model
    # The decoder is quantised at load, the vision tower before its first pass (a text-only process never
    # reads its weights).
    assert rr.packed == ["decoder"] and isinstance(m.visual.blocks[0].attn.qkv, torch.nn.Linear)
    assert rr.pack() == ["decoder", "vision"]
    layer, block = m.model.layers[0], m.visual.blocks[0]
    for lin in (layer.self_attn.q_proj, layer.mlp.down_proj, block.attn.qkv, block.mlp.fc2):
        assert isinstance(lin, int8.Int8Linear) and lin.weight.dtype == torch.int8
    # Stated in transforms/int8.py: the token embeddings are int8 per token; the patch embedding, the merger,
    # the norms and the score head stay.
    assert isinstance(m.model.embed_tokens, int8.Int8Embedding) and m.model.embed_tokens.weight.dtype == torch.int8
    kept = (m.visual.patch_embed.proj, m.visual.merger.mlp[0], m.visual.merger.mlp[2], m.score[0])
    assert all(type(lin) is torch.nn.Linear and lin.weight.dtype == torch.float32 for lin in kept)
    # The MLPs' second linears, and only they, take a rotated input.
    assert sorted({n.rsplit(".", 1)[1] for n, lin in m.named_modules() if getattr(lin, "rotated", False)}) == ["down_proj", "fc2"]
    q = layer.self_attn.q_proj
    assert q.weight.abs().amax(1).eq(127).all()  # each channel's largest weight maps to 127
    exact = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32).model.model.layers[0].self_attn.q_proj.weight
    step = q.weight_scale[:, None]
    assert ((q.weight.float() * step - exact).abs() <= step / 2 + 1e-7).all()  # rounded to the nearest step


def test_dynamic_runs_the_fast_form_and_is_batch_invariant(tiny_ckpt):
    if not HAS_ONEDNN_INT8:
        pytest.skip("no oneDNN int8 kernels in this torch build")
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, quantize="int8", int8_compute="dynamic")
    assert all(isinstance(layer, FastDecoderLayer) for layer in rr.model.model.layers)
    pairs = [[QUERY, d] for d in DOCS] + [[QUERY, page(7)]]
    alone = [rr.compute_score([q, d] if isinstance(d, str) else [q, {"image": d}], normalize_scores=False)
             for q, d in pairs]
    together = rr.score_pairs([(q, d if isinstance(d, str) else {"image": d}) for q, d in pairs], normalize=False)[0]
    # Activations are quantised per row and int8 products are exact: a pair's score does not depend on its batch.
    assert together == pytest.approx(alone, abs=1e-5)


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("bias", [True, False])
def test_shared_input_matmul_equals_each_linear(bias):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=bias).to(torch.bfloat16) for n in (48, 16, 16)]
    alone = [int8.Int8Linear.quantized(lin) for lin in linears]
    shared = [int8.Int8Linear.quantized(lin) for lin in linears]
    for m in alone:
        m.prepack([])
    int8.SharedInput(shared, [])
    assert all(m.compute == "dynamic" and m.weight is None for m in shared)
    x = torch.randn(40, 64).to(torch.bfloat16)
    want = [m(x) for m in alone]
    # Each member's part of the one matmul equals its own matmul (int8 products are exact), and an epilogue
    # writing to one part (as silu_ does) leaves the others alone.
    first = shared[0].silu(x)
    assert torch.equal(first, torch.nn.functional.silu(want[0]))
    assert all(torch.equal(m(x), w) for m, w in zip(shared[1:], want[1:]))
    # A second call on the same input computes afresh, rather than handing out a part already written to.
    assert torch.equal(shared[0](x), want[0])
    assert torch.equal(shared[1](x[:7]), want[1][:7])


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("rows", [1, 7, 96, 256, 300])
def test_packed_matmul_is_the_integer_product_at_any_row_count(rows):
    # The weight is laid out with a chunk's shape (CHUNK_ROWS rows) as oneDNN's hint; every row count must
    # still get the exact integer products, scaled, at the activation width this machine uses.
    torch.manual_seed(0)
    lin = int8.Int8Linear.quantized(torch.nn.Linear(96, 80))
    q, scale, bias = lin.weight.clone(), lin.weight_scale.clone(), lin.bias.detach().clone()
    lin.prepack([])
    bits = lin._packed.bits
    assert bits == int8.activation_bits() in (7, 8)
    x = torch.randn(rows, 96)
    codes, row_scale = int8.quantize_rows(x, bits)
    products = (codes.to(torch.int64) - 2 ** (bits - 1)) @ q.to(torch.int64).t()
    exact = products.double() * row_scale.double() * scale.double() + bias.double()
    assert torch.allclose(lin(x).double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_residual_in_the_matmul_is_the_sum(dtype, bias):
    torch.manual_seed(0)
    lin = int8.Int8Linear.quantized(torch.nn.Linear(64, 48, bias=bias).to(dtype))
    lin.prepack([])
    x, other = torch.randn(40, 64).to(dtype), torch.randn(40, 48).to(dtype)
    want = lin(x).float() + other.float()
    got = lin.add(x, other)
    # One rounding of the sum instead of two: within one step of the model dtype.
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22
    assert got.dtype == dtype and ((got.float() - want).abs() <= step * want.abs().clamp_min(1)).all()


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_staged_mlps_are_the_epilogue_forms(tiny_ckpt, dtype):
    """The int8 MLPs that run the work between their matmuls a stage of rows at a time (int8.swiglu_add,
    int8.quick_gelu_add) are the same operations in the same order as the fast forms' EpilogueLinear ones:
    the same values, over fewer rows than a stage and over several stages, but for fp32 rounding (with oneDNN
    and MKL held to AVX2, an elementwise kernel over fewer rows moved 64 of 16,544 values by 2.4e-7)."""
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=dtype, quantize="int8", int8_compute="dynamic")
    rr.pack(["decoder", "vision"])
    layer, block = rr.model.model.layers[0], rr.model.visual.blocks[0]
    assert layer.mlp_add is int8.swiglu_add and block.mlp_add is int8.quick_gelu_add
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 37, 2 * int8.STAGE_ROWS + 5):
            for staged, plain, mlp, width in (
                    (int8.swiglu_add, chunked.swiglu_add, layer.mlp, layer.mlp.gate_proj.in_features),
                    (int8.quick_gelu_add, chunked.quick_gelu_add, block.mlp, block.mlp.fc1.in_features)):
                h, res = torch.randn(rows, width).to(dtype), torch.randn(rows, width).to(dtype)
                torch.testing.assert_close(staged(mlp, h, res), plain(mlp, h, res), rtol=1e-5, atol=1e-5,
                                           msg=f"{staged.__name__}, {rows} rows")


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_feature_major_mlps_are_the_staged_ones(tiny_ckpt, monkeypatch, dtype):
    """Where oneDNN's int8 kernel lays its weight out on every call (7-bit activations), the decoder's MLPs run
    weight first through torch._int_mm, feature-major between their matmuls (int8.FeatureMajor): the same
    integer products, scaled in the same order, as the staged MLPs on oneDNN's layout. Held on any CPU at 7
    bits, where both are exact: the values agree but for fp32 rounding in the rotation, which can move a code
    by one step."""
    monkeypatch.setattr(int8, "activation_bits", lambda: 7)
    if not int8.first_weight_exact(7):  # (AVX-512 without VNNI, at one row): then the path is never taken
        assert not int8.feature_major()
        return
    made = {}
    for on in (False, True):
        monkeypatch.setattr(int8, "feature_major", lambda on=on: on)
        made[on] = Reranker.from_pretrained(tiny_ckpt, dtype=dtype, quantize="int8", int8_compute="dynamic")
    mlps = {on: rr.model.model.layers[0].mlp for on, rr in made.items()}
    assert all(isinstance(m._packed, int8.FeatureMajor) for m in mlps[True].children())
    assert not any(isinstance(m._packed, int8.FeatureMajor) for m in mlps[False].children())
    torch.manual_seed(0)
    width = mlps[True].gate_proj.in_features
    with torch.inference_mode():
        for rows in (1, 37, int8.CHUNK_ROWS + 5):
            h, res = torch.randn(rows, width).to(dtype), torch.randn(rows, width).to(dtype)
            staged, fm = (int8.swiglu_add(mlps[on], h, res) - res for on in (False, True))
            assert (fm - staged).float().norm() <= 1e-3 * staged.float().norm(), f"{rows} rows"
            # A lone linear (explain's methods, a caller outside the fast form) gives the same rows.
            lone = mlps[True].gate_proj(h)
            torch.testing.assert_close(lone, mlps[False].gate_proj(h), rtol=1e-5, atol=1e-5)
    pairs = [[QUERY, d] for d in DOCS] + [[QUERY, {"image": page(7, 300, 260), "text": DOCS[1]}]]
    (a, _), (b, _) = (made[on].score_pairs(pairs, normalize=False) for on in (False, True))
    assert a == pytest.approx(b, abs=1e-3)


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
def test_fp32_chunks_change_no_score(tiny_ckpt, monkeypatch):
    """In fp32 a long pass runs in chunks of at most FP32_CHUNK_ROWS rows (for memory): every row's arithmetic
    is the same as in one piece, text and image alike."""
    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, quantize="int8", int8_compute="dynamic")
    pairs = [[QUERY, d] for d in DOCS] + [[QUERY, {"image": page(7, 300, 260), "text": DOCS[1]}]]
    whole, _ = rr.score_pairs(pairs, normalize=False)
    monkeypatch.setattr(chunked, "FP32_CHUNK_ROWS", 64)
    calls = []
    monkeypatch.setattr(chunked, "rowwise", lambda fn, *xs: calls.append(xs[0].shape[0]) or rowwise(fn, *xs))
    cut, _ = rr.score_pairs(pairs, normalize=False)
    assert max(calls) > 64  # passes longer than a chunk ran
    assert cut == whole


def test_dynamic_vision_attention_is_materialized_in_16_bits(tiny_ckpt):
    """The lean mode's stated trade (transforms/chunked.py): its vision blocks attend over scores materialized
    in the model dtype where that dtype is 16-bit, and through the flash kernel in fp32; the exact mode keeps
    the flash kernel's fp32 scores."""
    if not HAS_ONEDNN_INT8:
        pytest.skip("no oneDNN int8 kernels in this torch build")
    from m0lite.kernels import ops
    from m0lite.transforms.chunked import lean_attention, materialized_attention

    rr = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, quantize="int8", int8_compute="dynamic")
    rr.pack()
    assert all(block.attention is lean_attention for block in rr.model.visual.blocks)
    torch.manual_seed(0)
    q, k, v = (torch.randn(70, 2, 80) for _ in range(3))
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    for dtype, same_as in ((torch.bfloat16, materialized_attention), (torch.float32, ops.attention)):
        args = [t.to(dtype) for t in (q, k, v)]
        assert torch.equal(lean_attention(*args, cu, 40, False), same_as(*args, cu, 40, False))
    assert not torch.equal(materialized_attention(q, k, v, cu, 40, False), ops.attention(q, k, v, cu, 40, False))
    exact = Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    if exact.pack():  # bf16 packing needs native bf16 on this CPU
        assert all(block.attention is ops.attention for block in exact.model.visual.blocks)


def test_rotation_is_orthogonal_up_to_its_block():
    r = int8.rotation(32, torch.float32, torch.device("cpu"))
    assert r.abs().eq(1).all() and torch.equal(r @ r.T, 32 * torch.eye(32))
    x = torch.randn(3, 96)  # three blocks of 32 features: inner products kept, times 32
    assert torch.allclose(int8.rotate(x) @ int8.rotate(x).T, 32 * x @ x.T, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not HAS_ONEDNN_INT8, reason="no oneDNN int8 kernels in this torch build")
@pytest.mark.parametrize("activation", ["swiglu", "quickgelu"])
def test_rotated_input_quantises_an_activation_better(activation):
    """The inputs of down_proj (a SwiGLU product: heavy-tailed) and fc2 (QuickGELU's output: off-centre) lose
    less to per-row int8 when rotated (transforms/int8.py, ROTATED), and the rotated layer is the same linear."""
    torch.manual_seed(0)
    g, u = torch.randn(2, 64, 512).unbind(0)
    x = torch.nn.functional.silu(g) * u if activation == "swiglu" else g * torch.sigmoid(1.702 * g)
    lin = torch.nn.Linear(512, 96)
    torch.nn.init.normal_(lin.weight, std=0.02)  # Gaussian, as the random checkpoints' (trained ones are near it)
    want = lin(x).detach()
    err = {}
    for compute in ("weight-only", "dynamic"):
        for rotated in (False, True):
            q = int8.Int8Linear.quantized(lin, rotated)
            if compute == "dynamic":
                q.prepack([])
            with torch.no_grad():
                err[compute, rotated] = float((q(x) - want).norm() / want.norm())
    # Weights alone: the same error either way (about 0.75% here); int8 activations: measured 0.57x (SwiGLU)
    # and 0.82x (QuickGELU) of the error without the rotation.
    assert err["weight-only", True] < 1.1 * err["weight-only", False] < 0.01
    assert err["dynamic", True] < 0.9 * err["dynamic", False]


@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_quantise_within_their_range_without_a_clamp(dtype, bits):
    torch.manual_seed(0)
    x = torch.randn(4000, 96).mul(torch.rand(4000, 1) * 50).to(dtype)
    x[0], x[1, :5] = 0, torch.tensor([1e-20, 3.0, -7.5, 2.0**-100, 0])  # a zero row; a row of tiny values
    codes, scale = int8.quantize_rows(x, bits)
    top = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.uint8 and codes.min() >= 1 and codes.max() <= 2 * top + 1  # 7 bits: u8 <= 127
    c = codes.int() - (top + 1)  # the signed codes back
    assert c.abs().max() == top and (c.abs().amax(1)[2:] >= top - 2).all()  # never past top, the range used
    assert c[0].eq(0).all() and torch.isfinite(scale).all()
    # Within three quarters of a step of x (see quantize_rows: bf16 rounds x * multiplier first).
    assert ((c.float() * scale - x.float()).abs() <= 0.75 * scale + 1e-30).all()


def test_round_trip_is_bit_identical(tiny_ckpt, quantized_ckpt, tmp_path):
    # In the CPU's own dtype (bf16 where native, else fp32): quantised from the file's values either way.
    pairs = [[QUERY, d] for d in DOCS]
    at_load = Reranker.from_pretrained(tiny_ckpt, quantize="int8")
    from_file = Reranker.from_pretrained(quantized_ckpt)
    assert from_file.quantized
    assert at_load.compute_score(pairs) == from_file.compute_score(pairs)
    images = [[QUERY, {"image": page(8)}]]
    assert at_load.compute_score(images) == from_file.compute_score(images)
    again = save_quantized(quantized_ckpt, tmp_path / "again")  # an int8 checkpoint saves as it is
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(quantized_ckpt / "model.safetensors")).keys()
    assert Reranker.from_pretrained(again).compute_score(pairs) == from_file.compute_score(pairs)


def test_quantized_file_is_about_half(tiny_ckpt, quantized_ckpt):
    state = load_file(str(quantized_ckpt / "model.safetensors"))
    assert state["model.layers.0.mlp.gate_proj.weight"].dtype == torch.int8
    assert state["model.layers.0.mlp.gate_proj.weight_scale"].dtype == torch.float32
    assert state["visual.patch_embed.proj.weight"].dim() == 5  # the published Conv3d layout
    config = json.loads((quantized_ckpt / "config.json").read_text())
    assert config["quantization_config"]["weights"] == "int8"
    assert (quantized_ckpt / "tokenizer.json").exists()
    linear_bytes = sum(t.numel() for k, t in state.items() if t.dtype == torch.int8)
    assert linear_bytes > 0


@pytest.fixture
def broken(quantized_ckpt, tmp_path):
    """A copy of the int8 checkpoint and a function that rewrites one of its tensors."""
    folder = tmp_path / "broken"
    shutil.copytree(quantized_ckpt, folder)
    path = folder / "model.safetensors"

    def edit(name, fn):
        state = load_file(str(path))
        state[name] = fn(state[name])
        if state[name] is None:
            del state[name]
        save_file(state, str(path))
        return folder
    return edit


SCALE = "model.layers.1.self_attn.k_proj.weight_scale"


@pytest.mark.parametrize("fn,match", [
    (lambda t: t[:-1].clone(), "k_proj.weight_scale has shape"),
    (lambda t: t.clone().fill_(float("nan")), "k_proj.weight_scale holds scales that are not all finite and positive"),
    (lambda t: torch.zeros_like(t), "k_proj.weight_scale holds scales"),
    (lambda t: None, "missing tensors: model.layers.1.self_attn.k_proj.weight_scale"),
])
def test_bad_scales_are_named(broken, fn, match):
    with pytest.raises(WeightsError, match=match):
        Reranker.from_pretrained(broken(SCALE, fn), dtype=torch.float32)


def test_int8_weight_stored_as_float_is_named(broken):
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(WeightsError, match="up_proj.weight has dtype torch.float32, expected int8"):
        Reranker.from_pretrained(broken(name, lambda t: t.float()), dtype=torch.float32)


def test_unknown_quantization_config_is_refused(quantized_ckpt, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(quantized_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="quantization_config .* is not one m0lite reads"):
        Reranker.from_pretrained(folder)


def test_checkpoint_without_rotated_inputs_is_refused(quantized_ckpt, tmp_path):
    """An int8 checkpoint of an earlier layout (weights not rotated) would load into wrong scores: refused."""
    folder = tmp_path / "older"
    shutil.copytree(quantized_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["rotated_inputs"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="differs from this m0lite's in rotated_inputs: .*m0lite quantize"):
        Reranker.from_pretrained(folder)


# Run with oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA), as on a CPU without VNNI or AMX: prints the activation
# width, whether full-range codes would be exact, and the int8 model's scores.
WITHOUT_VNNI = """
import json, sys, torch
from m0lite import Reranker
from m0lite.transforms import int8
rr = Reranker.from_pretrained(sys.argv[1], dtype=torch.float32, quantize="int8")
pairs = json.loads(sys.argv[2])
print(json.dumps({"compute": rr.int8_compute, "bits": int8.activation_bits(), "unit": int8.int8_unit(),
                  "exact8": int8.exact_at(8),
                  "packed_bits": sorted({m._packed.bits for m in rr.model.modules() if isinstance(m, int8.Int8Linear)}),
                  "scores": rr.compute_score(pairs)}))
"""


@pytest.mark.skipif(not HAS_ONEDNN_INT8 or "avx2" not in cpu.flags(), reason="needs oneDNN's int8 kernels and AVX2")
def test_without_vnni_activations_take_7_bits_and_stay_exact(tiny_ckpt, tiny_reranker):
    """Without VNNI or AMX, oneDNN adds pairs of u8 x s8 products in int16 with saturation: full-range codes
    come out wrong there, so the lean mode measures it at load and quantises activations to 7 bits."""
    import json
    import os
    import subprocess
    import sys

    pairs = [[QUERY, d] for d in DOCS]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", WITHOUT_VNNI, str(tiny_ckpt), json.dumps(pairs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["compute"] == "dynamic" and got["bits"] == 7 and got["packed_bits"] == [7] and got["unit"] == "avx2"
    assert not got["exact8"]  # the saturation is real under AVX2, and measured
    assert got["scores"] == pytest.approx(tiny_reranker.compute_score(pairs), abs=TOL)


def test_no_exact_int8_matmul_means_weight_only(monkeypatch):
    """Where oneDNN's int8 matmul is exact at no width (or absent), "auto" falls back to weight-only and a
    forced "dynamic" is refused by name, never run inexact."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(int8, "activation_bits", lambda: None)
    assert int8.resolve_compute("auto", cpu) == "weight-only"
    with pytest.raises(InputError, match="int8_compute='dynamic' needs oneDNN's int8 kernels, exact on this CPU"):
        int8.resolve_compute("dynamic", cpu)
    assert int8.resolve_compute("weight-only", torch.device("meta")) == "weight-only"


def test_caches_are_exact_in_int8(tiny_ckpt):
    plain = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, quantize="int8", vision_cache_bytes=0)
    cached = Reranker.from_pretrained(tiny_ckpt, dtype=torch.float32, quantize="int8", doc_cache_bytes=2**26)
    docs = [*DOCS, page(9)]
    cached.rank("first query", docs)  # fills both caches
    for query in (QUERY, page(10), page(10)):  # the image query's visual tokens come from the cache the second time
        assert cached.rank(query, docs) == [pytest.approx(r, abs=1e-5) for r in plain.rank(query, docs)]
    assert cached.doc_cache.hits >= len(docs) and cached.vision_cache.hits >= 1


def test_options_are_checked(tiny_ckpt):
    with pytest.raises(InputError, match="quantize must be None or 'int8'"):
        Reranker.from_pretrained(tiny_ckpt, quantize="int4")
    with pytest.raises(InputError, match="int8_compute must be"):
        Reranker.from_pretrained(tiny_ckpt, quantize="int8", int8_compute="fast")
    with pytest.raises(InputError, match="pack_weights=True needs bf16 on a CPU with native bf16, not an int8 model"):
        Reranker.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, quantize="int8", pack_weights=True)
    with pytest.raises(InputError, match="compile=True does not take an int8 model"):
        Reranker.from_pretrained(tiny_ckpt, quantize="int8", compile=True)


def test_cli_quantize_then_rank(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_ckpt), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["rank", "--model", str(out), "--query", QUERY, "--json", *DOCS]) == 0
    from_file = json.loads(capsys.readouterr().out)["results"]
    assert main(["rank", "--model", str(tiny_ckpt), "--quantize", "int8", "--json", "--query", QUERY, *DOCS]) == 0
    at_load = json.loads(capsys.readouterr().out)["results"]
    assert from_file == at_load and len(at_load) == len(DOCS)
    assert main(["quantize", str(tiny_ckpt), str(out)]) == 2  # refuses to write into a full folder
    assert "not empty" in capsys.readouterr().err


def test_the_lean_mode_prepares_its_towers_even_with_pack_weights_false(tiny_ckpt):
    """pack_weights=False (as compile=True and `serve --pack-weights never` pass) keeps the exact mode's plain
    math; the lean mode has no plain form to keep, so its towers are prepared as without it."""
    off = Reranker.from_pretrained(tiny_ckpt, quantize="int8", pack_weights=False)
    default = Reranker.from_pretrained(tiny_ckpt, quantize="int8")
    assert off.packed == default.packed == ["decoder"]
    pairs = [[QUERY, {"image": page(8)}], [QUERY, DOCS[0]]]
    assert off.compute_score(pairs) == default.compute_score(pairs)
    assert off.packed == ["decoder", "vision"]
