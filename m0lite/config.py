"""The model's configuration: one dataclass per tower, read from `config.json`.

`config.json` comes in two layouts. The published checkpoint uses the flat
transformers-4.x layout (text fields at the top level, `rope_scaling`,
`vision_config` nested); transformers 5.x re-saves it nested (`text_config`,
`rope_parameters`). `ModelConfig.from_dict` reads both. Defaults are the
Qwen2-VL-2B dimensions of jina-reranker-m0.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import WeightsError


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    # How the 64 rotary frequency pairs are split over the (temporal, height, width) axes.
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise WeightsError(f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise WeightsError(f"config: num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads {self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise WeightsError(f"config: mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise WeightsError(f"config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")


@dataclass
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536  # the merger's output size: the decoder's hidden size
    num_heads: int = 16
    mlp_ratio: float = 4
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch (3*2*14*14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def validate(self) -> None:
        if self.embed_dim % self.num_heads or self.head_dim % 4:
            raise WeightsError(f"config: vision embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head_dim divisible by 4")
        if self.hidden_act != "quick_gelu":
            raise WeightsError(f"config: vision hidden_act {self.hidden_act!r} is not supported (only 'quick_gelu')")


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Read a config.json dict in the flat 4.x or the nested 5.x layout; unknown keys are ignored."""
        text = dict(d.get("text_config") or d)  # 5.x nests the text fields; 4.x keeps them at the top
        rope = text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {}
        if "rope_theta" not in text and "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        if "mrope_section" in rope:
            text["mrope_section"] = list(rope["mrope_section"])
        vis = dict(d.get("vision_config") or {})
        if "in_chans" in vis:  # the 4.x name
            vis.setdefault("in_channels", vis["in_chans"])
        if "rope_theta" in (vis.get("rope_parameters") or {}):
            vis["rope_theta"] = vis["rope_parameters"]["rope_theta"]
        cfg = cls(
            text=_from_known(TextConfig, text),
            vision=_from_known(VisionConfig, vis),
            **{k: d[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id") if k in d},
        )
        cfg.text.validate()
        cfg.vision.validate()
        if cfg.vision.hidden_size != cfg.text.hidden_size:
            raise WeightsError(f"config: vision_config.hidden_size {cfg.vision.hidden_size} must equal the decoder hidden_size {cfg.text.hidden_size}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: cannot read config: {e}") from None

    def to_dict(self) -> dict:
        """The published flat 4.x layout (what jinaai/jina-reranker-m0 ships)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["JinaVLForRanking"],
            "model_type": "qwen2_vl",
            "torch_dtype": "bfloat16",
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": 151654,
            "image_token_id": self.image_token_id,
            "video_token_id": 151656,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": 32768,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "use_cache": False,
            "use_sliding_window": False,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "depth": v.depth,
                "embed_dim": v.embed_dim,
                "hidden_size": v.hidden_size,
                "hidden_act": v.hidden_act,
                "mlp_ratio": v.mlp_ratio,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
            },
        }


def _from_known(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})
