"""Zero-copy reading of .safetensors files through a memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the raw tensor bytes. Each tensor
here is a view on a private (copy-on-write) mapping of the file: nothing is
read until it is touched, and a tensor that is never used (the vision tower in
a text-only run, most rows of the embedding) never occupies memory. Every
header entry is checked against the file, so a corrupt or truncated file is an
error naming the tensor and the file, never a crash.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from m0lite.errors import WeightsError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, as lazily paged views on its memory map."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise WeightsError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(MAX_HEADER, size - 8):
                raise WeightsError(f"{path}: corrupt or truncated safetensors header (declares {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path}: corrupt safetensors header: {e}") from None
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return {name: _view(path, mm, 8 + n, size, name, info) for name, info in header.items()}


def _view(path: Path, mm, base: int, size: int, name: str, info) -> torch.Tensor:
    try:
        dtype, shape, (start, end) = DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: tensor {name}: malformed header entry {info!r}") from None
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    if end - start != nbytes or start < 0 or base + end > size:
        raise WeightsError(f"{path}: tensor {name}: data offsets {start}..{end} do not fit shape {shape} "
                           f"{info['dtype']} in a file of {size} bytes (truncated?)")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start).view(shape)
