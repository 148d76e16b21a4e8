"""The train step, one jitted function at every scale, and the per-token loss evaluation
scores with.

Neither holds float32 logits for the whole batch (train/loss.py): both take the
vocabulary `loss_chunk` positions at a time, the training loss with each chunk's
gradient formed in the same pass.

The gradient is taken with respect to what the model trains (`lora.trainable`): every
parameter, or with LoRA the adapters alone, the frozen base then being a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from jit_tune.mesh import BATCH_SPEC
from jit_tune.models.decoder import Decoder
from jit_tune.models.lora import dropout_key, trainable
from jit_tune.train.loss import fused_loss, token_losses as chunked_token_losses

LOSS_CHUNK = 1024  # config.train.loss_chunk's default


def token_losses(model: Decoder, batch: dict[str, jax.Array], chunk: int = 0) -> jax.Array:
    """Cross-entropy of every target token [B, L], the vocabulary projected `chunk`
    positions of each row at a time (0: all at once); the caller applies the loss mask.
    (Evaluation and scoring; training uses fused_loss, which also forms the gradient.)"""
    hidden, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], hidden_only=True)
    return chunked_token_losses(hidden, model.unembedding(), batch["targets"], model.config.final_softcap, chunk)


def _summed_loss(params: nnx.State, graphdef, rest: nnx.State, batch: dict[str, jax.Array], loss_chunk: int,
                 num_tasks: int, key: jax.Array | None = None):
    """Sum of trained-token losses of one (micro)batch, and (not differentiated) its
    trained-token count and, with `num_tasks`, each task's loss sum and trained tokens.
    `key`: LoRA dropout's."""
    model = nnx.merge(graphdef, params, rest)
    hidden, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"], hidden_only=True, dropout_key=key)
    mask = batch["loss_mask"].astype(jnp.float32)
    loss_sum, losses = fused_loss(hidden, model.unembedding(), batch["targets"], mask, model.config.final_softcap,
                                  loss_chunk)
    sums = {"trained_tokens": mask.sum()}
    if num_tasks:  # task_ids: 1 + the task's index in the mixture; 0 for padding, dropped
        def per_task(x):
            return jax.ops.segment_sum(x.ravel(), batch["task_ids"].ravel(), num_tasks + 1)[1:]
        sums.update(task_loss_sums=per_task(losses * mask), task_tokens=per_task(mask))
    return loss_sum, sums


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, L] -> [k, B/k, L], microbatch j holding rows j, j+k, ...: each device keeps
    its own rows (the batch is sharded over rows), split evenly over the microbatches."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(None, *BATCH_SPEC))
    return jax.tree.map(split, batch)


def summed_loss_and_grads(model: Decoder, batch: dict[str, jax.Array], microbatches: int = 1,
                          loss_chunk: int = LOSS_CHUNK, num_tasks: int = 0,
                          dropout_key: jax.Array | None = None) -> tuple[dict, nnx.State]:
    """The sums over the whole batch (`_summed_loss`'s, with the loss sum as "loss_sum")
    and the gradient of the loss sum with respect to the trained parameters (all, or
    LoRA's adapters), in `microbatches` sequential slices (gradient accumulation).
    Traced inside train_step; tests jit it on its own."""
    graphdef, params, rest = nnx.split(model, trainable(model.config), ...)
    grad_fn = jax.value_and_grad(_summed_loss, has_aux=True)

    def accumulate(totals, micro_and_index):
        micro, index = micro_and_index
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        (loss_sum, sums), grads = grad_fn(params, graphdef, rest, micro, loss_chunk, num_tasks, key)
        return jax.tree.map(jnp.add, totals, ({"loss_sum": loss_sum, **sums}, grads)), None

    zero = jnp.zeros((), jnp.float32)
    sums = {"loss_sum": zero, "trained_tokens": zero}
    if num_tasks:
        sums.update(task_loss_sums=jnp.zeros(num_tasks), task_tokens=jnp.zeros(num_tasks))
    (sums, grads), _ = jax.lax.scan(accumulate, (sums, jax.tree.map(jnp.zeros_like, params)),
                                    (_microbatches(batch, microbatches), jnp.arange(microbatches)))
    return sums, grads


@nnx.jit(donate_argnums=(0, 1), static_argnames=("microbatches", "loss_chunk", "num_tasks"))
def train_step(model: Decoder, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], microbatches: int = 1,
               loss_chunk: int = LOSS_CHUNK, num_tasks: int = 0) -> dict[str, jax.Array]:
    """One optimizer step on a global batch, in `microbatches` sequential slices (gradient
    accumulation). The loss is the sum of trained-token losses over the whole global
    batch over its trained-token count, whatever the mesh, packing, slicing or loss
    chunking; the batch is a global array, so these sums already span every host.

    With `num_tasks` (the batch then holds `task_ids`), the metrics also hold each
    task's summed loss and trained tokens [num_tasks], for per-task training curves."""
    key = dropout_key(model.config, optimizer.step[...])  # None without LoRA dropout
    sums, grads = summed_loss_and_grads(model, batch, microbatches, loss_chunk, num_tasks, key)
    denominator = jnp.maximum(sums["trained_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    optimizer.update(model, grads)
    metrics = {"loss": sums.pop("loss_sum") / denominator, "grad_norm": optax.tree.norm(grads)}
    return {**metrics, **sums}
