"""Qwen2VLImageProcessor (the PIL backend, transformers 5.x `image_processing_pil_qwen2_vl`), pixel for pixel.

`smart_resize` to multiples of 28, PIL bicubic on uint8, rescale by 1/255 in
float64 then float32, normalise with the CLIP mean/std in float32, and flatten
14x14 patches so that the four patches of each 2x2 merge window sit next to
each other. The geometry (patch 14, temporal patch 2, merge 2) is the published
vision_config, `VisionConfig`'s defaults; a checkpoint whose config says otherwise is refused at load
(`check_geometry`), since every image would be cut into patches its tower does not take.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..config import VisionConfig
from ..errors import ImageError
from .decode import processor_rgb

_VISION = VisionConfig()
PATCH_SIZE = _VISION.patch_size
TEMPORAL_PATCH_SIZE = _VISION.temporal_patch_size
MERGE_SIZE = _VISION.spatial_merge_size
FACTOR = PATCH_SIZE * MERGE_SIZE  # resized sides are multiples of this
PATCH_DIM = _VISION.patch_dim  # values per patch: channels x temporal x patch x patch
# Pixel bounds the reranker passes to its processor (jina-reranker-m0 modeling.py:
# min_pixels=3136, max_pixels=602112), i.e. 4 to 768 visual tokens.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200  # smart_resize refuses anything more elongated
# Rescale and normalisation: preprocessor_config.json (rescale_factor
# 0.00392156862745098 == 1/255, image_mean/std = OPENAI_CLIP_MEAN/STD in
# transformers.image_utils).
RESCALE_FACTOR = 1 / 255
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = Image.Resampling.BICUBIC


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of `factor`, area within [min_pixels, max_pixels].

    Rounds each side to the nearest multiple of `factor`; if the area is then too large, scales
    down by sqrt(area / max_pixels) rounding down, if too small, up by sqrt(min_pixels / area)
    rounding up. Same arithmetic as transformers' `smart_resize`.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image of {width}x{height} pixels (width x height) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {width}x{height} pixels (width x height) has aspect ratio {ratio:.1f}, "
            f"over the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_for_model(image: Image.Image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image at the size the vision tower takes (`smart_resize`), as `preprocess` resizes it.

    Resizing is idempotent here (a resized image is already at its target size), so a caller
    may resize early, hold the small image instead of the decoded one, and preprocess it later
    with the same bounds: the pixels are the same.
    """
    image = processor_rgb(image)
    height, width = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    if image.size != (width, height):  # the reference resizes anyway, but PIL then returns a plain copy
        image = image.resize((width, height), resample=RESAMPLE)
    return image


def _normalise_table() -> np.ndarray:
    """(3, 256) float32: every uint8 level of each channel, rescaled and normalised.

    Same operations and dtypes as the reference (`rescale`: float64 multiply, cast to float32;
    `normalize`: float32 subtract and divide), so a table lookup is bit-identical to it.
    """
    levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.array(IMAGE_MEAN, dtype=np.float32)[:, None]
    std = np.array(IMAGE_STD, dtype=np.float32)[:, None]
    return (levels[None, :] - mean) / std


_NORMALISED = _normalise_table()
_CHANNELS = np.arange(3)[:, None, None]


def preprocess(
    image: Image.Image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pixels of one image, as the vision tower takes them.

    Returns `pixel_values`, float32 (grid_h * grid_w, 3 * 2 * 14 * 14), rows ordered so that
    each 2x2 merge window's four patches are consecutive, each row (channel, frame, row, col)
    with the single frame repeated twice; and `grid_thw` = (1, grid_h, grid_w).
    """
    image = resize_for_model(image, min_pixels=min_pixels, max_pixels=max_pixels)
    height, width = image.height, image.width
    pixels = np.asarray(image)  # (H, W, C) uint8
    gh, gw, m, p = height // PATCH_SIZE, width // PATCH_SIZE, MERGE_SIZE, PATCH_SIZE
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, 3)  # (gh/m, mh, ph, gw/m, mw, pw, C)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, mh, mw, C, ph, pw)
    x = x.reshape(gh * gw, 3, 1, p * p)  # (N, C, 1, ph*pw), still uint8
    values = torch.from_numpy(_NORMALISED[_CHANNELS, x])  # (N, C, 1, ph*pw) float32
    values = values.expand(gh * gw, 3, TEMPORAL_PATCH_SIZE, p * p)  # (N, C, T, ph*pw)
    return values.reshape(gh * gw, PATCH_DIM), (1, gh, gw)


def check_geometry(vision: VisionConfig) -> None:
    """Refuse a vision config whose patches are not the ones `preprocess` cuts (a WeightsError at load)."""
    from ..errors import WeightsError

    ours = (PATCH_SIZE, TEMPORAL_PATCH_SIZE, MERGE_SIZE, PATCH_DIM)
    theirs = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size, vision.patch_dim)
    if theirs != ours:
        raise WeightsError(f"config.json's vision_config cuts images into (patch, temporal patch, merge, values per patch) "
                           f"= {theirs}; m0lite's image preprocessing cuts {ours}, as the published checkpoint does")


def num_visual_tokens(grid_thw: tuple[int, int, int], merge: int = MERGE_SIZE) -> int:
    """Number of `<|image_pad|>` tokens for one image: one per merge x merge patches."""
    t, h, w = grid_thw
    return t * h * w // (merge * merge)
