"""Images in, patches out: fetching (`fetch`), reading a source (`source`), decoding (`decode`)
and Qwen2-VL preprocessing (`preprocess`), each reproducing the reference pixel for pixel."""

from .decode import load_image
from .preprocess import MAX_PIXELS, MIN_PIXELS, num_visual_tokens, preprocess, smart_resize
from .source import parse_image_source

__all__ = ["load_image", "preprocess", "smart_resize", "num_visual_tokens", "MIN_PIXELS", "MAX_PIXELS",
           "parse_image_source"]
