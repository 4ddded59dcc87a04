"""Loading checkpoints: both config layouts, shards, dtypes, 5.x saves, and clear errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from m0lite import Reranker, WeightsError
from m0lite.config import ModelConfig
from m0lite.weights.loader import expected_tensors, load_model
from m0lite.fixtures.random_checkpoint import TINY_CONFIG, write_random_checkpoint

PAIRS = [["what is m0lite", "a small reranker"], ["数据", "Daten über Daten"]]


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def test_layout_is_the_published_one(tiny_ckpt):
    names = set(load_file(str(tiny_ckpt / "model.safetensors")))
    assert {"visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight", "visual.merger.ln_q.weight",
            "visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight", "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "score.0.weight", "score.0.bias",
            "score.2.weight", "score.2.bias"} <= names
    assert not any(n.startswith("lm_head") for n in names)
    assert load_file(str(tiny_ckpt / "model.safetensors"))["visual.patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]} and "text_config" not in config


def test_full_size_layout_has_the_real_dimensions():
    shapes = expected_tensors(ModelConfig())
    assert shapes["model.embed_tokens.weight"] == (151936, 1536)
    assert shapes["model.layers.27.self_attn.k_proj.weight"] == (256, 1536)
    assert shapes["visual.blocks.31.attn.qkv.weight"] == (3840, 1280)
    assert shapes["visual.merger.mlp.0.weight"] == (5120, 5120)
    assert shapes["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == pytest.approx(2.21e9, rel=0.01)


def test_nested_5x_config_reads_the_same():
    flat = TINY_CONFIG.to_dict()
    text = {k: v for k, v in flat.items() if k not in ("vision_config", "rope_scaling", "rope_theta")}
    nested = {"model_type": "qwen2_vl", "vision_config": flat["vision_config"],
              "text_config": {**text, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}}}
    assert ModelConfig.from_dict(nested) == ModelConfig.from_dict(flat) == TINY_CONFIG


def test_sharded_and_half_precision_files_load(tmp_path, tiny_reranker):
    expected = tiny_reranker.compute_score(PAIRS, normalize_scores=False)
    sharded = write_random_checkpoint(tmp_path / "sharded", seed=0, max_shard_bytes=4_000_000)
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("model-*.safetensors"))) > 1
    assert Reranker.from_pretrained(sharded, dtype="float32").compute_score(PAIRS, normalize_scores=False) == pytest.approx(expected, abs=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        half = write_random_checkpoint(tmp_path / str(dtype), seed=0, dtype=dtype)
        model = load_model(half, torch.float32)
        assert model.model.norm.weight.dtype == torch.float32
        # Same seed, rounded weights: close to the fp32 checkpoint, not equal.
        assert Reranker.from_pretrained(half, dtype="float32").compute_score(PAIRS, normalize_scores=False) == pytest.approx(expected, abs=0.05)


def test_transformers_5x_save_loads(tmp_path, tiny_ckpt, tiny_reference, tiny_reranker):
    """A checkpoint re-saved by transformers 5.x (nested config, model.language_model.* names)."""
    from tests.reference import JinaVLForRanking

    out = tmp_path / "saved5x"
    # A model built by transformers itself (not loaded with the 4.x key mapping, which save_pretrained
    # would write back) saves its own 5.x names.
    native = JinaVLForRanking(tiny_reference.model.config)
    native.load_state_dict(tiny_reference.model.state_dict())
    native.save_pretrained(out)
    for f in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(tiny_ckpt / f, out / f)
    assert "text_config" in json.loads((out / "config.json").read_text())
    names = set()
    for f in out.glob("*.safetensors"):
        names |= set(load_file(str(f)))
    assert any(n.startswith("model.language_model.") for n in names) and any(n.startswith("model.visual.") for n in names)
    rr = Reranker.from_pretrained(out, dtype="float32")
    assert rr.compute_score(PAIRS, normalize_scores=False) == pytest.approx(tiny_reranker.compute_score(PAIRS, normalize_scores=False), abs=1e-6)


def _rewrite(ckpt, edit):
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt, torch.float32)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.9.extra": torch.zeros(3)}))
    with pytest.raises(WeightsError, match=r"unexpected tensors: model\.layers\.9\.extra"):
        load_model(ckpt, torch.float32)


def test_wrong_shape_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"score.0.weight": torch.zeros(64, 65)}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor score\.0\.weight has shape \(64, 65\), expected \(64, 64\)"):
        load_model(ckpt, torch.float32)


def test_integer_tensor_is_refused(ckpt):
    _rewrite(ckpt, lambda t: t.update({"score.2.bias": torch.zeros(1, dtype=torch.int32)}))
    with pytest.raises(WeightsError, match=r"score\.2\.bias has dtype torch\.int32"):
        load_model(ckpt, torch.float32)


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_or_corrupt_file_is_named(ckpt, keep):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        load_model(ckpt, torch.float32)


def test_layout_fix_up_goes_both_ways(tiny_ckpt):
    """The file's tensors -> our modules -> the file's tensors again: every name, shape and value."""
    from m0lite.weights.loader import to_checkpoint

    on_disk = load_file(str(tiny_ckpt / "model.safetensors"))
    back = to_checkpoint(load_model(tiny_ckpt, torch.float32))
    assert back.keys() == on_disk.keys()
    assert all(torch.equal(back[n], on_disk[n].float()) for n in on_disk)


def test_image_token_id_of_tokenizer_and_config_must_agree(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["image_token_id"] += 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"<\|image_pad\|> is id \d+, config.json's image_token_id is \d+"):
        Reranker.from_pretrained(ckpt)


def test_vision_geometry_other_than_preprocessing_is_refused(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"]["spatial_merge_size"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"vision_config cuts images into .* = \(14, 2, 4, 1176\)"):
        Reranker.from_pretrained(ckpt)


def test_missing_files_and_bad_config(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_model(ckpt, torch.float32)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json"):
        load_model(ckpt, torch.float32)
    with pytest.raises(WeightsError, match="no such checkpoint folder"):
        Reranker.from_pretrained(tmp_path / "nowhere")


def test_hub_id_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="huggingface-cli download"):
        Reranker.from_pretrained("jinaai/jina-reranker-m0")


# Loads a checkpoint in another dtype than its file's; prints the peak growth of resident memory while loading
# (VmHWM over the RSS before it) and the bytes the model holds.
LOAD_PEAK = """
import sys, torch
from m0lite.weights.loader import load_model
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS:")
model = load_model(sys.argv[1], torch.float32)
print(status("VmHWM:") - before, sum(t.nbytes for t in model.state_dict().values() if t.dtype == torch.float32))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc")
def test_a_converted_load_holds_no_page_of_the_file(tmp_path):
    """bf16 on disk, fp32 in use (the exact mode's dtype on CPUs without native bf16): each tensor's mapped
    pages are handed back once it is converted, so the peak is the model, not the model and the file."""
    import dataclasses
    import subprocess

    # 8 layers of MLP weights of 6 MiB each in bf16, so that no tensor is a large part of the file (the peak
    # holds the file pages of the tensor being converted).
    config = ModelConfig(text=dataclasses.replace(TINY_CONFIG.text, num_hidden_layers=8, intermediate_size=16384),
                         vision=TINY_CONFIG.vision)
    ckpt = write_random_checkpoint(tmp_path / "ckpt", config, dtype=torch.bfloat16)
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth, held = map(int, out.stdout.split())
    file_bytes = (ckpt / "model.safetensors").stat().st_size
    assert held > 1.3 * file_bytes  # fp32 copies of the decoder layers: the file less its embeddings, doubled
    assert growth < held + 0.5 * file_bytes  # without the hand-back: held + the whole file


