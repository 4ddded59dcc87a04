"""Kernel tests: each Triton kernel against its torch twin, each twin against a naive formula.

With a GPU the Triton kernels run in this process on CUDA. Without one they run under
Triton's interpreter, which is chosen when @triton.jit runs, i.e. when `kernels` is
first imported; any earlier test module may have imported it already. So on CPU the
kernel checks run in one worker subprocess started with TRITON_INTERPRET=1 (this file,
run as a script), and the test here asserts on the worker's reply.

The interpreter's bf16 arithmetic is wrong (tl.dot and elementwise ops; its fp32 ->
bf16 rounding is also off by an ulp), so under it the attention kernel computes bf16
in fp32 (UPCAST) and the bf16 tolerances below allow a few ulps.
"""

import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from m0lite.kernels import ops  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Kernel vs twin. Attention: the kernel rounds the softmax weights P to the input dtype
# before P @ V (as flash attention does), so fp16/bf16 differ by about one ulp of that.
ATTN_TOL = {"fp32": dict(atol=2e-5, rtol=2e-5), "fp16": dict(atol=3e-3, rtol=3e-3),
            "bf16": dict(atol=2e-2, rtol=2e-2)}
# RMSNorm: the same roundings as the twin, so an ulp or two of the output dtype apart
# (rsqrt and the summation order differ); bf16 also allows for the interpreter's rounding.
NORM_TOL = {"fp32": dict(atol=1e-5, rtol=1e-5), "fp16": dict(atol=1e-3, rtol=3e-3),
            "bf16": dict(atol=1e-2, rtol=2.5e-2)}


# ---------------------------------------------------------------- inputs and naive formulas

def packed_qkv(lens, n_heads, n_kv_heads, head_dim, dtype, seed=0, device="cpu", fused=False):
    """Random q, k, v packed from sequences of `lens` tokens, and their int32 cu_seqlens.

    fused=True returns q, k, v as strided views of one (total, 3, heads, d) tensor, the way
    a fused qkv projection produces them.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    if fused:
        assert n_heads == n_kv_heads
        qkv = torch.randn(total, 3, n_heads, head_dim, generator=g).to(device, DTYPES[dtype])
        q, k, v = qkv.unbind(1)
    else:
        q = torch.randn(total, n_heads, head_dim, generator=g).to(device, DTYPES[dtype])
        k = torch.randn(total, n_kv_heads, head_dim, generator=g).to(device, DTYPES[dtype])
        v = torch.randn(total, n_kv_heads, head_dim, generator=g).to(device, DTYPES[dtype])
    cu_seqlens = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu_seqlens


def naive_attention(q, k, v, cu_seqlens, causal, scale=None):
    """softmax(q k^T * scale + mask) v in fp64 with the whole (total, total) mask built explicitly."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    lens = cu_seqlens.diff().long().cpu()
    seq_id = torch.repeat_interleave(torch.arange(len(lens)), lens)
    allowed = seq_id[:, None] == seq_id[None, :]
    if causal:
        pos = torch.arange(q.shape[0])
        allowed &= pos[:, None] >= pos[None, :]
    scores = torch.einsum("ihd,jhd->hij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def norm_inputs(shape, dtype, residual, seed=0, device="cpu", weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, DTYPES[dtype])
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, DTYPES[weight_dtype or dtype])
    r = torch.randn(*shape, generator=g).to(device, DTYPES[dtype]) if residual else None
    return x, w, r


# ---------------------------------------------------------------- kernel checks
# Plain functions with JSON-able arguments: they run here on CUDA, or in the worker.

