"""Models from a Hugging Face directory, created directly in their sharded layout."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jit_tune.models import hf
from jit_tune.models.decoder import Decoder, DecoderConfig


def decoder_config_from_hf_dir(directory: str | Path, dtype: str = "float32",
                               param_dtype: str = "float32") -> DecoderConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a Hugging Face model directory")
    fields = hf.decoder_fields_from_hf(json.loads(path.read_text()), str(path))
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
    param_dtype: str = "float32",
) -> Decoder:
    """A Decoder with the weights of a HF checkpoint dir, each process reading its shards
    and converting them to `param_dtype`. `config` defaults to the one mapped from the
    directory's config.json."""
    config = config or decoder_config_from_hf_dir(directory, dtype, param_dtype)
    model = abstract_decoder(config, mesh, rules)
    state = nnx.state(model)
    params = hf.load_params(Path(directory), config, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def export_hf_decoder(model: Decoder, directory: str | Path, family: str = "llama", special_ids: dict | None = None,
                      dtype: str = "float32") -> None:
    """config.json and safetensors shards (tensors in `dtype`: float32 or bfloat16) that
    transformers loads as the same model."""
    config = model.config
    hf_config = hf.hf_config_from_decoder(config, family, special_ids or {}, dtype)  # fails before any writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf.save_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), config, directory, dtype=dtype)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
