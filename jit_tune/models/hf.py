"""Hugging Face checkpoints in and out.

config.json <-> DecoderConfig fields, and safetensors tensors <-> NNX params. Every HF
field is either mapped, known to be metadata, or an error naming it: nothing that
changes the computation is ignored silently.

Import reads each tensor slice by slice: `jax.make_array_from_callback` asks for the
block each local device holds, and only that block is read from the safetensors file
(with pread, see TensorSlicer), transposed into jit_tune's layout, and placed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jit_tune.config import ConfigError
from jit_tune.models.decoder import DecoderConfig

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
_GEMMA = ("gemma2", "gemma3_text")
# Fields that cannot change a decoder's forward pass: most are attributes every
# transformers config carries (PreTrainedConfig, and its v4 predecessor PretrainedConfig).
# Anything else is mapped below or an error.
_METADATA = {
    # Naming and bookkeeping.
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_commit_hash", "tokenizer_class", "prefix", "use_bfloat16", "initializer_range",
    # Special token ids: the tokenizer's business (export writes the tokenizer's).
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id", "decoder_start_token_id",
    # How transformers runs and what it returns, not what it computes (chunking the MLP
    # over the sequence gives the same values).
    "use_cache", "cache_implementation", "attn_implementation", "_attn_implementation_autoset",
    "experts_implementation", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "chunk_size_feed_forward", "tie_last_hidden_states", "gradient_checkpointing", "tf_legacy_loss",
    # Classification heads and fine-tuning tasks, not the causal LM head.
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    # Encoder-decoder wiring a decoder-only *ForCausalLM does not read (add_cross_attention
    # and pruned_heads could change it: checked below).
    "is_encoder_decoder", "is_decoder", "tie_encoder_decoder", "cross_attention_hidden_size",
    # Generation defaults of old configs (transformers now moves them to GenerationConfig).
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # Qwen: which layers use the window; read only with use_sliding_window, which is refused.
    "max_window_layers",
}


class HFConfigError(ConfigError):  # a user error: the CLI prints it, no traceback
    pass


def _rope(hf: dict, source: str) -> dict:
    params = dict(hf.get("rope_parameters") or {})
    fields = {}
    if "full_attention" in params:  # Gemma 3: one rope per layer type
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise HFConfigError(f"{source}: rope_parameters.sliding_attention: only the default rope type is supported")
        fields["rope_local_theta"] = float(local.get("rope_theta", 10_000.0))
        params = dict(params["full_attention"])
    elif "rope_local_base_freq" in hf:
        fields["rope_local_theta"] = float(hf["rope_local_base_freq"])
    legacy = hf.get("rope_scaling") or {}
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params.update({k: v for k, v in legacy.items() if k not in params})
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:  # transformers rotates only part of each head
        raise HFConfigError(f"{source}: partial_rotary_factor = {params['partial_rotary_factor']}: jit_tune "
                            "supports only 1.0 (rope over the whole head)")
    fields.update(rope_theta=float(params["rope_theta"]), rope_scaling=kind)
    if kind == "linear":
        fields["rope_factor"] = float(params["factor"])
    elif kind == "llama3":
        fields.update(
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position=int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise HFConfigError(f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")
    return fields


def decoder_fields_from_hf(hf: dict, source: str) -> dict:
    """config.model fields for a HF config.json; an error for anything unsupported."""
    if "quantization_config" in hf:
        raise HFConfigError(f"{source}: {_quantization(hf['quantization_config'])}")
    archs = hf.get("architectures") or []
    family = FAMILIES.get(archs[0] if archs else "")
    if family is None:
        raise HFConfigError(f"{source}: architectures = {archs}: expected one of {sorted(FAMILIES)}")

    def expect(field: str, ok: Callable[[object], bool], expected: str):
        if field in hf and not ok(hf[field]):
            raise HFConfigError(f"{source}: {field} = {hf[field]!r}: jit_tune supports only {expected}")

    activation = "gelu_pytorch_tanh" if family in _GEMMA else "silu"
    expect("hidden_act", lambda v: v == activation or family in _GEMMA, activation)
    expect("hidden_activation", lambda v: v == activation, activation)
    expect("mlp_bias", lambda v: not v, "false")
    expect("use_bidirectional_attention", lambda v: not v, "false (causal attention)")
    expect("attention_bias", lambda v: not v, "false (no bias on the o projection or in Llama attention)")
    expect("attention_dropout", lambda v: v == 0, "0.0 (no attention dropout)")
    expect("pretraining_tp", lambda v: v == 1, "1")
    expect("use_sliding_window", lambda v: not v, "false (Qwen's per-layer window switch is not implemented)")
    expect("add_cross_attention", lambda v: not v, "false (no cross-attention)")
    expect("pruned_heads", lambda v: not v, "{} (no pruned heads)")
    heads = hf["num_attention_heads"]
    gemma = family in _GEMMA
    fields = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "mlp_dim": hf["intermediate_size"],
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": family == "qwen2",
        "qk_norm": family in ("qwen3", "gemma3_text"),
        "norm_offset": 1.0 if gemma else 0.0,
        "embed_scale": gemma,
        "post_norms": gemma,
        "mlp_activation": "gelu_tanh" if gemma else "silu",
        "attn_softcap": float(hf.get("attn_logit_softcapping") or 0.0),
        "final_softcap": float(hf.get("final_logit_softcapping") or 0.0),
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or 0.0),
        **_layer_types(hf, family),
        **_rope(hf, source),
    }
    if gemma:
        fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    if hf.get("max_position_embeddings"):
        fields["max_position_embeddings"] = int(hf["max_position_embeddings"])
    handled = {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
        "rope_parameters", "hidden_act", "mlp_bias", "attention_bias", "attention_dropout", "pretraining_tp",
        "sliding_window", "use_sliding_window", "hidden_activation", "use_bidirectional_attention",
        "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "layer_types",
        "sliding_window_pattern", "_sliding_window_pattern", "rope_local_base_freq", "max_position_embeddings",
        "add_cross_attention", "pruned_heads",
    }
    unknown = sorted(set(hf) - handled - _METADATA)
    if unknown:
        raise HFConfigError(f"{source}: fields {unknown} are not supported by jit_tune's {family} implementation")
    return fields


def _quantization(config: dict) -> str:
    method = config.get("quant_method", "unknown method")
    details = "".join(f", {k}={config[k]}" for k in ("bits", "load_in_4bit", "load_in_8bit", "fmt") if config.get(k))
    return (f"quantization_config: the weights are quantized ({method}{details}); jit_tune reads unquantized "
            "floating-point safetensors. Use the unquantized checkpoint, or dequantize first: in transformers, "
            "model = AutoModelForCausalLM.from_pretrained(dir); model.dequantize(); "
            "model.save_pretrained(new_dir), and import new_dir.")


def _layer_types(hf: dict, family: str) -> dict:
    """Which layers attend locally: HF's layer_types, else each family's documented pattern."""
    window = hf.get("sliding_window")
    if not window or (family in ("qwen2", "qwen3") and not hf.get("use_sliding_window")):
        return {"sliding_window": 0, "layer_types": ()}
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        kinds = hf["layer_types"]
    elif family == "gemma2":
        kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif family == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:  # Mistral: every layer
        kinds = ["sliding_attention"] * n
    return {"sliding_window": int(window), "layer_types": tuple("sliding" if k == "sliding_attention" else "full"
                                                                for k in kinds)}


def hf_config_from_decoder(config: DecoderConfig, family: str, special_ids: dict, dtype: str = "float32") -> dict:
    """A config.json transformers loads as the same model; an error if `family` cannot
    express `config` (transformers would build a different model from it)."""
    arch = {v: k for k, v in FAMILIES.items()}[family]
    rope = {"rope_type": config.rope_scaling, "rope_theta": config.rope_theta}
    if config.rope_scaling == "linear":
        rope["factor"] = config.rope_factor
    if config.rope_scaling == "llama3":
        rope.update(factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position)
    if family == "gemma3_text" and (config.rope_local_theta or "sliding" in config.layer_types):
        # One rope per layer type. Without rope_local_theta the sliding layers rotate as the
        # full ones do, so written out: an omitted local rope reloads as a base of 10,000.
        local = {"rope_type": "default", "rope_theta": config.rope_local_theta} if config.rope_local_theta else rope
        rope = {"full_attention": rope, "sliding_attention": dict(local)}
    extra = {}
    if config.max_position_embeddings:  # else transformers' class default, which may be anything
        extra["max_position_embeddings"] = config.max_position_embeddings
    # Written whenever the config class has it, null when unused: an omitted window
    # reloads as the class default (Mistral's: 4096).
    if family != "llama":
        extra["sliding_window"] = config.sliding_window if "sliding" in config.layer_types else None
    if family in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = False
    if family in _GEMMA:  # Gemma reads which layers are local from layer_types. Not Mistral:
        # with layer_types, transformers builds a Ministral model instead.
        kinds = config.layer_types or ("full",) * config.n_layers
        extra["layer_types"] = [f"{kind}_attention" for kind in kinds]
        scalar = config.query_pre_attn_scalar or config.head_dim
        extra.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
                     attn_logit_softcapping=config.attn_softcap or None,
                     final_logit_softcapping=config.final_softcap or None)
    hf = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if family in _GEMMA else "silu",
        "rope_parameters": rope,
        "dtype": dtype,
        **extra,
        **special_ids,
    }
    _check_expresses(config, hf, arch)
    return hf


def _check_expresses(config: DecoderConfig, hf: dict, arch: str) -> None:
    """Read the written config.json back: every field must come back as it is."""
    back = {"rope_local_theta": 0.0, **decoder_fields_from_hf(hf, f"the {arch} config.json of an export")}
    ours = dataclasses.asdict(config)
    for fields in (ours, back):  # the same model either way
        fields["query_pre_attn_scalar"] = fields["query_pre_attn_scalar"] or config.head_dim
        fields["layer_types"] = tuple(fields["layer_types"])
        fields["sliding_window"] = fields["sliding_window"] if "sliding" in fields["layer_types"] else 0
        if not fields["rope_local_theta"] and fields["rope_scaling"] == "default":  # the full layers' rope
            fields["rope_local_theta"] = fields["rope_theta"]
    lost = {k: (ours[k], v) for k, v in back.items() if ours[k] != v}
    if lost:
        raise HFConfigError(f"{arch} cannot express this model: " + ", ".join(
            f"{k} = {mine!r} would reload as {theirs!r}" for k, (mine, theirs) in sorted(lost.items())))


# ------------------------------------------------------------------------ weights
# Each param: (HF tensor name, layout). "same": our array is the HF tensor reshaped.
# "in": HF [out..., in] weight of a projection read as ours [in, out...];
# "out": HF [out, in...] read as ours [in..., out]. Both are W.T reshaped.


def weight_names(config: DecoderConfig) -> dict[tuple, tuple[str, str]]:
    names = {("embed_VxD",): ("model.embed_tokens.weight", "same"), ("final_norm", "scale"): ("model.norm.weight", "same")}
    if not config.tie_embeddings:
        names[("unembed_DxV",)] = ("lm_head.weight", "in")
    for i in range(config.n_layers):
        p, b = f"model.layers.{i}.", ("blocks", i)
        names[b + ("attn_norm", "scale")] = (p + "input_layernorm.weight", "same")
        if config.post_norms:  # Gemma: post_attention_layernorm norms the attention output
            names[b + ("attn_post_norm", "scale")] = (p + "post_attention_layernorm.weight", "same")
            names[b + ("mlp_norm", "scale")] = (p + "pre_feedforward_layernorm.weight", "same")
            names[b + ("mlp_post_norm", "scale")] = (p + "post_feedforward_layernorm.weight", "same")
        else:
            names[b + ("mlp_norm", "scale")] = (p + "post_attention_layernorm.weight", "same")
        for ours, theirs in (("q_DxNxH", "q_proj"), ("k_DxKxH", "k_proj"), ("v_DxKxH", "v_proj")):
            names[b + ("attn", ours)] = (f"{p}self_attn.{theirs}.weight", "in")
        names[b + ("attn", "o_NxHxD")] = (p + "self_attn.o_proj.weight", "out")
        if config.qkv_bias:
            for ours, theirs in (("q_bias_NxH", "q_proj"), ("k_bias_KxH", "k_proj"), ("v_bias_KxH", "v_proj")):
                names[b + ("attn", ours)] = (f"{p}self_attn.{theirs}.bias", "same")
        if config.qk_norm:
            names[b + ("attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", "same")
            names[b + ("attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", "same")
        names[b + ("mlp", "gate_DxF")] = (p + "mlp.gate_proj.weight", "in")
        names[b + ("mlp", "up_DxF")] = (p + "mlp.up_proj.weight", "in")
        names[b + ("mlp", "down_FxD")] = (p + "mlp.down_proj.weight", "out")
    return names


def _covering(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, tuple[slice, ...]]:
    """For a block of an array whose leading dims are flattened in the file: the range
    of the flattened axis that covers the block, and the slices left to apply after."""
    first = index[0].indices(shape[0])
    inner = math.prod(shape[1:])
    return slice(first[0] * inner, first[1] * inner), (slice(None),) + tuple(index[1:])


def read_block(file_slice, layout: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of our param of `shape`, read from the HF tensor `file_slice`."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if layout == "same":
        if len(file_slice.get_shape()) == len(shape):
            return np.asarray(file_slice[index])
        rows, rest = _covering(index, shape)
        block = np.asarray(file_slice[rows])
        return block.reshape((-1,) + shape[1:])[rest]
    if layout == "in":  # file [prod(shape[1:]), shape[0]]
        rows, rest = _covering(index[1:], shape[1:])
        block = np.asarray(file_slice[rows, index[0]]).T
        return block.reshape((block.shape[0], -1) + shape[2:])[(slice(None),) + rest]
    # "out": file [shape[-1], prod(shape[:-1])]
    cols, rest = _covering(index[:-1], shape[:-1])
    block = np.asarray(file_slice[index[-1], cols]).T
    return block.reshape((-1,) + shape[1:-1] + (block.shape[-1],))[rest + (slice(None),)]


def to_hf_layout(array: np.ndarray, layout: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if layout == "same":
        return array.reshape(hf_shape)
    if layout == "in":
        return array.reshape(array.shape[0], -1).T
    return array.reshape(-1, array.shape[-1]).T


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CHUNK_BYTES = 8 << 20  # rows are read this much at a time, then cut to the block


class TensorSlicer:
    """Blocks of one tensor in a safetensors file, read with pread: only the requested
    bytes (plus at most one chunk of rows) ever enter the process. Memory-mapping would
    page whole rows in, so a column block would cost the whole tensor in resident memory."""

    def __init__(self, path: Path, dtype: str, shape: list[int], offset: int):
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: dtype {dtype} is not supported (expected one of {sorted(_DTYPES)})")
        self.path, self.dtype, self.shape, self.offset = path, np.dtype(_DTYPES[dtype]), tuple(shape), offset

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        bounds = [s.indices(n)[:2] for s, n in zip(index, self.shape)] + [(0, n) for n in self.shape[len(index):]]
        (r0, r1), cols = bounds[0], bounds[1:]
        row_items = math.prod(self.shape[1:])
        out = np.empty((r1 - r0,) + tuple(b - a for a, b in cols), self.dtype)
        chunk = max(1, _CHUNK_BYTES // max(row_items * self.dtype.itemsize, 1))
        with open(self.path, "rb") as f:
            for start in range(r0, r1, chunk):
                stop = min(start + chunk, r1)
                raw = os.pread(f.fileno(), (stop - start) * row_items * self.dtype.itemsize,
                               self.offset + start * row_items * self.dtype.itemsize)
                rows = np.frombuffer(raw, self.dtype).reshape((stop - start,) + self.shape[1:])
                out[start - r0: stop - r0] = rows[(slice(None),) + tuple(slice(a, b) for a, b in cols)]
        return out


class SafetensorsCheckpoint:
    """Tensor name -> lazily sliceable tensor, over a single or sharded checkpoint."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.directory = directory
        self.tensors = {}
        for file in files:
            with open(directory / file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name != "__metadata__":
                    begin = 8 + header_len + info["data_offsets"][0]
                    self.tensors[name] = TensorSlicer(directory / file, info["dtype"], info["shape"], begin)

    def slice(self, name: str) -> TensorSlicer:
        if name not in self.tensors:
            raise KeyError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]