def check_attention(lens, n_heads, n_kv_heads, head_dim, causal, dtype, scale=None, fused=False, seed=0,
                    config=None):
    q, k, v, cu = packed_qkv(lens, n_heads, n_kv_heads, head_dim, dtype, seed, DEVICE, fused)
    out = ops.attention_triton(q, k, v, cu, max(lens), causal, scale, config=config and tuple(config))
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    # The oracle: the twin on CPU in fp32, from the same (rounded) inputs.
    ref = ops.attention_torch(*(t.cpu().float() for t in (q, k, v)), cu.cpu(), max(lens), causal, scale)
    torch.testing.assert_close(out.cpu().float(), ref, **ATTN_TOL[dtype])


def check_rms_norm(shape, dtype, residual, weight_dtype=None, seed=0, config=None):
    x, w, r = norm_inputs(shape, dtype, residual, seed, DEVICE, weight_dtype)
    got = ops.rms_norm_triton(x, w, 1e-6, r, config=config and tuple(config))
    want = ops.rms_norm_torch(x.cpu(), w.cpu(), 1e-6, None if r is None else r.cpu())
    if residual:
        (got, got_h), (want, want_h) = got, want
        assert got_h.dtype == x.dtype
        # x + residual is one rounding of the exact sum: bit-exact, except for the
        # interpreter's bf16 rounding.
        exact = CUDA or dtype != "bf16"
        torch.testing.assert_close(got_h.cpu(), want_h, **(dict(atol=0, rtol=0) if exact else NORM_TOL[dtype]))
    assert got.dtype == want.dtype and got.shape == x.shape
    torch.testing.assert_close(got.cpu(), want, **NORM_TOL[dtype])


def check_dispatch_forces_triton():
    q, k, v, cu = packed_qkv([5, 9], 2, 1, 16, "fp32", device=DEVICE)
    before, ops.MODE = ops.MODE, "triton"
    try:
        assert torch.equal(ops.attention(q, k, v, cu, 9, True), ops.attention_triton(q, k, v, cu, 9, True))
        x, w, _ = norm_inputs((3, 40), "fp32", False, device=DEVICE)
        assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_triton(x, w, 1e-6))
    finally:
        ops.MODE = before


def check_attention_with_past(lens, past_lens, n_heads, n_kv_heads, head_dim, dtype, seed=0, config=None):
    """The document cache's attention: each sequence over its cached prefix's keys/values, then itself."""
    q, k, v, cu = packed_qkv(lens, n_heads, n_kv_heads, head_dim, dtype, seed, DEVICE)
    _, pk, pv, pcu = packed_qkv(past_lens, n_heads, n_kv_heads, head_dim, dtype, seed + 1, DEVICE)
    past = ops.Past(pk, pv, pcu)
    out = ops.attention_with_past_triton(q, k, v, cu, max(lens), past, config=config and tuple(config))
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = ops.attention_with_past_torch(*(t.cpu().float() for t in (q, k, v)), cu.cpu(), max(lens),
                                        ops.Past(pk.cpu().float(), pv.cpu().float(), pcu.cpu()))
    torch.testing.assert_close(out.cpu().float(), ref, **ATTN_TOL[dtype])


CHECKS = {f.__name__: f for f in (check_attention, check_attention_with_past, check_rms_norm,
                                  check_dispatch_forces_triton)}


