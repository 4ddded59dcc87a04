"""jina-reranker-m0 as one module: vision tower, Qwen2 decoder, score head.

The reranker is Qwen2-VL without its language-model head: the final-norm hidden
state of each sequence's last token (the score token, id 100) goes through
score = Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1), a raw relevance
logit. Sequences arrive packed (see `PackedBatch`), never padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoder import Decoder
from .rope import inv_freq, mrope_cos_sin, mrope_positions
from .vision import VisionTower


@dataclass
class PackedBatch:
    """Several prompts side by side. Images are listed in order of appearance in input_ids."""

    input_ids: torch.Tensor  # (tokens,) int64
    positions: torch.Tensor  # (3, tokens) M-RoPE position ids
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 sequence boundaries
    max_seqlen: int
    grids: list[tuple[int, int, int]]  # (t, h, w) patch grid of each image
    pixel_values: torch.Tensor | None = None  # (patches, 1176) of all images, or None

    @classmethod
    def pack(cls, prompts: list[list[int]], grids: list[list[tuple[int, int, int]]], image_token_id: int, merge: int, pixel_values=None) -> "PackedBatch":
        lengths = [len(p) for p in prompts]
        positions = torch.cat([mrope_positions(p, g, image_token_id, merge) for p, g in zip(prompts, grids)], dim=1)
        return cls(
            input_ids=torch.tensor([i for p in prompts for i in p], dtype=torch.long),
            positions=positions,
            cu_seqlens=F.pad(torch.tensor(lengths).cumsum(0, dtype=torch.int32), (1, 0)),
            max_seqlen=max(lengths),
            grids=[g for gs in grids for g in gs],
            pixel_values=pixel_values,
        )


class JinaReranker(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = Decoder(cfg.text)
        h = cfg.text.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @torch.inference_mode()
    def forward(self, batch: PackedBatch, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores (batch,) in fp32. `image_embeds` (visual tokens, hidden) may be given
        precomputed; otherwise batch.pixel_values are encoded."""
        dev, cfg = self.device, self.cfg
        input_ids = batch.input_ids.to(dev)
        h = self.model.embed_tokens(input_ids)
        if batch.grids:
            if image_embeds is None:
                image_embeds = self.visual(batch.pixel_values.to(dev), batch.grids)
            slots = input_ids == cfg.image_token_id
            if int(slots.sum()) != image_embeds.shape[0]:
                raise ValueError(f"{int(slots.sum())} image tokens but {image_embeds.shape[0]} visual tokens")
            h[slots] = image_embeds.to(h.dtype)
        freqs = inv_freq(cfg.text.head_dim, cfg.text.rope_theta).to(dev)
        cos, sin = mrope_cos_sin(batch.positions, freqs, cfg.text.mrope_section, h.dtype)
        last = self.model(h, cos, sin, batch.cu_seqlens.to(dev), batch.max_seqlen)
        return self.score(last).squeeze(-1).float()
