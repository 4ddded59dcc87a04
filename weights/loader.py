"""Read a jina-reranker-m0 checkpoint into `JinaReranker`, strictly.

The model is built on the meta device (no memory), then each tensor is
assigned in place: as a zero-copy view on the memory-mapped file when its dtype
and device are the ones asked for, else cast once. Every parameter must be
filled exactly once with the right shape; a missing, unexpected or mis-shaped
tensor, a tensor of the wrong kind of dtype or a corrupt file is an error naming
the key and the file. A checkpoint written by `m0lite quantize` (config.json has
`quantization_config`) is built with int8 layers (transforms/int8.py) and holds
int8 weights and fp32 `weight_scale`s, checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from m0lite.config import ModelConfig
from m0lite.errors import WeightsError
from m0lite.images.preprocess import check_geometry
from m0lite.memory import convert_on_first_pass, converted, file_mappings, populate, release_mapped_pages
from m0lite.model import JinaReranker
from m0lite.transforms import int8

from .safetensors_mmap import read_tensors

# transformers 5.x saves Qwen2-VL under new prefixes; the published (4.x) names are ours.
PREFIX_5X = {"model.visual.": "visual.", "model.language_model.": "model."}
# A transformers re-save of Qwen2-VL may carry the language-model head; a ranker never reads it.
IGNORED = {"lm_head.weight"}
FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


# The one layout difference from our modules, in both directions: the patch embedding is a Conv3d in the
# file, (embed, 3, 2, 14, 14), and a Linear here, (embed, 1176): over one patch the same matmul.
PATCH_EMBED = "visual.patch_embed.proj.weight"
EMBEDDINGS = "model.embed_tokens.weight"


def checkpoint_shape(name: str, shape: torch.Size, cfg: ModelConfig) -> tuple[int, ...]:
    """The file's shape of our tensor `name` of shape `shape`."""
    if name == PATCH_EMBED:
        v = cfg.vision
        return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return tuple(shape)