def load_params(directory: Path, config: DecoderConfig, abstract_params: dict) -> dict:
    """Arrays for the pure-dict of abstract params (ShapeDtypeStructs with shardings),
    each process reading only the blocks its devices hold."""
    return _unflatten(dict(iter_params(directory, config, abstract_params)))


def iter_params(directory: Path, config: DecoderConfig, abstract_params: dict):
    """(path, array) for each abstract param, read when asked for: a caller that converts
    each (quantizes it) holds one float tensor at a time."""
    checkpoint = SafetensorsCheckpoint(directory)
    names = weight_names(config)

    def reader(path, shape):
        name, layout = names[path]
        file_slice = checkpoint.slice(name)
        return lambda index: read_block(file_slice, layout, shape, index)

    def stacked_reader(path, shape):  # scan_layers: [layers, ...] from HF's one tensor per layer
        layers = [reader(("blocks", i) + path[1:], shape[1:]) for i in range(shape[0])]
        return lambda index: np.stack([layers[i](index[1:]) for i in range(*index[0].indices(shape[0]))])

    def load(path, leaf):
        stacked = config.scan_layers and path[0] == "blocks"
        read = (stacked_reader if stacked else reader)(path, leaf.shape)
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: read(index).astype(leaf.dtype))

    for path, leaf in _flatten(abstract_params).items():
        yield path, load(path, leaf)


