"""Lean mode: int8 weights, symmetric per output channel, in every linear of both towers. Lossy, opt-in.

`Int8Linear` holds `weight` (out, in) int8 and `weight_scale` (out,) fp32, with
W ~= weight_scale[:, None] * weight, the scale of each output channel set by its
largest |w| (max |w| -> 127). It computes in one of two ways, chosen at load:

- "dynamic": int8 x int8. Each row (token or patch) of the activations is quantised
  on the fly with its own scale (max |x| -> 127), stored as uint8 around 128 for
  oneDNN's u8 x s8 kernels (AVX512-VNNI, AVX-VNNI, AMX-INT8), and the int32 products
  are scaled back by (row scale x channel scale). The weights are laid out for
  oneDNN once; a decoder layer's linears that read one input (q, k and v; gate and
  up) are laid out side by side as one matmul (`SharedInput`). Without VNNI or AMX
  (AVX2 and AVX-512 CPUs before them) oneDNN multiplies with vpmaddubsw, which adds
  two u8 x s8 products in int16 with saturation: full-range codes would come out
  wrong, so there the activations get 7-bit codes (max |x| -> 63, around 64), whose
  products are exact, for twice the activations' rounding (`activation_bits`). There
  oneDNN also lays each weight out again on every call, so the MLPs, most of the
  weights, take another way to the same integer products in the decoder: the weight
  first, as stored, through torch._int_mm, their activations feature-major between
  their two matmuls (`FeatureMajor`, `feature_major_mlp`).
- "weight-only": the int8 weight is expanded to the activations' dtype inside each
  call and multiplied as usual: half the weight memory, no int8 arithmetic. For
  devices without oneDNN's exact int8 kernels (CUDA, CPUs without AVX2).

Two linears, the MLPs' second (`ROTATED`), quantise a rotated input. Their input is an
activation's output, the SwiGLU product in the decoder (heavy-tailed: a row's largest |x| is
many times its rms) and QuickGELU's in the vision tower (off-centre), so one row's scale, set
by its largest |x|, leaves the others few codes; in the decoder this linear's error was the
largest by far (bench/RESULTS.md, "Lean mode, fourth pass"). Each block of ROTATION_BLOCK
input features is turned by R = diag(signs) H, H the Sylvester-Hadamard matrix (H H^T = B I), which spreads a large
feature and a common offset over the block. y = (x R)(W R / B)^T = x W^T: the weight
is stored rotated (W R / B, in fp32, then quantised) and only x R runs per call, a
matmul by a (B, B) matrix of +-1, exact in bf16, that costs a few per cent of the linear's.
(QuaRot and SpinQuant rotate all inputs alike; the others here gain nothing measurable.)

The token embeddings are int8 too, with one scale per token (`Int8Embedding`): a
lookup expands only the rows a batch reads. What stays in the model's dtype, and
why: the norms, the score head (two small matmuls over one token per pair, which
set the score directly), the patch embedding (a Conv3d in the checkpoint over
raw pixels: a sliver of the weights) and the patch merger (a small share of the weights
and of a page's time; after the last block, its error reaches the visual tokens undamped:
bench/RESULTS.md, "Lean mode, fourth pass", has the figures).

A checkpoint written by `m0lite quantize` (weights/quantized.py) stores each quantised
linear's `weight` as int8 and its `weight_scale` beside it, and says so in
config.json (`quantization_config`); the loader then builds the int8 layers and
checks every tensor as strictly as any other.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu
from ..errors import InputError
from ..memory import LookupPages, convert_pending, file_mappings, populate, release_mapped_pages, trim_heap
from . import chunked
from .epilogue import EpilogueLinear
from .onednn import CHUNK_ROWS

# The linears whose input is rotated (see the module docstring), by name in their MLP; R's block size and the
# bits of its signs (bit i set: row i negated), a fixed pattern that is no row of H.
ROTATED, ROTATION_BLOCK, ROTATION_SIGNS = ("down_proj", "fc2"), 32, 0x6A09E667
QUANT_CONFIG = {"quant_method": "m0lite", "weights": "int8", "scheme": "symmetric, per output channel",
                "scale_suffix": "weight_scale",
                "rotated_inputs": {"linears": list(ROTATED), "block": ROTATION_BLOCK, "signs": hex(ROTATION_SIGNS),
                                   "weights": "W R / block, R = diag(signs) Hadamard(block)"}}
COMPUTE = ("dynamic", "weight-only")
# CPU flags of the instructions oneDNN's u8 x s8 kernels multiply with, int8 dot products into int32 first; "auto"
# picks "dynamic" where one is present (without VNNI or AMX, 7-bit activations: see activation_bits).
INT8_UNITS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2")
# The decoder layer's linears that read one input, run as one matmul in "dynamic" (SharedInput).
SHARED_INPUTS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def signed_codes(x: torch.Tensor, bits: int = 8, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int8 codes, fp32 scales with `dim` kept): x ~= codes * scale, the largest |x| of each slice along
    `dim` (a row of (rows, in) for dim=1, a column of feature-major (in, rows) for dim=0) at 2^(bits-1) - 1
    (127 for 8 bits, 63 for 7)."""
    # Each step in x's dtype: torch's CPU kernels that mix bf16 and fp32 operands, or cast to uint8, are
    # several times slower. The multiplier is top / max |x| less a bf16 half-step, so that rounded into x's
    # dtype it is still at most top / max |x|: no |x * multiplier| exceeds top, even rounded, and no clamp
    # is needed. The scale returned is the exact inverse of the multiplier used. In bf16 x * multiplier is
    # rounded twice (to bf16, then to an integer): at most 0.75 of a code off instead of 0.5, and only for
    # |code| >= 64, where bf16's spacing is 0.5.
    top = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim, keepdim=True).float().clamp_min_(1e-30)
    multiplier = amax.reciprocal_().mul_(top * (1 - 2**-8)).clamp_max_(torch.finfo(x.dtype).max).to(x.dtype)  # <= top / max |x|
    return torch.mul(x, multiplier).round_().to(torch.int8), multiplier.float().reciprocal_()