def from_file(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as the file holds it -> as our module takes it (a view)."""
    return t.flatten(1) if name == PATCH_EMBED else t


def to_file(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Our tensor -> as the file holds it (a view)."""
    return t.reshape(checkpoint_shape(name, t.shape, cfg))


def meta_model(cfg: ModelConfig, quantized: bool = False) -> JinaReranker:
    """The model's structure without memory: every parameter on the meta device, to be assigned."""
    with torch.device("meta"):
        model = JinaReranker(cfg)
    if quantized:
        int8.quantize(model.model)
        int8.quantize(model.visual)
    return model


def expected_tensors(cfg: ModelConfig, model: JinaReranker | None = None) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, derived from the modules themselves (their names are the keys)."""
    model = meta_model(cfg) if model is None else model
    return {n: checkpoint_shape(n, p.shape, cfg) for n, p in model.state_dict().items()}


def is_quantized_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False  # ModelConfig.from_file reports it
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if q is None:
        return False
    if not isinstance(q, dict) or {k: q.get(k) for k in ("quant_method", "weights")} != {"quant_method": "m0lite", "weights": "int8"}:
        raise WeightsError(f"{folder / 'config.json'}: quantization_config {q!r} is not one m0lite reads "
                           f"(expected quant_method 'm0lite', weights 'int8')")
    differ = sorted(k for k in {*q, *int8.QUANT_CONFIG} if q.get(k) != int8.QUANT_CONFIG.get(k))
    if differ:  # the same format, another layout of its weights (an earlier m0lite's, without rotated inputs)
        raise WeightsError(f"{folder / 'config.json'}: quantization_config differs from this m0lite's in "
                           f"{', '.join(differ)}: {', '.join(f'{k}={q.get(k)!r}, expected {int8.QUANT_CONFIG.get(k)!r}' for k in differ)}; "
                           f"quantise the bf16 checkpoint again (m0lite quantize)")
    return True


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file, or the shards listed in the index."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index: {e}") from None
        return sorted({folder / f for f in weight_map.values()})
    if single.exists():
        return [single]
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_checkpoint(folder: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Our name -> (tensor view, file it came from), over all files; a key twice is an error."""
    out = {}
    for path in weight_files(folder):
        for key, t in read_tensors(path).items():
            if key in IGNORED:
                continue
            name = our_name(key)
            if name in out:
                raise WeightsError(f"{path}: tensor {key} also appears in {out[name][1]}")
            out[name] = (t, path)
    return out


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The float dtype most of a checkpoint's tensors (by count of elements) are stored in."""
    counts: dict[torch.dtype, int] = {}
    for t, _ in read_checkpoint(folder).values():
        if t.dtype in FLOAT_DTYPES:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.bfloat16


def load_model(folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
               quantize: bool = False) -> JinaReranker:
    """quantize: build the int8 layers (transforms/int8.py) and quantise each of their weights as it is read,
    from the file's own values, so that peak memory is the int8 model plus one weight's fp32 copy and the
    codes are those `m0lite quantize` writes. A checkpoint that is int8 already loads as it is."""
    folder = Path(folder)
    cfg = ModelConfig.from_file(folder / "config.json")
    check_geometry(cfg.vision)  # before the tensors, whose shapes follow from it
    stored_int8 = is_quantized_checkpoint(folder)
    model = meta_model(cfg, stored_int8)  # no memory: every tensor is assigned below
    expected = expected_tensors(cfg, model)
    at_load = {}
    if quantize and not stored_int8:
        # The decoder's weights are quantised as they are read (name -> rotated; each `weight_scale` is made
        # beside its weight). The vision tower's stay the file's mapped tensors (as every floating-point tensor
        # of it does, below), unread, until its first pass quantises them (int8.prepare): a text-only process
        # never reads them.
        at_load = int8.quantized_weights(model.model, "model.")
        int8.quantize(model.model)
    kinds = {n: p.dtype for n, p in model.state_dict().items()}
    files = read_checkpoint(folder)
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing or unexpected:
        where = ", ".join(str(p) for p in weight_files(folder))
        parts = [f"missing tensors: {_few(missing)}" if missing else "", f"unexpected tensors: {_few(unexpected)}" if unexpected else ""]
        raise WeightsError(f"{where}: checkpoint does not match config.json: " + "; ".join(p for p in parts if p))

    state, mapped = {}, file_mappings()
    for name, (t, path) in files.items():
        if tuple(t.shape) != expected[name]:
            raise WeightsError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {expected[name]}")
        if name in at_load and t.dtype in FLOAT_DTYPES:
            populate(t, mapped)
            state[name], state[name + "_scale"] = (x.to(device) for x in int8.quantize_weight(t, at_load[name]))
            release_mapped_pages(t, mapped)  # read once: only the int8 copy is read from now on
            continue
        if kinds[name] == torch.int8:
            if t.dtype != torch.int8:
                raise WeightsError(f"{path}: tensor {name} has dtype {t.dtype}, expected int8 (quantization_config)")
            state[name] = t.to(device=device)
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise WeightsError(f"{path}: tensor {name} has dtype {t.dtype}, expected bf16, fp16 or fp32")
        if name == EMBEDDINGS or name.startswith("visual.") and not name.endswith(".weight_scale"):
            # As stored: a pass converts the rows it looks up (model.py), and the vision tower is converted
            # before its first pass (memory.convert_on_first_pass), so a text-only process never holds it
            # (in the lean mode, what stays floating-point: the merger's 34M weights, 131 MiB in fp32).
            state[name] = t.to(device)
            continue
        # Scales stay fp32 whatever the model's dtype. The mmap view itself when nothing changes; a converted
        # copy hands the file's pages back, else a bf16 checkpoint loaded in fp32 holds both (bench/RESULTS.md).
        state[name] = converted(t, mapped, torch.float32 if name.endswith(".weight_scale") else dtype, device)
        if name.endswith(".weight_scale") and not bool(torch.isfinite(state[name]).all() and (state[name] > 0).all()):
            raise WeightsError(f"{path}: tensor {name} holds scales that are not all finite and positive")
    state[PATCH_EMBED] = from_file(PATCH_EMBED, state[PATCH_EMBED])

    model.load_state_dict(state, strict=True, assign=True)
    convert_on_first_pass(model.visual, dtype)  # a no-op where the file holds the model's dtype already
    return model.eval().requires_grad_(False)


def to_checkpoint(model: JinaReranker) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint's names and shapes (the published layout), for saving."""
    cfg = model.cfg
    return {n: to_file(n, t.detach().contiguous(), cfg) for n, t in model.state_dict().items()}


def our_name(key: str) -> str:
    for old, new in PREFIX_5X.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")
