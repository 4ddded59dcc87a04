"""The reference: transformers' Qwen2-VL plus the score head, driven as the original compute_score.

This mirrors jina-reranker-m0's own `modeling.py` (JinaVLForRanking) on the
installed transformers 5.x: the checkpoint is loaded by transformers itself from
the same safetensors file, the processor is Qwen2VLProcessor with the PIL image
processor (min_pixels 3136, max_pixels 602112), documents are cut and decoded
as the original does, batches are left-padded and the score token is appended.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SCORE_TOKEN_ID = 100
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


class JinaVLForRanking(Qwen2VLForConditionalGeneration):
    """The published architecture: Qwen2-VL whose last-token final-norm hidden state feeds an MLP score head."""

    def __init__(self, config):
        super().__init__(config)
        h = config.text_config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, **inputs):
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        return self.score(hidden[:, -1]).squeeze(-1)


# transformers 5.x names Qwen2-VL's modules model.visual.* and model.language_model.*; the published
# checkpoint (4.x) says visual.* and model.*. This is the mapping SPEC.md states.
KEY_MAPPING = {r"^visual\.": "model.visual.", r"^model\.(?!visual\.|language_model\.)": "model.language_model."}


class Reference:
    def __init__(self, folder: str | Path, dtype=torch.float32, min_pixels=3136, max_pixels=602112, device="cpu"):
        # Loaded on the CPU (memory-mapped), then moved: no device_map, which would need accelerate.
        self.model = JinaVLForRanking.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa",
                                                      key_mapping=KEY_MAPPING).eval().to(device)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.tokenizer.padding_side = "left"
        self.image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})

    def inputs(self, pairs, query_type="text", doc_type="text", max_length=10240, max_query_length=512, max_doc_length=None):
        """The original compute_score's batch for one mini-batch of pairs."""
        if max_doc_length is None:
            max_doc_length = max(max_length - max_query_length, max_query_length)
        texts, images = [], []
        for q, d in pairs:
            if doc_type == "text":
                ids = self.tokenizer(d, truncation=True, max_length=max_doc_length)["input_ids"]
                if len(ids) >= max_doc_length:
                    d = self.tokenizer.decode(ids)
            doc_str = IMAGE if doc_type == "image" else d
            query_str = IMAGE if query_type == "image" else q
            texts.append(f"**Document**:\n{doc_str}\n**Query**:\n{query_str}")
            if doc_type == "image":
                images.append(d if not isinstance(d, (str, Path)) else load_image(str(d)))
            if query_type == "image":
                images.append(q if not isinstance(q, (str, Path)) else load_image(str(q)))
        batch = self.process(texts, images, max_length=max_length - 1)
        n = batch["input_ids"].shape[0]
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((n, 1), SCORE_TOKEN_ID)], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(n, 1, dtype=batch["attention_mask"].dtype)], dim=1)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(n, 1, dtype=batch["mm_token_type_ids"].dtype)], dim=1)
        return batch

    def process(self, texts, images, max_length):
        """What Qwen2VLProcessor.__call__ does (its constructor needs torchvision for the video
        processor, so it is spelt out): image features, one <|image_pad|> per visual token, tokenize."""
        out = {}
        if images:
            feats = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = feats["pixel_values"], feats["image_grid_thw"]
            grids = iter(feats["image_grid_thw"].tolist())
            merge = self.image_processor.merge_size ** 2
            expanded = []
            for text in texts:
                while "<|image_pad|>" in text:
                    t, h, w = next(grids)
                    text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // merge), 1)
                expanded.append(text.replace("<|placeholder|>", "<|image_pad|>"))
            texts = expanded
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        image_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        out["mm_token_type_ids"] = (enc["input_ids"] == image_id).int()
        return out

    @torch.inference_mode()
    def raw_scores(self, pairs, batch_size=8, **kw) -> list[float]:
        out = []
        for i in range(0, len(pairs), batch_size):
            batch = {k: v.to(self.device) for k, v in self.inputs(pairs[i:i + batch_size], **kw).items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            out += self.model(**batch).float().tolist()
        return out

    def token_ids(self, pair, **kw) -> list[int]:
        """Unpadded token ids of one pair."""
        return self.inputs([pair], **kw)["input_ids"][0].tolist()
