"""GGUF files (llama.cpp's format) as a model source.

transformers reads a GGUF file and dequantizes its weights to float; `convert_gguf`
writes the result as a Hugging Face model directory, the one format the rest of jit_tune
reads (config.json, safetensors, the tokenizer with the file's chat template,
generation_config.json). `config.model.init_from` may name a .gguf file: it is converted
once, at config load, into a cache directory (`init_from_directory`).

    jit-tune convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2   (then init_from, eval --hf, generate --hf)
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from jit_tune.config import ConfigError
from jit_tune.files import atomic_directory, mark_output, replaceable_output

MAGIC = b"GGUF"  # the first four bytes of every GGUF file
INSTALL_HINT = "pip install 'jit_tune[gguf]'"
DTYPES = ("float32", "bfloat16")


class GGUFError(ConfigError):
    pass


def convert_gguf(path: Path, out: Path, dtype: str = "float32") -> Path:
    """Write the GGUF file `path`, dequantized to `dtype`, as a Hugging Face model dir at
    `out`: written to a temporary sibling and renamed into place, so `out` is a whole
    conversion or untouched. An existing `out` must be an earlier conversion."""
    path, out = Path(path), Path(out)
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    _check_gguf(path)
    if refused := replaceable_output(out, "conversion"):
        raise GGUFError(refused)
    missing = [name for name in ("gguf", "torch", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GGUFError(f"{path}: reading a GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    source = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    try:
        # The config first (metadata only): an architecture jit_tune cannot run fails before
        # the weights are dequantized. Passed on, so the metadata is parsed once (~10 s
        # for a 49k-token vocabulary).
        config = _as_saved(AutoConfig.from_pretrained(**source))
        _check_supported(config, path)
        # dequantize=True: never the packed GGUF blocks transformers keeps where it has kernels.
        model = AutoModelForCausalLM.from_pretrained(**source, config=config, dtype=getattr(torch, dtype),
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except GGUFError:
        raise
    except (ValueError, NotImplementedError, KeyError, OSError) as e:  # transformers' "not supported yet" & co
        raise GGUFError(f"{path}: transformers cannot read this GGUF file: {e}") from None
    config = _as_saved(model.config)
    state = model.state_dict()
    if config.tie_word_embeddings:  # one tensor under two names; transformers ties it again on load
        state.pop("lm_head.weight", None)
    # Written even when None, as export does: an absent id reloads as the family's default.
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    with atomic_directory(out) as directory:
        config.save_pretrained(directory)
        # model.save_pretrained refuses a model loaded from GGUF (it counts as quantized).
        save_torch_state_dict(state, directory, max_shard_size="5GB")
        tokenizer.save_pretrained(directory)
        _drop_tokens_beyond(directory, config.vocab_size)
        GenerationConfig(**special).save_pretrained(directory)
        mark_output(directory, "conversion")
    return out


def init_from_directory(init_from: str | Path) -> Path:
    """The Hugging Face model dir `config.model.init_from` names: the directory itself, or
    for a GGUF file its conversion in the cache (converted now if the cache lacks it)."""
    init_from = Path(init_from)
    return cached_conversion(init_from) if init_from.is_file() else init_from


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jit_tune" / "gguf"


def cached_conversion(path: Path) -> Path:
    """The float32 conversion of the GGUF file `path` in the cache, keyed by the file's
    absolute path, size and mtime: a changed file is converted again (and the conversion
    of its earlier version removed). Processes that ask at once convert it once: the
    others wait on a lock, and a reader never sees half a conversion (atomic rename)."""
    path = Path(path).resolve()
    _check_gguf(path)
    stat = path.stat()
    prefix = f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    version = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    root = cache_root()
    out = root / f"{prefix}-{version}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{prefix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not out.is_dir():
            convert_gguf(path, out)
            for stale in root.glob(glob.escape(prefix) + "-*"):  # earlier versions of this file
                if stale != out:
                    shutil.rmtree(stale, ignore_errors=True)
    return out


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise GGUFError(f"{path}: {'is a directory' if path.is_dir() else 'no such file'}; expected a GGUF file")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {MAGIC!r}); "
                        "expected a .gguf file from llama.cpp, or a Hugging Face model directory")


def _as_saved(config):
    """The config as the converted directory states it: the weights are dequantized floats
    now, the architecture is named as save_pretrained names it, and the file's
    general.name (which transformers keeps as `_model_name_or_path`) is left out."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for field in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, field):
            delattr(config, field)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)]
    return config


def _drop_tokens_beyond(directory: Path, vocab_size: int) -> None:
    """transformers builds a byte-level GGUF tokenizer from a GPT2Tokenizer, whose default
    special token <|endoftext|> it adds (as id vocab_size) when the file's vocabulary lacks
    it (Llama 3, the tiny test file): a token the model has no embedding for, so dropped."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return
    spec = json.loads(path.read_text())
    kept = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    if len(kept) < len(spec["added_tokens"]):
        path.write_text(json.dumps({**spec, "added_tokens": kept}, ensure_ascii=False, indent=2))


def _check_supported(config, path: Path) -> None:
    from jit_tune.models.hf import HFConfigError, decoder_fields_from_hf

    try:
        decoder_fields_from_hf(config.to_diff_dict(), str(path))
    except HFConfigError as e:
        raise GGUFError(f"{e} (read from the GGUF file's metadata; jit_tune cannot train this model)") from None