def test_a_converted_load_converts_the_vision_tower_when_it_runs(tmp_path):
    """bf16 on disk, fp32 in use: the token embeddings stay as stored (a pass converts the rows it reads) and
    the vision tower is converted before its first pass, so a text-only process never holds it in fp32. The
    scores are those of the model converted whole at load, bit for bit."""
    from PIL import Image

    from m0lite.memory import convert_pending

    ckpt = write_random_checkpoint(tmp_path / "ckpt", TINY_CONFIG, dtype=torch.bfloat16)
    rr = Reranker.from_pretrained(ckpt, dtype="float32")
    eager = Reranker.from_pretrained(ckpt, dtype="float32")
    convert_pending(eager.model.visual)
    eager.model.model.embed_tokens.weight.data = eager.model.model.embed_tokens.weight.data.float()
    m = rr.model
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16 and m.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in m.visual.parameters())
    text = [["a query", "a document about things"], ["a query", "another one"]]
    assert rr.compute_score(text) == eager.compute_score(text)
    assert all(p.dtype == torch.bfloat16 for p in m.visual.parameters())  # text only: still as stored
    image = Image.new("RGB", (64, 56), (200, 30, 90))
    ours = [rr.compute_score([["a query", image]], doc_type="image"), rr.compute_score([[image, "a document"]], query_type="image")]
    theirs = [eager.compute_score([["a query", image]], doc_type="image"), eager.compute_score([[image, "a document"]], query_type="image")]
    assert ours == theirs
    assert all(p.dtype == torch.float32 for p in m.visual.parameters())