_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def save_params(params: dict, config: DecoderConfig, directory: Path, max_shard_bytes: int = 2 << 30,
                dtype: str = "float32") -> None:
    """Safetensors shards plus model.safetensors.index.json, in the HF layout, the tensors
    in `dtype` (float32 or bfloat16)."""
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(_SAVE_DTYPES)}")
    names = weight_names(config)
    if config.scan_layers:  # stacked layers become HF's one tensor per layer
        blocks = params["blocks"]
        params = {**params, "blocks": {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(config.n_layers)}}
    tensors = {}
    for path, value in _flatten(params).items():
        name, layout = names[path]
        array = np.asarray(jax.device_get(value), np.float32)  # exact for bf16 params; f32 ones round once
        hf_shape = _hf_shape(array.shape, layout, name)
        tensors[name] = np.ascontiguousarray(to_hf_layout(array, layout, hf_shape).astype(_SAVE_DTYPES[dtype]))
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        if current and size + tensors[name].nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += tensors[name].nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(Path(directory) / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _hf_shape(shape: tuple[int, ...], layout: str, name: str) -> tuple[int, ...]:
    if layout == "same":
        return (math.prod(shape),) if name.endswith(".bias") else shape
    if layout == "in":
        return (math.prod(shape[1:]), shape[0])
    return (shape[-1], math.prod(shape[:-1]))


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{path: leaf}, with list indices as ints however the tree spelled them."""
    flat = {}
    for key, value in tree.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