class InterpreterWorker:
    """This file run as a script with TRITON_INTERPRET=1: reads one JSON [check, kwargs]
    per line and answers {"error": traceback or null}."""

    def __init__(self):
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
        env.pop("M0LITE_KERNELS", None)
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def __call__(self, check, **kwargs):
        self.proc.stdin.write(json.dumps([check, kwargs]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"interpreter worker died (exit code {self.proc.wait()})")
        error = json.loads(line)["error"]
        if error:
            pytest.fail(f"{check}({kwargs}) failed under TRITON_INTERPRET=1:\n{error}", pytrace=False)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _serve():
    reply, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the replies
    for line in sys.stdin:
        check, kwargs = json.loads(line)
        try:
            CHECKS[check](**kwargs)
            error = None
        except BaseException:
            error = traceback.format_exc()
        reply.write(json.dumps({"error": error}) + "\n")
        reply.flush()


@pytest.fixture(scope="module")
def run_check():
    """run_check(check_name, **kwargs): on CUDA in-process, else in the interpreter worker."""
    if CUDA:
        yield lambda check, **kwargs: CHECKS[check](**kwargs)
        return
    worker = InterpreterWorker()
    yield worker
    worker.close()


# ---------------------------------------------------------------- Triton kernels vs twins

LENS = [[1], [7], [64], [123], [131], [300], [131, 7, 300, 1, 64, 123]]
# (n_heads, n_kv_heads, head_dim): the decoder's GQA with a group of 3 (not a power of
# two) and the vision tower's head_dim 80 (a 64 + 16 split), with few heads to stay quick;
# the tile tests add head_dim 64.
HEADS = [(3, 1, 128), (2, 2, 80)]
RAGGED = [131, 7, 1, 123]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "{}q{}kv_d{}".format(*h))
@pytest.mark.parametrize("lens", LENS, ids=lambda lens: "+".join(map(str, lens)))
def test_attention_kernel(run_check, lens, heads, causal, dtype):
    run_check("check_attention", lens=lens, n_heads=heads[0], n_kv_heads=heads[1], head_dim=heads[2],
              causal=causal, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_kernel_real_heads(run_check, dtype):
    """The real head layouts: decoder 12 q / 2 kv heads (group 6), d=128, causal; vision 16/16, d=80."""
    lens = [131, 7, 1, 64]
    run_check("check_attention", lens=lens, n_heads=12, n_kv_heads=2, head_dim=128, causal=True, dtype=dtype)
    run_check("check_attention", lens=lens, n_heads=16, n_kv_heads=16, head_dim=80, causal=False, dtype=dtype)


def test_attention_kernel_strided_and_scaled(run_check):
    """q, k, v as views of a fused qkv tensor (token stride 3*heads*d), a custom softmax scale,
    and a sequence of length 0 inside the pack."""
    run_check("check_attention", lens=[70, 129], n_heads=2, n_kv_heads=2, head_dim=80, causal=False,
              dtype="fp16", fused=True)
    run_check("check_attention", lens=[45, 0, 200], n_heads=4, n_kv_heads=2, head_dim=128, causal=True,
              dtype="fp32", scale=0.3)


def table_tiles():
    """Every tile the launcher may pick on its own (the Hopper table, fp32's, the interpreter's),
    and two more the benchmark sweep may: BLOCK_M == BLOCK_N small, and BLOCK_M = 4 * BLOCK_N."""
    from m0lite.kernels import triton_attention as ta  # the kernels import triton: only here
    return sorted({*ta._HALF.values(), ta.FP32, ta.INTERPRET, (32, 32, 4, 1), (64, 16, 4, 2)})


@pytest.mark.parametrize("config", table_tiles(), ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_kernel_tiles(run_check, config, causal):
    """Each tile over odd ragged lengths, for every head_dim split (128, 64 + 16, 64)."""
    for n_heads, n_kv_heads, head_dim in [(2, 1, 128), (1, 1, 80), (1, 1, 64)]:
        run_check("check_attention", lens=RAGGED, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                  causal=causal, dtype="fp16", config=config)


@pytest.mark.parametrize("config", table_tiles(), ids=lambda c: "x".join(map(str, c)))
def test_attention_with_past_kernel_tiles(run_check, config):
    run_check("check_attention_with_past", lens=[131, 1, 64], past_lens=[70, 0, 129], n_heads=6, n_kv_heads=2,
              head_dim=128, dtype="bf16", config=config)
    run_check("check_attention_with_past", lens=[5, 123], past_lens=[200, 1], n_heads=2, n_kv_heads=2,
              head_dim=80, dtype="fp16", config=config)


def test_attention_table_covers_every_call():
    """Every (head_dim, causal, dtype, length) finds a tile, the short bucket takes 64-row tiles
    and BLOCK_M is a multiple of BLOCK_N everywhere."""
    from m0lite.kernels import triton_attention as ta
    for d in (16, 64, 72, 80, 96, 128, 256):
        for causal in (True, False):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for n in (1, 512, ta.SHORT, ta.SHORT + 1, 16384):
                    bm, bn, _, _ = ta.pick_config(d, causal, dtype, n)
                    assert bm % bn == 0
                    if dtype != torch.float32 and d <= 128 and n <= ta.SHORT:
                        assert bm == 64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,past_lens", [([1, 7], [40, 0]), ([131, 5, 64], [3, 200, 77]), ([9, 123], [0, 0]),
                                            ([1, 0, 33], [64, 5, 1])], ids=["short", "mixed", "no-prefix", "empty-seq"])
