"""Rotary position embeddings: M-RoPE for the decoder, 2-D RoPE for the vision tower.

Decoder (M-RoPE, Qwen2-VL paper sec. 2.1): every token has three position ids
(temporal, height, width). Text tokens carry the same id on all three axes,
counting up; the visual tokens of an image take (t, row, col) of its merged
grid, offset by the position where the image starts; text after an image
resumes at that start + max(rows, cols). The 64 frequency pairs of head_dim 128
are split [16, 24, 24] over the three axes.

Vision tower: each patch rotates half of head_dim by its row and half by its
column (theta 10000), with patches listed in 2x2 merge-window order.
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies, computed as transformers does (for bit-equal angles)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def mrope_positions(input_ids: list[int], image_grids: list[tuple[int, int, int]], image_token_id: int, merge: int) -> torch.Tensor:
    """(3, len(input_ids)) position ids of one sequence; `image_grids` lists the (t, h, w) patch grid
    of each run of image tokens, in order of appearance."""
    ids = torch.as_tensor(input_ids)
    is_image = (ids == image_token_id).tolist()
    chunks, start, pos, grids = [], 0, 0, iter(image_grids)
    n = len(input_ids)
    while start < n:
        end = start
        while end < n and is_image[end] == is_image[start]:
            end += 1
        if not is_image[start]:
            chunks.append(torch.arange(pos, pos + end - start).expand(3, -1))
            pos += end - start
        else:
            t, h, w = next(grids)
            gh, gw = h // merge, w // merge
            if t * gh * gw != end - start:
                raise ValueError(f"image token run of {end - start} does not match grid {(t, h, w)}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(h, w) // merge
        start = end
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


def mrope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor, sections: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (tokens, head_dim) for positions (3, tokens): frequency pair j takes the
    position of the axis whose section it falls in."""
    angles = positions.to(freqs.device)[..., None].float() * freqs  # (3, tokens, head_dim/2)
    angles = torch.cat([a[i % 3] for i, a in enumerate(angles.split(sections, dim=-1))], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)  # (tokens, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def vision_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(patches, 2) (row, col) of every patch, in the processor's 2x2-merge-window order."""
    out = []
    for t, h, w in grid_thw:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin of shape (patches, head_dim): the first quarter rotates by row, the second by column, repeated."""
    angles = positions.to(freqs.device)[..., None].float() * freqs  # (patches, 2, head_dim/4)
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, head_dim) rotated by cos/sin (tokens, head_dim), in cos's dtype."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
