"""Write a random checkpoint in the exact published layout, for any size.

The real weights cannot be downloaded on machines without hub access, so tests
and benchmarks run on random weights laid out exactly like
`jinaai/jina-reranker-m0`: the flat 4.x config.json, one model.safetensors
(or shards with an index) with the published tensor names and shapes, the real
Qwen2 tokenizer files, and preprocessor_config.json. Scores from such a
checkpoint are meaningless; parity with the reference is what they test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from m0lite import images
from m0lite.config import ModelConfig, TextConfig, VisionConfig

from .loader import expected_tensors
from .tokenizer_files import write_tokenizer_files

# Small enough for tests on 2 CPU cores, with every feature of the real model:
# GQA (4 query heads over 2 kv heads), M-RoPE sections, a vision tower and merger.
TINY_CONFIG = ModelConfig(
    text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
    vision=VisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
)
# The real Qwen2-VL-2B dimensions (the defaults), for benchmarks.
FULL_CONFIG = ModelConfig()

PREPROCESSOR_CONFIG = {  # Qwen2-VL's; the reranker overrides the pixel bounds (m0lite/images.py)
    "min_pixels": images.MIN_PIXELS,
    "max_pixels": 12845056,
    "patch_size": images.PATCH_SIZE,
    "temporal_patch_size": images.TEMPORAL_PATCH_SIZE,
    "merge_size": images.MERGE_SIZE,
    "image_mean": list(images.IMAGE_MEAN),
    "image_std": list(images.IMAGE_STD),
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Values of realistic scale: norm weights near 1, biases and matrices small, so activations
    neither vanish nor explode through the layers."""
    if len(shape) == 1 and name.endswith(".weight"):  # the RMSNorm and LayerNorm scales (all else 1-D is a bias)
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 1:
        t = 0.02 * torch.randn(shape, generator=gen)
    else:
        fan_in = torch.Size(shape[1:]).numel()
        t = torch.randn(shape, generator=gen) / fan_in**0.5
    return t.to(dtype)


def write_random_checkpoint(out_dir: str | Path, config: ModelConfig | dict | None = None, *, seed: int = 0,
                            dtype: torch.dtype = torch.float32, max_shard_bytes: int | None = None) -> Path:
    """Write config.json, model.safetensors (sharded with an index if max_shard_bytes is set), the
    tokenizer files and preprocessor_config.json into out_dir; return out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config) if config else TINY_CONFIG
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, gen, dtype) for name, shape in expected_tensors(cfg).items()}
    if max_shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, cur, size = [], {}, 0
        for name, t in tensors.items():
            if cur and size + t.nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name], size = t, size + t.nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config_dict = cfg.to_dict()
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    write_tokenizer_files(out)
    return out
