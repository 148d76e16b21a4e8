"""AdamW with linear warmup and cosine decay, all from optax."""

from __future__ import annotations

import functools

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


EMBEDDINGS = ("embed_VxD", "unembed_DxV", "embed_lora_a", "embed_lora_b", "unembed_lora_a", "unembed_lora_b")


def parameter_name(path) -> str:
    """The name a parameter has in its module ("q_DxNxH", "scale", "q_bias_NxH"), from
    its key path in the parameter tree, whatever the nesting (stacked layers too)."""
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return str(names[-1])


def decays(name: str, decay_embeddings: bool) -> bool:
    """Weight decay by what a parameter is, not by its rank (a scanned model's stacked
    norm scales are matrices): never norm scales or biases; embeddings (and their LoRA
    adapters) as configured; other adapters, like the weights they adapt, always."""
    if name == "scale" or "bias" in name:
        return False
    return decay_embeddings or name not in EMBEDDINGS


def decay_mask(params, decay_embeddings: bool = True):
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(parameter_name(path), decay_embeddings), params)


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    adamw = optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                        mask=functools.partial(decay_mask, decay_embeddings=o.decay_embeddings))
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw) if o.grad_clip > 0 else adamw
    if config.train.on_nonfinite == "skip":
        # Non-finite gradients leave params and moments untouched; the loop stops the run
        # before optax's own limit would apply them anyway.
        tx = optax.apply_if_finite(tx, max_consecutive_errors=config.train.max_skipped_steps + 1)
    return tx
