"""Model + optimizer, created directly in their sharded layout on the mesh.

With LoRA (config.lora.rank > 0) the optimizer holds only the adapters' moments, and
a checkpoint only the adapters: restoring reads the frozen base from model.init_from
again (`restore_model_and_optimizer`), after checking it is the base the adapters were
trained on.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from jit_tune import mesh as mesh_lib
from jit_tune.models.attention import Blocks
from jit_tune.models.decoder import Decoder, DecoderConfig
from jit_tune.models.loading import init_from_directory, load_base_weights, load_hf_decoder, on_mesh
from jit_tune.models.lora import LoraConfig, trainable
from jit_tune.train.optimizer import make_optimizer


def decoder_config(config: ConfigDict) -> DecoderConfig:
    fields = {f.name for f in dataclasses.fields(DecoderConfig)}
    values = {k: v for k, v in config.model.to_dict().items() if k in fields}
    if "max_position_embeddings" in fields:  # a model trained from scratch serves what it was trained on
        values["max_position_embeddings"] = config.model.max_position_embeddings or config.data.seq_len
    values["lora"] = LoraConfig(**config.lora.to_dict(), seed=config.seed)
    values["attention_blocks"] = Blocks(**config.model.attention_blocks.to_dict())
    return DecoderConfig(**values)


def create_model_and_optimizer(config: ConfigDict, mesh: Mesh, abstract: bool = False):
    """Parameters and optimizer state placed by the logical-axis rules at creation.

    With `abstract`, only shapes, dtypes and shardings (the restore target of a
    checkpoint, or what `jit-tune compile` plans; no file is read), so no memory is
    spent on values that would be overwritten.
    """
    model_config = decoder_config(config)
    tx = make_optimizer(config)
    wrt = trainable(model_config)

    def create():
        model = Decoder(model_config, rngs=nnx.Rngs(config.seed))
        return model, nnx.Optimizer(model, tx, wrt=wrt)

    with mesh_lib.use_mesh(config, mesh):
        if not abstract and not config.model.init_from:
            return nnx.jit(create)()
        if not abstract:  # weights from a HF checkpoint, read shard by shard
            model = load_hf_decoder(init_from_directory(config.model.init_from), mesh, mesh_lib.logical_rules(config),
                                    model_config, seed=config.seed)
            return model, nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=wrt))(model)
        graphdef, state = nnx.split(nnx.eval_shape(create))
    return nnx.merge(graphdef, jax.tree.map(lambda x: on_mesh(x, mesh), state))


def restore_model_and_optimizer(config: ConfigDict, mesh: Mesh, checkpointer, step: int, data_iterator=None,
                                with_optimizer: bool = True):
    """Model and optimizer restored from `checkpointer`'s `step` (and the data iterator's
    position, given one). A LoRA checkpoint holds the adapters only: the base is read
    from model.init_from, once the checkpoint's fingerprint of it matches. Without
    `with_optimizer` (evaluation, export), the optimizer comes back as None and its state
    is not read."""
    if config.lora.rank:
        checkpointer.check_base(step, config.model.init_from)
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=True)
    if config.lora.rank:
        with mesh_lib.use_mesh(config, mesh):
            load_base_weights(model, init_from_directory(config.model.init_from), mesh,
                              mesh_lib.logical_rules(config))
    optimizer = optimizer if with_optimizer else None
    checkpointer.restore(step, model, optimizer, data_iterator)
    return model, optimizer