def quantize_rows(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, in) -> (uint8 codes around 2^(bits-1), (rows, 1) fp32 scales): signed_codes' of each row, as
    uint8 with that zero point because oneDNN's fast int8 kernels are u8 x s8."""
    top = 2 ** (bits - 1) - 1
    codes, scale = signed_codes(x, bits)
    # 8 bits: c + 128 as uint8 is c's int8 bit pattern with the top bit flipped; 7 bits: c + 64 is in 1..127.
    codes = codes.view(torch.uint8).bitwise_xor_(128) if bits == 8 else codes.add_(top + 1).view(torch.uint8)
    return codes, scale


def extremes(rows: int, k: int, top: int) -> torch.Tensor:
    """(rows, k) int8 of +top, every other row -top: the largest products of either sign, where int16 sums
    saturate (the exactness probes' operands)."""
    x = torch.full((rows, k), top, dtype=torch.int8)
    x[1::2] = -top
    return x


def exact_at(bits: int) -> bool:
    """Whether oneDNN's u8 x s8 matmul gives the exact integer products for `bits`-bit activation codes, on
    the largest codes against the largest weights of either sign (where int16 sums saturate), at a chunk's
    row count."""
    top, rows, k = 2 ** (bits - 1) - 1, CHUNK_ROWS, 256
    w, codes = extremes(32, k, 127), extremes(rows, k, top)
    u, _ = quantize_rows(codes.float(), bits)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, [rows, k])
        y = torch.ops.onednn.qlinear_pointwise(u, 1.0, top + 1, packed, torch.ones(32), zero_points(32),
                                               None, 1.0, 0, torch.float32, "none", [], "")
    except RuntimeError:  # a build whose oneDNN has no int8 kernel for this CPU
        return False
    return torch.equal(y.double(), codes.double() @ w.double().t())  # |products| < 2^24: exact in fp32


