"""Read a jina-reranker-m0 checkpoint into `JinaReranker`, strictly.

The model is built on the meta device (no memory), then each tensor is read
from the safetensors file(s) once, cast to the requested dtype and assigned in
place. Every parameter must be filled exactly once with the right shape; a
missing, unexpected or mis-shaped tensor, a non-float tensor or a corrupt file
is an error naming the key and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from m0lite.config import ModelConfig
from m0lite.errors import WeightsError
from m0lite.model import JinaReranker

# transformers 5.x saves Qwen2-VL under new prefixes; the published (4.x) names are ours.
PREFIX_5X = {"model.visual.": "visual.", "model.language_model.": "model."}
# A transformers re-save of Qwen2-VL may carry the language-model head; a ranker never reads it.
IGNORED = {"lm_head.weight"}
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def checkpoint_shape(name: str, shape: torch.Size, cfg: ModelConfig) -> tuple[int, ...]:
    """The one layout difference from our modules: the patch embedding is a Conv3d in the file
    (embed, 3, 2, 14, 14) and a Linear (embed, 1176) here."""
    if name == "visual.patch_embed.proj.weight":
        v = cfg.vision
        return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape)


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, derived from the modules themselves (their names are the keys)."""
    with torch.device("meta"):
        model = JinaReranker(cfg)
    return {n: checkpoint_shape(n, p.shape, cfg) for n, p in model.state_dict().items()}


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the file that holds it (one file, or shards listed in the index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index: {e}") from None
        return {k: folder / f for k, f in weight_map.items()}
    if single.exists():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types (header, truncation, I/O)
        raise WeightsError(f"{path}: cannot read safetensors file (corrupt or truncated?): {e}") from None


def load_model(folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> JinaReranker:
    folder = Path(folder)
    cfg = ModelConfig.from_file(folder / "config.json")
    expected = expected_tensors(cfg)
    files = {our_name(k): (k, f) for k, f in weight_files(folder).items() if k not in IGNORED}
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        where = ", ".join(sorted({str(f) for _, f in files.values()})) or str(folder)
        parts = [f"missing tensors: {_few(missing)}" if missing else "", f"unexpected tensors: {_few(unexpected)}" if unexpected else ""]
        raise WeightsError(f"{where}: checkpoint does not match config.json: " + "; ".join(p for p in parts if p))

    state, handles = {}, {}
    for name, (key, path) in files.items():
        f = handles.get(path) or handles.setdefault(path, _open(path))
        try:
            t = f.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read tensor {key}: {e}") from None
        if tuple(t.shape) != expected[name]:
            raise WeightsError(f"{path}: tensor {key} has shape {tuple(t.shape)}, expected {expected[name]}")
        if t.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: tensor {key} has dtype {t.dtype}, expected bf16, fp16 or fp32")
        state[name] = t.to(device=device, dtype=dtype)
    state["visual.patch_embed.proj.weight"] = state["visual.patch_embed.proj.weight"].flatten(1)

    with torch.device("meta"):
        model = JinaReranker(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def our_name(key: str) -> str:
    for old, new in PREFIX_5X.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")
