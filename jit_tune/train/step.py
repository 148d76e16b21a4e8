"""The train step and the evaluation loss: one jitted function each, at every scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from jit_tune.mesh import BATCH_SPEC
from jit_tune.models.decoder import Decoder


def token_losses(model: Decoder, batch: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy of every target token [B, L]; the caller applies the loss mask."""
    logits_BxLxV, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])


def _summed_loss(params: nnx.State, graphdef, rest: nnx.State, batch: dict[str, jax.Array]):
    """Sum of trained-token losses, and the trained-token count, of one (micro)batch."""
    model = nnx.merge(graphdef, params, rest)
    mask = batch["loss_mask"].astype(jnp.float32)
    return (token_losses(model, batch) * mask).sum(), mask.sum()


def _microbatches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, L] -> [k, B/k, L], microbatch j holding rows j, j+k, ...: each device keeps
    its own rows (the batch is sharded over rows), split evenly over the microbatches."""
    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(None, *BATCH_SPEC))
    return jax.tree.map(split, batch)


@nnx.jit(donate_argnums=(0, 1), static_argnames="microbatches")
def train_step(model: Decoder, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               microbatches: int = 1) -> dict[str, jax.Array]:
    """One optimizer step on a global batch, in `microbatches` sequential slices (gradient
    accumulation). The loss is the sum of trained-token losses over the whole global
    batch over its trained-token count, whatever the mesh, packing or slicing; the batch
    is a global array, so these sums already span every host."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.value_and_grad(_summed_loss, has_aux=True)

    def accumulate(totals, micro):
        (loss_sum, n_trained), grads = grad_fn(params, graphdef, rest, micro)
        return jax.tree.map(jnp.add, totals, (loss_sum, n_trained, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, n_trained, grads), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, microbatches))
    denominator = jnp.maximum(n_trained, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    optimizer.update(model, grads)
    return {"loss": loss_sum / denominator, "trained_tokens": n_trained, "grad_norm": optax.tree.norm(grads)}


@nnx.jit
def eval_losses(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-row summed loss and trained-token count [B], for per-task aggregation."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return (token_losses(model, batch) * mask).sum(axis=1), mask.sum(axis=1)
