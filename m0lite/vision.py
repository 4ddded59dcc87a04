"""The Qwen2-VL vision tower and its 2x2 patch merger.

Patches (already flattened by the image processor, 3*2*14*14 = 1176 values
each) go through a linear patch embedding, `depth` pre-norm transformer blocks
with 2-D rotary attention that never crosses images (block-diagonal through
`cu_seqlens`), and the merger, which concatenates each 2x2 window of patches
(they are adjacent in the processor's order) into one visual token of the
decoder's width. Module names equal the checkpoint's (`visual.blocks.N.attn.qkv`).

Once its weights are packed (bf16 on CPU, see linear.py), the tower moves two
elementwise steps into its matmuls: the rotary rotation (VisionAttention) and
QuickGELU (VisionMLP). Unpacked, every step is the reference's own math.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from m0lite import kernels

from .config import VisionConfig
from .linear import Linear, rowwise
from .rope import apply_rotary, apply_rotary_pairs, inv_freq, pair_order, vision_cos_sin, vision_positions


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # The checkpoint stores a bias-free Conv3d with kernel = stride = (2, 14, 14); over one patch
        # that is a matmul over its 1176 values, so the loader reshapes the weight to (embed, 1176).
        self.proj = Linear(cfg.patch_dim, cfg.embed_dim, bias=False)

    def forward(self, x):
        return self.proj(x)


@functools.cache  # one tuple shared by every block
def _qkv_rows(heads: int, head_dim: int) -> tuple[int, ...]:
    """qkv's output order when packed: queries and keys in rotary-pair order, values as they are."""
    pairs, width = pair_order(heads, head_dim), heads * head_dim
    return (*pairs, *(width + i for i in pairs), *range(2 * width, 3 * width))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim, bias=True)
        # Once packed, qkv emits the query and key features of each rotary pair side by side, so that the
        # rotation is one complex multiply: three passes instead of seven (one vision block ran ~8%
        # faster). Queries and keys are permuted alike, so their dot products, and attention, are unchanged.
        self.qkv.rows = _qkv_rows(cfg.num_heads, cfg.head_dim)

    def project(self, x, cos, sin):
        """Rotated queries and keys, and values, of rows x: 3 x (P, nh, hd)."""
        P = x.shape[0]
        q, k, v = self.qkv(x).view(P, 3, self.n_heads, self.head_dim).unbind(1)
        if self.qkv.packed is not None:  # queries and keys in pair order (see __init__)
            rot = torch.complex(cos[:, : self.head_dim // 2], sin[:, : self.head_dim // 2])
            return apply_rotary_pairs(q, rot), apply_rotary_pairs(k, rot), v
        # The reference rotates in fp32 whatever the model dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return q, k, v

    def forward(self, q, k, v, cu_seqlens, max_seqlen):
        """Attention within each image, (P, nh * hd), before proj."""
        return kernels.attention(q, k, v, cu_seqlens, max_seqlen, causal=False).flatten(1)


QUICK_GELU = 1.702  # QuickGELU(u) = u * sigmoid(1.702 u)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = Linear(cfg.embed_dim, hidden)
        self.fc2 = Linear(hidden, cfg.embed_dim)
        # QuickGELU(u) = swish(1.702 u) / 1.702, and oneDNN fuses swish (silu) into a matmul but has no
        # QuickGELU. So once packed, fc1 computes 1.702 u (its weight and bias scaled by 1.702) with swish
        # fused, and fc2 takes the 1/1.702 into its weight. That spares three passes over the (rows, 5120)
        # activations: one vision block ran 7-8% faster. The scaled weights are rounded to bf16 once, which
        # moves a block's output by about as much as packing itself does (bf16 noise, ~2e-3 relative).
        self.fc1.weight_scale = self.fc1.bias_scale = QUICK_GELU
        self.fc2.weight_scale = 1 / QUICK_GELU

    def forward(self, x, residual):
        """residual + fc2(quick_gelu(fc1(x)))"""
        if self.fc1.packed is not None:
            return self.fc2.add(self.fc1.silu(x), residual)  # the scaled weights above
        x = self.fc1(x)
        return self.fc2.add(x * torch.sigmoid(QUICK_GELU * x), residual)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen):
        """Everything but attention is row-wise and runs through `rowwise` (chunks on CPU in bf16)."""
        a = self.attn(*rowwise(self._qkv, x, cos, sin), cu_seqlens, max_seqlen)
        return rowwise(self._out, a, x)

    def _qkv(self, x, cos, sin):
        return self.attn.project(self.norm1(x), cos, sin)

    def _out(self, a, x):
        """x + proj(a), then the MLP block with its residual."""
        x = self.attn.proj.add(a, x)
        return self.mlp(self.norm2(x), residual=x)


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(Linear(self.window, self.window), nn.GELU(), Linear(self.window, cfg.hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.window))  # (P/4, 4*embed) -> (P/4, hidden)


class VisionTower(nn.Module):
    """`visual.*` of the checkpoint. forward: patches (P, 1176) of images with grids grid_thw
    -> visual tokens (P/4, hidden), images in order."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def blocks_forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Patches -> last block's hidden states (P, embed_dim), before the merger."""
        cfg = self.cfg
        dtype = self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype))
        freqs = inv_freq(cfg.head_dim // 2, cfg.rope_theta).to(x.device)
        cos, sin = vision_cos_sin(vision_positions(grid_thw, cfg.spatial_merge_size), freqs)
        # Each frame of each image is its own attention block.
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
        cu_seqlens = F.pad(torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(x.device)
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens, max(lengths))
        return x

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.merger(self.blocks_forward(pixel_values, grid_thw))