def test_attention_with_past_kernel(run_check, lens, past_lens, dtype):
    """Cached prefixes of any length (none, shorter or longer than a tile) before new tokens."""
    for n_heads, n_kv_heads, head_dim in [(6, 2, 128), (2, 2, 80), (2, 1, 64)]:
        run_check("check_attention_with_past", lens=lens, past_lens=past_lens, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, head_dim=head_dim, dtype=dtype)


def test_attention_with_past_twin_is_attention_over_the_whole(dtype="fp32"):
    """Attending over a prefix's keys then the rest's equals causal attention over prefix + rest."""
    whole_lens, split = [50, 9, 30], [20, 0, 29]
    q, k, v, cu = packed_qkv(whole_lens, 4, 2, 64, dtype)
    whole = ops.attention_torch(q, k, v, cu, max(whole_lens), True)
    bounds = cu.tolist()
    rest = [(s + p, e) for (s, e), p in zip(zip(bounds[:-1], bounds[1:]), split)]
    idx = torch.cat([torch.arange(s, e) for s, e in rest])
    pidx = torch.cat([torch.arange(s, s + p) for s, p in zip(bounds[:-1], split)])
    past = ops.Past(k[pidx], v[pidx], ops.cu_seqlens(split))
    cu_rest = ops.cu_seqlens([e - s for s, e in rest])
    got = ops.attention_with_past_torch(q[idx], k[idx], v[idx], cu_rest, max(e - s for s, e in rest), past)
    torch.testing.assert_close(got, whole[idx], atol=1e-5, rtol=1e-5)


def test_attention_kernel_empty_input(run_check):
    run_check("check_attention", lens=[0], n_heads=2, n_kv_heads=1, head_dim=64, causal=True, dtype="fp32")


