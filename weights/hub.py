"""Resolve a model argument to a local checkpoint folder: a path, or a hub repo id.

A repo id is fetched through `huggingface_hub` (only the files m0lite reads,
no `modeling.py`), once; later calls and `HF_HUB_OFFLINE=1` use the local cache.
"""

from __future__ import annotations

from pathlib import Path

from m0lite.errors import WeightsError

# What m0lite reads from a checkpoint; the remote code and the slow-tokenizer files are not needed.
NEEDED_FILES = ["config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors",
                "model.safetensors.index.json", "model-*.safetensors"]
DEFAULT_REPO = "jinaai/jina-reranker-m0"


def resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path}: expected a checkpoint folder, got a file")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise WeightsError(f"{name}: no such checkpoint folder (and not a hub repo id like {DEFAULT_REPO})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=NEEDED_FILES))
    except Exception as e:  # network, auth, missing repo, offline cache miss
        raise WeightsError(
            f"{name}: cannot fetch from the hub ({type(e).__name__}: {e}). Download it where the hub is reachable "
            f"(`huggingface-cli download {name}`) and pass the folder, or set HF_HUB_OFFLINE=1 to use the cache."
        ) from None
