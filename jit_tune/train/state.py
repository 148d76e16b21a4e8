"""Model + optimizer, created directly in their sharded layout on the mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from jit_tune import mesh as mesh_lib
from jit_tune.models.decoder import Decoder, DecoderConfig
from jit_tune.train.optimizer import make_optimizer


def decoder_config(config: ConfigDict) -> DecoderConfig:
    return DecoderConfig(**config.model.to_dict())


def create_model_and_optimizer(config: ConfigDict, mesh: Mesh, abstract: bool = False):
    """Parameters and optimizer state placed by the logical-axis rules at creation.

    With `abstract`, only shapes, dtypes and shardings (the restore target of a
    checkpoint), so no memory is spent on values that would be overwritten.
    """
    model_config = decoder_config(config)
    tx = make_optimizer(config)

    def create():
        model = Decoder(model_config, rngs=nnx.Rngs(config.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.logical_rules(config)):
        if not abstract:
            return nnx.jit(create)()
        graphdef, state = nnx.split(nnx.eval_shape(create))
    return nnx.merge(graphdef, jax.tree.map(lambda x: _on_mesh(x, mesh), state))


def _on_mesh(leaf, mesh: Mesh):
    """eval_shape leaves carry shardings over an abstract mesh; a restore needs devices."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    spec = leaf.sharding.spec if isinstance(leaf.sharding, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))
