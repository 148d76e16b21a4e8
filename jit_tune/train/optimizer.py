"""AdamW with linear warmup and cosine decay, all from optax."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    o = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=config.train.steps,
        end_value=o.lr * o.end_lr_ratio,
    )


def _decay_mask(params):
    # Norm scales (vectors) are not decayed; matrices and embeddings are.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=_decay_mask
    )
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    if config.train.on_nonfinite == "skip":
        # Non-finite gradients leave params and moments untouched; the loop stops the run
        # before optax's own limit would apply them anyway.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=config.train.max_skipped_steps + 1)
    return tx