@functools.cache
def activation_bits() -> int | None:
    """The activations' code width for "dynamic" on this machine: 8 where oneDNN's u8 x s8 kernels multiply
    exactly (VNNI's and AMX's int8 dot products add into int32), 7 where they use vpmaddubsw (AVX2 and
    AVX-512 without VNNI), which adds two u8 x s8 products in int16 with saturation (255 * 127 * 2 > 32767;
    127 * 127 * 2 fits), None where neither is exact. Measured rather than read from the CPU's flags, so
    that it also holds where oneDNN is told to use less than the CPU has (ONEDNN_MAX_CPU_ISA)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return None
    return next((bits for bits in (8, 7) if exact_at(bits)), None)


@functools.cache
def rotation(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """R = diag(signs) H (block, block) for a power of two `block`: entries +-1, R R^T = block I."""
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    signs = torch.tensor([-1.0 if ROTATION_SIGNS >> i & 1 else 1.0 for i in range(block)])
    return (signs[:, None] * h).to(dtype=dtype, device=device)


def rotation_block(features: int) -> int:
    """R's size for a linear of `features` inputs: the largest power of two that divides both ROTATION_BLOCK
    and `features` (32 for every size of the published model)."""
    return math.gcd(ROTATION_BLOCK, features)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> x R over each block of rotation_block(in) input features (ROTATED)."""
    block = rotation_block(x.shape[-1])
    return torch.matmul(x.reshape(-1, block), rotation(block, x.dtype, x.device)).view(x.shape)


def codes_matmul(codes: torch.Tensor, bits: int, packed, weight_scale, zero_points, dtype) -> torch.Tensor:
    """Quantised rows (quantize_rows' codes) times a weight laid out by qlinear_prepack, int8 x int8, each output
    channel scaled, in `dtype`: x W^T but for the rows' scales (scale_rows)."""
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 2 ** (bits - 1), packed, weight_scale, zero_points,
                                              None, 1.0, 0, dtype, "none", [], "")


def scale_rows(y: torch.Tensor, row_scale: torch.Tensor, bias=None, residual=None) -> torch.Tensor:
    """y * row_scale (+ bias) (+ residual), in place on y: codes_matmul's output made the linear's."""
    # The row scale, in y's dtype (see quantize_rows), and the first addend in one pass (addcmul computes in
    # fp32 and rounds once); oneDNN cannot add the bias itself, as it comes after the row scale.
    row_scale = row_scale.to(y.dtype)
    if residual is not None:
        torch.addcmul(residual, y, row_scale, out=y)
        return y if bias is None else y.add_(bias)
    return y.mul_(row_scale) if bias is None else torch.addcmul(bias, y, row_scale, out=y)


QUANTIZE_ROWS = 64  # rows of a weight quantised together: 64 x 8960 fp32 is 2.2 MiB