@pytest.mark.skipif(not CUDA, reason="sizes too large for the interpreter")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_attention_kernel_long_cuda(dtype):
    check_attention([2048, 513, 1, 1000], 12, 2, 128, True, dtype)
    check_attention([3136, 256, 1024], 16, 16, 80, False, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("hidden", [1536, 1280, 1000, 37])
def test_rms_norm_kernel(run_check, hidden, residual, dtype):
    run_check("check_rms_norm", shape=[3, 5, hidden], dtype=dtype, residual=residual)


@pytest.mark.parametrize("config", [(2, 4), (4, 8), (16, 8)], ids=lambda c: "{}rows_{}warps".format(*c))
def test_rms_norm_kernel_rows_per_program(run_check, config):
    """Several rows a program, with a last program only partly filled (7 and 37 rows)."""
    run_check("check_rms_norm", shape=[7, 1536], dtype="bf16", residual=True, config=config)
    run_check("check_rms_norm", shape=[37, 1280], dtype="fp32", residual=False, config=config)
    run_check("check_rms_norm", shape=[5, 1000], dtype="fp16", residual=True, config=config)


def test_rms_norm_config_choice():
    from m0lite.kernels import triton_rms_norm as tr
    assert tr.pick_config(1536, 65536) == (4, 8) and tr.pick_config(1280, 16384) == (4, 8)
    assert tr.pick_config(1536, 1)[0] == 1


def test_rms_norm_kernel_mixed_dtypes_and_edge_rows(run_check):
    # An fp32 weight over bf16 activations gives an fp32 result (torch's promotion).
    run_check("check_rms_norm", shape=[4, 1536], dtype="bf16", residual=True, weight_dtype="fp32")
    run_check("check_rms_norm", shape=[1, 1280], dtype="fp16", residual=False)
    run_check("check_rms_norm", shape=[0, 1280], dtype="fp32", residual=True)


@pytest.mark.skipif(not CUDA, reason="sizes too large for the interpreter")
def test_rms_norm_kernel_many_rows_cuda():
    check_rms_norm([65536, 1536], "bf16", True)
    check_rms_norm([4097, 1280], "fp16", False)


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile the kernels for the real device")
def test_kernels_compile_for_hopper():
    """The interpreter never compiles. Lower the kernels to sm_90 machine code (no GPU
    needed), so that what only the compiler rejects shows up on a CPU-only machine too:
    the decoder's and the vision tower's bf16 tiles (with a prefix for the decoder), and
    RMSNorm. bench/lower_sm90.py lowers every config and reports registers and spills."""
    attention_module = importlib.import_module("m0lite.kernels.triton_attention")
    if not isinstance(attention_module._attn_fwd, triton_jit_function()):
        pytest.skip("kernels were imported under TRITON_INTERPRET=1 in this process")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        lower_sm90 = importlib.import_module("lower_sm90")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cases = [c for c in lower_sm90.attention_cases(quick=True) if "d128 causal" in c[0] or "d80 bidir" in c[0]]
    cases += list(lower_sm90.rms_cases(quick=True))[:1]
    for label, kernel, pointers, constexprs, options in cases:
        regs, spill_stores, _, _ = lower_sm90.resources(lower_sm90.lower(kernel, pointers, constexprs, **options))
        assert spill_stores == 0, f"{label}: {regs} registers, {spill_stores} bytes of spill stores"


# ---------------------------------------------------------------- twins vs naive formulas

@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 2e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("heads", [(12, 2, 128), (16, 16, 80), (3, 1, 64)], ids=lambda h: "{}q{}kv_d{}".format(*h))
def test_attention_twin_matches_naive(heads, causal, dtype, tol):
    lens = [131, 7, 1, 64, 123]
    q, k, v, cu = packed_qkv(lens, *heads, dtype)
    out = ops.attention_torch(q, k, v, cu, max(lens), causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, cu, causal), atol=tol, rtol=tol)
    # A custom scale reaches the softmax.
    out = ops.attention_torch(q, k, v, cu, max(lens), causal, scale=0.05)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, cu, causal, 0.05), atol=tol, rtol=tol)


