"""`m0lite quantize SRC DST`: write an int8 checkpoint that maps half the bytes of the bf16 one.

The output folder holds model.safetensors with each quantised linear's `weight`
as int8 and its `weight_scale` (fp32, one per output channel) beside it, the
other tensors in bf16, config.json with `quantization_config`, and the source's
other files (tokenizer, preprocessor config) as they are. The loader reads it back
with the same strict checks as any checkpoint (loader.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from m0lite.errors import WeightsError
from m0lite.transforms import int8

from .hub import resolve
from .loader import load_model, to_checkpoint, weight_files


def save_quantized(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Quantise checkpoint `src` (a folder or hub id) into folder `dst`; returns dst."""
    folder, dst = resolve(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise WeightsError(f"{dst}: output folder exists and is not empty")
    model = load_model(folder, dtype)
    int8.quantize(model.model)  # a no-op on a checkpoint that is int8 already
    int8.quantize(model.visual)
    dst.mkdir(parents=True, exist_ok=True)
    skip = {"config.json", "model.safetensors.index.json", *(f.name for f in weight_files(folder))}
    for f in folder.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, dst / f.name)
    save_file(to_checkpoint(model), str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = dict(int8.QUANT_CONFIG)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