def quantize_weight(w: torch.Tensor, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 codes (out, in) and fp32 scales (out,): symmetric per output channel,
    a row's largest |w| -> 127. rotated: W R / block is what is quantised (ROTATED). Computed in fp32 from
    the weight's own values, whatever the model's dtype, so that a weight quantised at load and one read
    from `m0lite quantize`'s checkpoint are the same codes; one fp32 copy of one weight at a time."""
    w = w.detach()
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    # A few rows at a time, so that the fp32 copy and every step over it stay in cache (the whole weight at
    # once made each step a pass through memory, and loading spent most of its time here).
    for i in range(0, w.shape[0], QUANTIZE_ROWS):
        rows = w[i:i + QUANTIZE_ROWS].to(torch.float32, copy=True)  # divided in place below
        if rotated:  # W R / block: x R times it is x W^T
            rows = rotate(rows).div_(rotation_block(w.shape[1]))
        s = torch.linalg.vector_norm(rows, float("inf"), dim=1).clamp_min_(torch.finfo(torch.float32).tiny).div_(127)
        scale[i:i + QUANTIZE_ROWS] = s
        codes[i:i + QUANTIZE_ROWS] = rows.div_(s[:, None]).round_().clamp_(-127, 127)  # integral: the cast is exact
    return codes, scale


class Int8Linear(EpilogueLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 rotated: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rotated = rotated  # the weight is W R / block, and x R is what it multiplies (ROTATED)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._packed = None  # "dynamic": the SharedInput that holds the weight in oneDNN's layout

    @classmethod
    def quantized(cls, lin: nn.Linear, rotated: bool = False) -> "Int8Linear":
        # The bias keeps its dtype: the weight may still be the file's own tensor (the loader's vision tower).
        dtype = lin.weight.dtype if lin.bias is None else lin.bias.dtype
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype, lin.weight.device, rotated)
        q.weight, q.weight_scale = quantize_weight(lin.weight, rotated)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return q

    @property
    def compute(self) -> str:
        """"dynamic" once `prepack`ed, else "weight-only"."""
        return "weight-only" if self._packed is None else "dynamic"

    def rewrite(self, out_order=None, weight_scale: float = 1.0, bias_scale: float = 1.0,
                mapped: list[tuple[int, int]] = ()) -> "Int8Linear":
        """In place: outputs in the order `out_order`, weight and bias scaled (chunked.py's vision rewrites).
        Exact on the int8 values: only the per-channel scales and the bias change. A reordered weight is a
        copy: the pages of a memory-mapped original (inside `mapped`) are handed back."""
        if out_order is not None:
            order = torch.tensor(out_order, device=self.weight.device)
            weight, self.weight, self.weight_scale = self.weight, self.weight[order], self.weight_scale[order]
            release_mapped_pages(weight, mapped)
            if self.bias is not None:
                self.bias = nn.Parameter(self.bias[order], requires_grad=False)
        self.weight_scale = self.weight_scale * weight_scale
        if self.bias is not None and bias_scale != 1.0:
            self.bias = nn.Parameter(self.bias * bias_scale, requires_grad=False)
        return self

    def prepack(self, mapped: list[tuple[int, int]]) -> None:
        """Lay the weight out for oneDNN's int8 kernels and drop the plain copy (for "dynamic")."""
        SharedInput([self], mapped)

    def forward(self, x):
        x = rotate(x) if self.rotated else x
        if self._packed is None:  # weight-only
            w = self.weight.to(x.dtype).mul_(self.weight_scale.to(x.dtype)[:, None])
            return F.linear(x, w, self.bias)
        shape = x.shape
        y = self._packed.output(x if x.dim() == 2 else x.reshape(-1, self.in_features), self)
        return y.view(*shape[:-1], self.out_features)

    def add(self, x, other):
        """(x W^T + b) + other, the residual added in the pass that scales the rows (a lone linear's
        SharedInput, on the fast forms' 2-D chunks)."""
        packed = self._packed
        if packed is None or len(packed.spans) > 1 or x.dim() != 2:
            return super().add(x, other)
        return packed.matmul(rotate(x) if self.rotated else x, residual=other)


@functools.cache
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def zero_points(n: int) -> torch.Tensor:
    """The weights' zero points (n,), all 0 (symmetric int8): views of a few shared tensors (one per power of
    two), as each weight's own (int64, as oneDNN takes them) would hold 8 MiB over both towers' output channels."""
    return _zeros(1 << max(n - 1, 0).bit_length())[:n]


class SharedInput:
    """The weights of one int8 linear laid out for oneDNN, or of several that read the same input one after
    another in a fast form (q, k and v; gate and up) laid out side by side as one matmul, so that the input
    is quantised once and the narrow k and v run inside q's matmul. A member's call computes every member's
    output and keeps it, on this thread, for the others' calls on the same input tensor; each member's part
    is handed out once (its epilogue may write to it), a second call computes afresh. Sound because no
    caller changes an input in place between two projections of it (inference tensors keep no version
    counter to check)."""

    def __init__(self, members: list[Int8Linear], mapped: list[tuple[int, int]]):
        if len({m.bias is None for m in members}) != 1 or len({m.in_features for m in members}) != 1:
            raise ValueError("SharedInput: members must have the same input size and all or none a bias")
        for m in members:  # a weight still in its file read whole at once, not a page fault at a time
            populate(m.weight, mapped)
        weight = members[0].weight if len(members) == 1 else torch.cat([m.weight for m in members])  # no copy of one
        # The input shape of a chunk (chunked.py) as oneDNN's hint: the same layout and results at every row
        # count, and a faster prepack than without a hint (most of the time it takes to load; bench/RESULTS.md).
        self.packed = torch.ops.onednn.qlinear_prepack(weight, [CHUNK_ROWS, weight.shape[1]])
        # Copies (cat, or clone for one), so that no page of a mapped checkpoint stays resident for them.
        self.weight_scale = torch.cat([m.weight_scale for m in members])
        self.zero_points = zero_points(self.weight_scale.numel())
        self.bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        self.bits = activation_bits()
        if self.bits is None:
            raise RuntimeError("oneDNN's int8 matmul is exact at no activation width on this machine; use int8_compute='weight-only'")
        self.spans, start = {}, 0
        for m in members:
            self.spans[id(m)] = (start, start + m.out_features)
            start += m.out_features
            for t in (m.weight, m.weight_scale, m.bias):
                if t is not None:
                    release_mapped_pages(t, mapped)
            m.weight, m._packed = None, self
        self._kept = threading.local()

    def output(self, x: torch.Tensor, member: Int8Linear) -> torch.Tensor:
        kept = self._kept
        if getattr(kept, "x", None) is not x or kept.ptr != x.data_ptr() or id(member) in kept.taken:
            kept.x, kept.ptr, kept.taken = x, x.data_ptr(), set()
            kept.y = self.matmul(x)
        kept.taken.add(id(member))
        start, end = self.spans[id(member)]
        y = kept.y[:, start:end]
        if len(kept.taken) == len(self.spans):  # all handed out: keep nothing alive
            kept.x = kept.y = None
        return y

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's output of rows x side by side, but for the rows' scales and the bias (scale_rows);
        and the rows' scales (rows, 1)."""
        codes, row_scale = quantize_rows(x, self.bits)
        return codes_matmul(codes, self.bits, self.packed, self.weight_scale, self.zero_points, x.dtype), row_scale

    def of_codes(self, codes, row_scale, dtype, residual=None) -> torch.Tensor:
        """The output of rows already quantised to this weight's code width (quantize_rows), plus `residual`."""
        y = codes_matmul(codes, self.bits, self.packed, self.weight_scale, self.zero_points, dtype)
        return scale_rows(y, row_scale, self.bias, residual)

    def matmul(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        """Every member's output of rows x side by side, plus `residual` (rows, out) if given."""
        y, row_scale = self.unscaled(x)
        return scale_rows(y, row_scale, self.bias, residual)


@functools.cache
def first_weight_exact(bits: int) -> bool:
    """Whether torch._int_mm(W, codes^T), the weight first, gives the exact integer products for `bits`-bit
    activation codes, on the largest codes of either sign against the largest weights of either sign, at one row
    (a matrix-vector kernel of its own), a few and a chunk's. oneDNN computes s8 x s8 as u8 x s8 after adding 128
    to the first operand; without VNNI vpmaddubsw's int16 sums of two products then hold while the second
    operand's codes have 7 bits (2 * 255 * 63 < 2^15), not 8 (and at one row under AVX-512 without VNNI, not
    even 7)."""
    top, k = 2 ** (bits - 1) - 1, 256
    w = extremes(64, k, 127)
    for rows in (1, 2, 32, CHUNK_ROWS):
        codes = extremes(rows, k, top)
        for c in (codes, -codes):
            try:
                y = torch._int_mm(w, c.t())
            except RuntimeError:
                return False
            if not torch.equal(y.double(), w.double() @ c.double().t()):
                return False
    return True


@functools.cache
def feature_major() -> bool:
    """Whether the decoder's MLPs run as `FeatureMajor`: where oneDNN's int8 kernel is AVX2's (7-bit activations,
    no AVX-512), which lays its weight out again on every call, and the weight-first product is exact. With
    AVX-512, VNNI or AMX, oneDNN's kernels read the layout prepared at load and stay as fast or faster (AVX-512
    without VNNI: 3.4 against 4.2 ms at 32 rows; bench/RESULTS.md, "The lean mode without VNNI")."""
    return activation_bits() == 7 and not any(f.startswith("avx512") for f in cpu.flags()) and first_weight_exact(7)


class FeatureMajor:
    """One int8 linear as torch._int_mm(weight, codes^T): the weight first, as stored, and the product (out,
    rows), feature-major. Nothing is laid out at load (the file's int8 tensor is the weight) and nothing again
    per call, where oneDNN's AVX2 kernel lays out its weight on every call: 1.6x as fast at 32 rows, 8%
    at 1,024 (bench/RESULTS.md, "Short passes in the lean mode"). The MLPs keep their activations feature-major
    between their two matmuls (`feature_major_mlp`); a lone call turns its product into rows."""

    def __init__(self, member: Int8Linear):
        self.weight, self.weight_scale, self.bias = member.weight, member.weight_scale, member.bias
        self.bits = activation_bits()
        self.spans = {id(member): (0, member.out_features)}
        member._packed = self

    def scaled(self, y: torch.Tensor, start: int, end: int, col_scale: torch.Tensor, dtype) -> torch.Tensor:
        """Output features start..end, feature-major in `dtype`, of y (its integer products with rows' codes
        (out, rows), signed_codes' of each row) and the rows' scales (1, rows): the same operations in the same
        order as codes_matmul, then scale_rows."""
        y = torch.mul(y[start:end], self.weight_scale[start:end, None]).to(dtype)  # int32 * fp32: fp32, one rounding
        return scale_rows(y, col_scale, None if self.bias is None else self.bias[start:end, None])

    def rows(self, codes_t: torch.Tensor, row_scale: torch.Tensor, dtype, residual=None) -> torch.Tensor:
        """The output (rows, out) in `dtype`, a transposed view, of codes_t (in, rows) (signed_codes' of each
        row) and the rows' scales (rows, 1), plus `residual`: codes_matmul, then scale_rows."""
        y = torch._int_mm(self.weight, codes_t).t().float().mul_(self.weight_scale).to(dtype)
        return scale_rows(y, row_scale, self.bias, residual)

    def output(self, x: torch.Tensor, member: Int8Linear) -> torch.Tensor:
        return self.matmul(x)

    def matmul(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        """Rows x times the weight, plus `residual` (rows, out) if given."""
        codes, row_scale = signed_codes(x, self.bits)
        return self.rows(codes.t(), row_scale, x.dtype, residual).contiguous()


class Int8Embedding(nn.Module):
    """A token embedding table in int8, one scale per token: `weight` (vocab, dim) int8, `weight_scale`
    (vocab,) fp32; a lookup expands the rows it reads, in fp32 (the model casts them to its dtype)."""

    def __init__(self, vocab: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab, dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(vocab, dtype=torch.float32, device=device))
        self.hand_back = LookupPages()  # as the exact mode's Embedding

    @classmethod
    def quantized(cls, emb: nn.Module) -> "Int8Embedding":
        q = cls(*emb.weight.shape, emb.weight.device)
        q.weight, q.weight_scale = quantize_weight(emb.weight)  # one scale per token
        return q

    def forward(self, ids):
        rows = F.embedding(ids, self.weight).float() * self.weight_scale[ids, None]
        self.hand_back(self.weight)
        return rows


def _linears(tower: nn.Module):
    """(parent, name, module) of every linear of a tower (the decoder or the vision tower) that the int8 mode
    quantises: all but the vision tower's patch embedding and merger (see the module docstring)."""
    skip = {m for name in ("patch_embed", "merger") if hasattr(tower, name) for m in getattr(tower, name).modules()}
    for parent in tower.modules():
        if parent in skip:
            continue
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, Int8Linear)):
                yield parent, name, child


def quantized_weights(tower: nn.Module, prefix: str = "") -> dict[str, bool]:
    """Weight name (prefix + the tower's own name) -> rotated, of every weight `quantize(tower)` makes int8."""
    names = {m: f"{prefix}{name}." if name else prefix for name, m in tower.named_modules()}
    out = {f"{names[parent]}{name}.weight": name in ROTATED for parent, name, _ in _linears(tower)}
    if hasattr(tower, "embed_tokens"):
        out[f"{prefix}embed_tokens.weight"] = False
    return out


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def quantize(tower: nn.Module) -> None:
    """Every linear of the tower (but the patch embedding) -> Int8Linear, weight-only until `prepare`.
    On the meta device this only builds the structure, for the loader to fill."""
    mapped = file_mappings()
    for parent, name, lin in list(_linears(tower)):
        if isinstance(lin, Int8Linear):
            continue
        rotated = name in ROTATED
        if lin.weight.is_meta:
            q = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype, "meta", rotated)
        else:
            q = Int8Linear.quantized(lin, rotated)
            release_mapped_pages(lin.weight, mapped)  # from now on only the int8 copy is read
        setattr(parent, name, q)
    emb = getattr(tower, "embed_tokens", None)  # the decoder's
    if emb is not None and not isinstance(emb, Int8Embedding):
        if emb.weight.is_meta:
            tower.embed_tokens = Int8Embedding(*emb.weight.shape, "meta")
        else:
            tower.embed_tokens = Int8Embedding.quantized(emb)
            release_mapped_pages(emb.weight, mapped)


