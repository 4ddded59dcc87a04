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
from .loader import checkpoint_dtype, load_model, to_checkpoint, weight_files


def save_quantized(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Quantise checkpoint `src` (a folder or hub id) into folder `dst`; returns dst. The tensors that stay
    float keep the source's dtype unless `dtype` says otherwise: then loading dst in any dtype gives the
    model that `quantize="int8"` gives from src, bit for bit (both quantise from the file's values)."""
    folder, dst = resolve(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise WeightsError(f"{dst}: output folder exists and is not empty")
    dtype = dtype or checkpoint_dtype(folder)
    model = load_model(folder, dtype, quantize=True)  # int8 already: loaded as it is
    int8.quantize(model.visual)  # what the tower's first pass would do (a no-op on an int8 checkpoint)
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
