"""The train step and the evaluation loss: one jitted function each, at every scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jit_tune.models.decoder import Decoder


def token_losses(model: Decoder, batch: dict[str, jax.Array]) -> jax.Array:
    """Cross-entropy of every target token [B, L]; the caller applies the loss mask."""
    logits_BxLxV, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])


def loss_fn(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Sum of trained-token losses over the whole global batch / its trained-token count.

    The batch is a global array, so these sums already span every host; the mean is per
    trained token, not per row or per example, whatever the mesh or packing.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    n_trained = mask.sum()
    loss = (token_losses(model, batch) * mask).sum() / jnp.maximum(n_trained, 1.0)
    return loss, n_trained


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: Decoder, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    (loss, n_trained), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return {"loss": loss, "trained_tokens": n_trained, "grad_norm": optax.tree.norm(grads)}


@nnx.jit
def eval_losses(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-row summed loss and trained-token count [B], for per-task aggregation."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return (token_losses(model, batch) * mask).sum(axis=1), mask.sum(axis=1)