def int8_unit() -> str | None:
    """The first of INT8_UNITS this CPU has that oneDNN multiplies with here (its /proc/cpuinfo name), or None:
    "avx2" (vpmaddubsw, in AVX2 and AVX-512 alike) where the activations take 7 bits, whatever the CPU has."""
    units = [unit for unit in INT8_UNITS if unit in cpu.flags()]
    return next((unit for unit in units if activation_bits() != 7 or unit == "avx2"), None)


def describe(compute: str) -> str:
    """How a model in this compute multiplies here, for logs and benchmark tables."""
    if compute != "dynamic":
        return f"{compute}: int8 weights expanded per call"
    return f"dynamic: int8 x int8 on {int8_unit() or 'no int8 unit'}, {activation_bits()}-bit activations"


def resolve_compute(compute: str, device: torch.device) -> str:
    """"auto": "dynamic" on a CPU with an int8 unit (INT8_UNITS) where oneDNN's int8 matmul is exact at some
    activation width, else "weight-only"."""
    if compute not in ("auto", *COMPUTE):
        raise InputError(f"int8_compute must be 'auto', 'dynamic' or 'weight-only', got {compute!r}")
    can = device.type == "cpu" and activation_bits() is not None
    if compute == "auto":
        return "dynamic" if can and int8_unit() else "weight-only"
    if compute == "dynamic" and not can:
        raise InputError(f"int8_compute='dynamic' needs oneDNN's int8 kernels, exact on this CPU, not {device}")
    return compute


