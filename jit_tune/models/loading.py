"""Models from a Hugging Face directory, created directly in their sharded layout.

With LoRA, the directory gives the frozen base (quantized as it is read, for QLoRA) and
the adapters start fresh; a fingerprint of the directory ties a LoRA checkpoint to the
base it was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jit_tune.models import hf
from jit_tune.models.decoder import Decoder, DecoderConfig
from jit_tune.models.lora import LoraConfig, merged_weights
from jit_tune.models.quantize import quantize


def init_from_directory(init_from: str | Path) -> Path:
    """The Hugging Face dir config.model.init_from names: itself, or for a .gguf file its
    conversion in the cache (models/gguf.py)."""
    path = Path(init_from)
    if path.is_file():
        from jit_tune.models.gguf import init_from_directory as gguf_conversion

        return gguf_conversion(path)
    return path


def decoder_config_from_hf_dir(directory: str | Path, dtype: str = "float32",
                               param_dtype: str = "float32") -> DecoderConfig:
    from jit_tune.config import ConfigError
    from jit_tune.files import read_json

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a Hugging Face model directory")
    values = read_json(path)
    if (Path(directory) / "checkpoints").is_dir() and "train" in values:  # a run's config.json
        raise ConfigError(f"{directory} is a jit-tune workdir, not a Hugging Face model directory: generate and eval "
                          f"take it as --workdir {directory}; `jit-tune export --workdir {directory} --out DIR` "
                          "writes a Hugging Face directory of it")
    fields = hf.decoder_fields_from_hf(values, str(path))
    return DecoderConfig(**fields, dtype=dtype, param_dtype=param_dtype)


def abstract_decoder(config: DecoderConfig, mesh: Mesh, rules) -> Decoder:
    """Shapes, dtypes and device shardings of a Decoder, with no memory spent on values."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x: on_mesh(x, mesh), state))


def on_mesh(leaf, mesh: Mesh):
    """eval_shape leaves carry shardings over an abstract mesh; reading needs devices."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))


def load_hf_decoder(
    directory: str | Path, mesh: Mesh, rules, config: DecoderConfig | None = None, dtype: str = "float32",
    param_dtype: str = "float32", seed: int = 0,
) -> Decoder:
    """A Decoder with the weights of a HF checkpoint dir, each process reading its shards
    and converting them to `param_dtype`. `config` defaults to the one mapped from the
    directory's config.json; with LoRA, the adapters are new (from `seed`)."""
    config = config or decoder_config_from_hf_dir(directory, dtype, param_dtype)
    model = abstract_decoder(config, mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        load_base_weights(model, directory, mesh, rules)
        if config.lora.rank:
            init_adapters(model, seed)
    return model


def load_base_weights(model: Decoder, directory: str | Path, mesh: Mesh, rules) -> None:
    """Read every weight but the adapters into `model` (abstract or not) in place. A
    weight stored quantized is quantized as it is read, so beside the model no more than
    one float tensor is ever in memory."""
    plain = abstract_decoder(dataclasses.replace(model.config, lora=LoraConfig()), mesh, rules)
    state = nnx.state(model)
    targets = hf._flatten(nnx.to_pure_dict(state))
    values = {}
    for path, array in hf.iter_params(Path(directory), model.config, nnx.to_pure_dict(nnx.state(plain))):
        if path in targets:
            values[path] = array
            continue
        weight = functools.reduce(lambda node, key: node[key] if isinstance(key, int) else getattr(node, key),
                                  path, model)  # a QuantizedWeight
        codes, scales = targets[(*path, "codes")], targets[(*path, "scales")]
        convert = jax.jit(functools.partial(quantize, kind=weight.kind, ndim=weight.ndim, n_in=weight.n_in),
                          out_shardings=(codes.sharding, scales.sharding))
        values[(*path, "codes")], values[(*path, "scales")] = convert(array)
    nnx.replace_by_pure_dict(state, hf._unflatten(values))
    nnx.update(model, state)


def init_adapters(model: Decoder, seed: int) -> None:
    """Fresh adapters in place: those of a new Decoder(config, Rngs(seed)), the values a
    run without init_from starts with. Only they leave the jitted constructor, so XLA
    drops the rest of its initialization. Call under the mesh and its rules."""
    config = model.config
    adapters = nnx.jit(lambda: nnx.to_pure_dict(nnx.state(Decoder(config, nnx.Rngs(seed)), nnx.LoRAParam)))()
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)


def export_hf_decoder(model: Decoder, directory: str | Path, family: str = "llama", special_ids: dict | None = None,
                      dtype: str = "float32") -> None:
    """config.json and safetensors shards (tensors in `dtype`: float32 or bfloat16) that
    transformers loads as the same model: LoRA adapters merged into their weights in
    float32, a quantized base dequantized."""
    config = model.config
    hf_config = hf.hf_config_from_decoder(config, family, special_ids or {}, dtype)  # fails before any writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_params(merged_weights(model), config, directory, dtype=dtype)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


SAMPLE_BYTES = 4096


def base_fingerprint(init_from: str | Path) -> str:
    """A digest of the weights init_from names, which a LoRA checkpoint records: of
    config.json and, for every safetensors file, its size, its header and the first and
    middle 4 KiB of every tensor. It reads a few MB whatever the model's size, tells
    different weights apart, and does not change when the base is moved or copied (a
    path or mtime would)."""
    directory = init_from_directory(init_from)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{init_from}: no Hugging Face model directory (config.json) there")
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header_bytes = f.read(length)
            digest.update(f"{file.name}:{file.stat().st_size}".encode() + header_bytes)
            for name, info in sorted(json.loads(header_bytes).items()):
                if name == "__metadata__":
                    continue
                begin, end = (8 + length + offset for offset in info["data_offsets"])
                for start in (begin, (begin + end) // 2):
                    f.seek(start)
                    digest.update(f.read(min(SAMPLE_BYTES, end - start)))
    return digest.hexdigest()
