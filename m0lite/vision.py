"""The Qwen2-VL vision tower and its 2x2 patch merger.

Patches (already flattened by the image processor, 3*2*14*14 = 1176 values
each) go through a linear patch embedding, `depth` pre-norm transformer blocks
with 2-D rotary attention that never crosses images (block-diagonal through
`cu_seqlens`), and the merger, which concatenates each 2x2 window of patches
(they are adjacent in the processor's order) into one visual token of the
decoder's width. Module names equal the checkpoint's (`visual.blocks.N.attn.qkv`).

This file is the math, once; faster forms of a block (m0lite/transforms) replace
blocks of a loaded model and keep `VisionBlock`'s signature.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import ops
from .config import VisionConfig
from .context import Context
from .rope import apply_rotary, inv_freq, vision_cos_sin, vision_positions


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # The checkpoint stores a bias-free Conv3d with kernel = stride = (2, 14, 14); over one patch
        # that is a matmul over its 1176 values, so the loader reshapes the weight to (embed, 1176).
        self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim, bias=False)

    def forward(self, x):
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x, ctx: Context):
        """(P, embed) -> (P, embed): attention within each image."""
        P = x.shape[0]
        q, k, v = self.qkv(x).view(P, 3, self.n_heads, self.head_dim).unbind(1)  # 3 x (P, nh, hd)
        # The reference rotates in fp32 whatever the model dtype.
        q = apply_rotary(q.float(), ctx.cos, ctx.sin).to(x.dtype)
        k = apply_rotary(k.float(), ctx.cos, ctx.sin).to(x.dtype)
        out = ops.attention(q, k, v, ctx.cu_seqlens, ctx.max_seqlen, causal=False)
        return self.proj(out.flatten(1))  # (P, nh * hd) -> (P, embed)


QUICK_GELU = 1.702  # QuickGELU(u) = u * sigmoid(1.702 u)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x):
        """fc2(quick_gelu(fc1(x)))"""
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(QUICK_GELU * x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, ctx: Context):
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.window, self.window), nn.GELU(), nn.Linear(self.window, cfg.hidden_size))

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
        x = self.patch_embed(pixel_values.to(self.merger.ln_q.weight.dtype))  # the model's dtype (norms stay float)
        freqs = inv_freq(cfg.head_dim // 2, cfg.rope_theta).to(x.device)
        cos, sin = vision_cos_sin(vision_positions(grid_thw, cfg.spatial_merge_size), freqs)
        # Each frame of each image is its own attention block.
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
        ctx = Context(cos, sin, ops.cu_seqlens(lengths, x.device), max(lengths))
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.merger(self.blocks_forward(pixel_values, grid_thw))