def test_attention_naive_oracle_can_fail():
    """The oracle is sensitive to the packing: attending across sequences is caught."""
    q, k, v, cu = packed_qkv([10, 10], 2, 2, 16, "fp32")
    whole = ops.attention_torch(q, k, v, torch.tensor([0, 20], dtype=torch.int32), 20, False)
    assert not torch.allclose(whole.double(), naive_attention(q, k, v, cu, False), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_twin_matches_transformers(dtype, residual):
    qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
    x, w, r = norm_inputs((4, 7, 1536), dtype, residual)
    ref = qwen2.Qwen2RMSNorm(1536, eps=1e-6).to(DTYPES[dtype])
    with torch.no_grad():
        ref.weight.copy_(w)
        h = x if r is None else r + x  # the decoder layer's `residual + hidden_states`
        want = ref(h)
    got = ops.rms_norm_torch(x, w, 1e-6, r)
    if residual:
        got, got_h = got
        assert torch.equal(got_h, h)
    assert torch.equal(got, want)
    # And against the formula in fp64 (what both should approximate).
    h64 = h.double()
    naive = w.double() * h64 / (h64.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(got.double(), naive, **NORM_TOL[dtype])


# ---------------------------------------------------------------- dispatch and input checks

def test_dispatch(monkeypatch):
    calls = []
    for name in ("attention_triton", "attention_torch", "rms_norm_triton", "rms_norm_torch"):
        monkeypatch.setattr(ops, name, lambda *a, _name=name: calls.append(_name))
    x = torch.zeros(2, 4)
    for mode, want in [("torch", "torch"), ("triton", "triton"), ("auto", "torch")]:
        monkeypatch.setattr(ops, "MODE", mode)
        calls.clear()
        ops.attention(x, x, x, None, 1, True)
        ops.rms_norm(x, x[0], 1e-6)
        assert calls == [f"attention_{want}", f"rms_norm_{want}"], mode
    monkeypatch.setattr(ops, "MODE", "cuda")
    with pytest.raises(ValueError, match="M0LITE_KERNELS"):
        ops.rms_norm(x, x[0], 1e-6)


def test_dispatch_default_is_twin_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "MODE", "auto")
    q, k, v, cu = packed_qkv([5, 9], 4, 2, 16, "fp32")
    assert torch.equal(ops.attention(q, k, v, cu, 9, True), ops.attention_torch(q, k, v, cu, 9, True))
    x, w, r = norm_inputs((3, 40), "fp16", True)
    for got, want in zip(ops.rms_norm(x, w, 1e-6, r), ops.rms_norm_torch(x, w, 1e-6, r)):
        assert torch.equal(got, want)


def test_dispatch_forced_triton_runs_kernels(run_check):
    run_check("check_dispatch_forces_triton")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    attention_module = importlib.import_module("m0lite.kernels.triton_attention")
    if not isinstance(attention_module._attn_fwd, triton_jit_function()):
        pytest.skip("kernels were imported under TRITON_INTERPRET=1 in this process")
    monkeypatch.setattr(ops, "MODE", "triton")
    q, k, v, cu = packed_qkv([5], 2, 2, 16, "fp32")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.attention(q, k, v, cu, 5, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.rms_norm(q, torch.ones(16), 1e-6)


def triton_jit_function():
    from triton.runtime.jit import JITFunction
    return JITFunction


@pytest.mark.parametrize("bad,match", [
    (dict(cu_dtype=torch.int64), "int32"),
    (dict(k_dim=64), "head_dim"),
    (dict(n_kv_heads=5), "multiple"),
    (dict(k_dtype=torch.float16), "fp16/bf16/fp32"),
    (dict(q_dtype=torch.float64, k_dtype=torch.float64), "fp16/bf16/fp32"),
    (dict(k_tokens=9), "tokens"),
    (dict(transposed_q=True), "contiguous"),
    (dict(q_ndim=4), "tokens, heads, head_dim"),
])
def test_attention_rejects_bad_input(bad, match):
    q = torch.randn(10, 12, 128, dtype=bad.get("q_dtype", torch.float32))
    if bad.get("transposed_q"):
        q = torch.randn(10, 128, 12).transpose(1, 2)
    if bad.get("q_ndim"):
        q = q[None]
    k = torch.randn(bad.get("k_tokens", 10), bad.get("n_kv_heads", 2), bad.get("k_dim", 128),
                    dtype=bad.get("k_dtype", torch.float32))
    cu = torch.tensor([0, 4, 10], dtype=bad.get("cu_dtype", torch.int32))
    with pytest.raises(ValueError, match=match):
        ops.attention_triton(q, k, k.clone(), cu, 6, True)


def test_rms_norm_rejects_bad_input():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm_triton(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm_triton(x, torch.ones(64), 1e-6, residual=x.half())
    with pytest.raises(ValueError, match="contiguous"):
        ops.rms_norm_triton(torch.randn(64, 4).t(), torch.ones(64), 1e-6)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
