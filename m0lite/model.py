"""jina-reranker-m0 as one module: vision tower, Qwen2 decoder, score head.

The reranker is Qwen2-VL without its language-model head: the final-norm hidden
state of each sequence's last token (the score token, id 100) goes through
score = Linear(hidden, hidden) -> ReLU -> Linear(hidden, 1), a raw relevance
logit. Sequences arrive side by side in a `RaggedBatch`, never padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernels import ops
from .config import ModelConfig
from .context import Context
from .decoder import Decoder
from .rope import inv_freq, mrope_cos_sin
from .vision import VisionTower


@dataclass
class RaggedBatch:
    """Token sequences of any lengths side by side, without padding (their boundaries in cu_seqlens).
    Images are listed in order of appearance in input_ids."""

    input_ids: torch.Tensor  # (tokens,) int64
    positions: torch.Tensor  # (3, tokens) M-RoPE position ids
    cu_seqlens: torch.Tensor  # (batch + 1,) int32 sequence boundaries
    max_seqlen: int
    grids: list[tuple[int, int, int]]  # (t, h, w) patch grid of each image

    @classmethod
    def of(cls, ids: list[list[int]], positions: list[torch.Tensor], grids: list[list[tuple[int, int, int]]]) -> "RaggedBatch":
        lengths = [len(p) for p in ids]
        return cls(
            input_ids=torch.tensor([i for p in ids for i in p], dtype=torch.long),
            positions=torch.cat(positions, dim=1),
            cu_seqlens=ops.cu_seqlens(lengths),
            max_seqlen=max(lengths),
            grids=[g for gs in grids for g in gs],
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

    def inputs(self, batch: RaggedBatch, image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, Context]:
        """Token embeddings with the visual tokens in the image slots, and the pass's context (M-RoPE cos/sin,
        sequence boundaries)."""
        dev, cfg = self.device, self.cfg
        input_ids = batch.input_ids.to(dev)
        h = self.model.embed_tokens(input_ids).to(self.dtype)  # the table stays as stored (int8, or bf16 in fp32)
        if batch.grids:
            slots = input_ids == cfg.image_token_id
            n = 0 if image_embeds is None else image_embeds.shape[0]
            if int(slots.sum()) != n:
                raise ValueError(f"{int(slots.sum())} image tokens but {n} visual tokens")
            h[slots] = image_embeds.to(h.dtype)
        freqs = inv_freq(cfg.text.head_dim, cfg.text.rope_theta).to(dev)
        cos, sin = mrope_cos_sin(batch.positions, freqs, cfg.text.mrope_section, h.dtype)
        return h, Context(cos, sin, batch.cu_seqlens.to(dev), batch.max_seqlen)

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch, pixel_values: torch.Tensor | None = None, *,
                image_embeds: torch.Tensor | None = None, past: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Pixels and tokens in, raw scores (batch,) out, in fp32.

        pixel_values: (patches, 1176), the batch's images' patches in order (`images.preprocess`), run
        through the vision tower here. Two overrides, for what the reranker's caches already hold:
        `image_embeds` (visual tokens, hidden), the vision tower's output for those images, in place of
        `pixel_values`; `past`: per sequence, the keys/values of a prefix it continues."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.visual(pixel_values.to(self.device), batch.grids)
        last = self.model(*self.inputs(batch, image_embeds), past=past)  # (batch, hidden)
        return self.score(last).squeeze(-1).float()

    @torch.inference_mode()
    def prefill(self, batch: RaggedBatch, image_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per sequence, the (layers, 2, tokens, kv_heads, head_dim) keys and values of all its tokens."""
        return self.model.prefill(*self.inputs(batch, image_embeds))