STAGE_ROWS = CHUNK_ROWS  # rows of the work between two int8 matmuls done at once: (256, 17,920) stays in cache


def staged_codes(stage, rows: int, features: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(stage(s, e)) of rows s..e, STAGE_ROWS rows at a time, into one (rows, features) block of
    codes and (rows, 1) scales: the next int8 matmul's input."""
    codes = torch.empty((rows, features), dtype=torch.uint8)
    scales = torch.empty((rows, 1), dtype=torch.float32)
    for s in range(0, rows, STAGE_ROWS):
        e = min(s + STAGE_ROWS, rows)
        codes[s:e], scales[s:e] = quantize_rows(stage(s, e), bits)
    return codes, scales


# The MLPs of the fast forms (chunked.swiglu_add, chunked.quick_gelu_add) on "dynamic" int8 linears (prepare):
# each matmul over all the rows it is given, and the work between the two, the row scales, the activation, the
# rotation and the second matmul's quantisation, STAGE_ROWS rows at a time, where it stays in cache. In 16 bits
# a chunk is one stage; in fp32 the fast forms run many more rows at once, and those passes over a (rows,
# 17,920) activation went through memory at a fifth of the speed (bench/RESULTS.md, "The lean mode in fp32").
# The same operations in the same order as the EpilogueLinear forms: the same values, fp32 rounding apart (an
# elementwise kernel may round a value differently over fewer rows).

FEATURE_STAGE = 256  # features of a feature-major MLP's work between its matmuls at once: (256, 256) in cache


def feature_major_mlp(first: list[FeatureMajor], act, second: FeatureMajor, rotated: bool, h, res):
    """res + second(act(*first(h))) on FeatureMajor linears, CHUNK_ROWS rows at a time, feature-major in between
    (the staged MLPs' work, FEATURE_STAGE features at a time): the second product's input is then already
    the (in, rows) its weight-first matmul reads, and only its narrow output is turned into rows."""
    out, bits = torch.empty_like(res), second.bits
    width = first[0].weight.shape[0]
    block = rotation_block(width)
    r_t = rotation(block, h.dtype, h.device).t()  # x R for each row's block of features: R^T x, feature-major
    for s in range(0, h.shape[0], CHUNK_ROWS):
        e = min(s + CHUNK_ROWS, h.shape[0])
        codes, scale = signed_codes(h[s:e], bits)
        ys = [torch._int_mm(f.weight, codes.t()) for f in first]  # (width, rows) int32 each
        mid = torch.empty((width, e - s), dtype=h.dtype)
        for a in range(0, width, FEATURE_STAGE):
            b = min(a + FEATURE_STAGE, width)
            v = act(*(f.scaled(y, a, b, scale.t(), h.dtype) for f, y in zip(first, ys)))
            if rotated:
                torch.matmul(r_t, v.view(-1, block, e - s), out=mid[a:b].view(-1, block, e - s))
            else:
                mid[a:b] = v
        codes, scale = signed_codes(mid, bits, dim=0)
        out[s:e] = second.rows(codes, scale.t(), h.dtype, res[s:e])
    return out


def _swiglu(g, u):
    return F.silu(g, inplace=True).mul_(u)


def swiglu_add(mlp: nn.Module, h, res):
    """chunked.swiglu_add, staged: res + down(silu(gate h) * up h)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if all(isinstance(m._packed, FeatureMajor) for m in (gate, up, down)):
        return feature_major_mlp([gate._packed, up._packed], _swiglu, down._packed, down.rotated, h, res)
    shared, width = gate._packed, gate.out_features
    if shared is None or up._packed is not shared or list(shared.spans) != [id(gate), id(up)]:
        return chunked.swiglu_add(mlp, h, res)  # not laid out as prepare lays it out: member by member
    y, row_scale = shared.unscaled(h)  # gate's and up's outputs side by side (SHARED_INPUTS' order)

    def stage(s, e):
        part = scale_rows(y[s:e], row_scale[s:e], shared.bias)
        act = F.silu(part[:, :width], inplace=True).mul_(part[:, width:])
        return rotate(act) if down.rotated else act

    codes, scales = staged_codes(stage, h.shape[0], width, down._packed.bits)
    return down._packed.of_codes(codes, scales, h.dtype, residual=res)


def quick_gelu_add(mlp: nn.Module, h, res):
    """chunked.quick_gelu_add, staged: res + fc2(swish(fc1 h)) on the rewritten weights."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    y, row_scale = fc1._packed.unscaled(h)

    def stage(s, e):
        act = F.silu(scale_rows(y[s:e], row_scale[s:e], fc1._packed.bias), inplace=True)
        return rotate(act) if fc2.rotated else act

    codes, scales = staged_codes(stage, h.shape[0], fc1.out_features, fc2._packed.bits)
    return fc2._packed.of_codes(codes, scales, h.dtype, residual=res)


def prepare(tower: nn.Module, compute: str) -> None:
    """Quantise a tower (if its checkpoint was not) and make it ready to run. "dynamic": its blocks in the
    chunked fast form on the int8 linears (the vision rewrites applied to the int8 weights' scales, the MLPs
    staged: swiglu_add, quick_gelu_add), then every weight laid out for oneDNN, the decoder's SHARED_INPUTS
    as one matmul each, the heap trimmed after each block. "weight-only": the plain blocks, each linear
    expanding its weight per call."""
    quantize(tower)
    # What stays floating-point (norms, biases, the merger), left as stored by the loader
    # (memory.convert_on_first_pass), in the model's dtype now: after quantize, which reads a weight it quantises
    # from the file as it is.
    convert_pending(tower)
    if compute == "dynamic":
        mapped = file_mappings()
        chunked.apply(tower, lambda lin, **rewrite:
                      lin.rewrite(**rewrite, mapped=mapped) if isinstance(lin, Int8Linear) else lin,
                      vision_attention=chunked.lean_attention, decoder_mlp=swiglu_add, vision_mlp=quick_gelu_add)
        for block in [*(getattr(tower, "layers", None) or tower.blocks), tower]:
            decoder = isinstance(block, chunked.FastDecoderLayer)
            # The decoder's MLPs: the vision tower's, over a page's thousands of rows, run 7% slower feature-major.
            if decoder and feature_major():
                for m in block.mlp.children():
                    if isinstance(m, Int8Linear) and m._packed is None:
                        FeatureMajor(m)
            for parent, names in SHARED_INPUTS if decoder else ():
                module = getattr(block, parent)  # (the vision tower's qkv is one linear already)
                members = [getattr(module, name) for name in names]
                if all(isinstance(m, Int8Linear) and m._packed is None for m in members):
                    SharedInput(members, mapped)
            for m in block.modules():
                if isinstance(m, Int8Linear) and m._packed is None:
                    m.prepack(mapped)
            # What a block's packing freed (the copies side by side) would otherwise stay resident, in holes
            # of the heap under the next blocks' weights, to the end of the load: 0.26 GiB of the decoder's.
            trim_heap()
