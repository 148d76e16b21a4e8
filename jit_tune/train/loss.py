"""The training loss: cross-entropy over the vocabulary, fused with its gradient, in chunks.

The loss never holds float32 logits for the whole batch ([B, L, V] is 4 GiB per row of
8k tokens over a 128k vocabulary). `fused_loss` projects the final hidden states to the
vocabulary `chunk` positions at a time, and in the same pass forms each chunk's
gradient: the softmax minus the one-hot target, weighted by the loss mask, taken back
through the projection (as Liger's fused linear cross-entropy does). The backward pass
then only scales what the forward kept: the hidden states' gradient [B, L, D] and the
projection's [D, V]. So only one chunk's logits, [B, chunk, V], are ever alive, and
no logits are recomputed: a rematerialized chunk loop (MaxText's vocabulary tiling,
Levanter's blockwise loss) runs the projection's forward product twice, which at a
128k vocabulary is a sizeable part of a small model's step.

The price: the function's one differentiable output is the weighted sum of the
losses. The per-token losses come out too (per-task training curves) but carry no
gradient; and the gradient is formed whether or not it is used.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jit_tune.mesh import platform
from jit_tune.models.decoder import Unembedding, constrain, vocab_logits

# On a CPU, a chunk's float32 logits are written by one product and read back by the
# log-sum-exp, the softmax and the gradient's two products. In chunks of about 512 rows
# they stay in the caches: the CPU benchmark's step (batch 8 x 512, 8k vocabulary) ran
# 10% faster in float32 and 12% in bf16 than with all 4,096 rows at once, and at a 32k
# vocabulary 27%. Fewer rows cost the products more than the caches give back (256 rows:
# slower at both vocabularies), so the rule is rows, not bytes.
CPU_CHUNK_ROWS = 512


def fused_loss(hidden_BxLxD: jax.Array, unembed: Unembedding, targets_BxL: jax.Array, weights_BxL: jax.Array,
               softcap: float, chunk: int) -> tuple[jax.Array, jax.Array]:
    """sum(weights * cross-entropy) over every position, differentiable with respect to
    the hidden states and the projection (any of its factors); and the per-token
    cross-entropy [B, L], not differentiable. `chunk` positions of every row at a time
    (0, or a chunk >= L: all at once; see `chunk_positions`); L need not be a multiple of it."""
    total, losses_BxL = _fused(hidden_BxLxD, unembed, targets_BxL, weights_BxL.astype(jnp.float32), softcap, chunk)
    return total, jax.lax.stop_gradient(losses_BxL)


def token_losses(hidden_BxLxD: jax.Array, unembed: Unembedding, targets_BxL: jax.Array, softcap: float,
                 chunk: int) -> jax.Array:
    """The cross-entropy of every position [B, L] (no mask applied), `chunk` positions of
    every row at a time as the training loss takes them, without forming a gradient: for
    evaluation, whose batches would otherwise hold float32 logits of [B, L, V].
    Differentiable by plain autodiff through the chunk loop (tests)."""
    weights_BxL = jnp.ones(targets_BxL.shape, jnp.float32)
    return _losses_and_grads(hidden_BxLxD, unembed, targets_BxL, weights_BxL, softcap, chunk, None)[1]


def chunk_positions(chunk: int, rows: int, length: int) -> int:
    """The positions of each of `rows` rows of `length` that one step of the chunk loop
    takes: `chunk` (0, or a chunk >= length: all of them), on a CPU (the platform being
    traced for) at most as many as make CPU_CHUNK_ROWS rows, unless `chunk` is 0."""
    if chunk and platform() == "cpu":
        chunk = min(chunk, max(1, CPU_CHUNK_ROWS // rows))
    return chunk if chunk and chunk < length else length


def _chunked(x_BxLxD: jax.Array, chunk: int) -> jax.Array:
    """[B, L, ...] -> [n, B, chunk, ...], zero-padded: each step of the loop takes a chunk
    of every row, so rows keep their sharding over the batch axes."""
    b, length = x_BxLxD.shape[:2]
    n = -(-length // chunk)
    pad = [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (x_BxLxD.ndim - 2)
    x = jnp.pad(x_BxLxD, pad).reshape(b, n, chunk, *x_BxLxD.shape[2:]).swapaxes(0, 1)
    return constrain(x, None, "batch", "length", *(("activation_embed",) if x.ndim == 4 else ()))


def _unchunked(x_NxBxC: jax.Array, length: int) -> jax.Array:
    n, b, c = x_NxBxC.shape[:3]
    return x_NxBxC.swapaxes(0, 1).reshape(b, n * c, *x_NxBxC.shape[3:])[:, :length]


def _losses_and_grads(hidden_BxLxD, unembed, targets_BxL, weights_BxL, softcap, chunk, wrt):
    """The weighted loss sum, the per-token losses and, where `wrt` says (None: nowhere;
    else a flag for the hidden states and a list, one per leaf of `unembed`), the sum's
    gradient: [B, L, D] for the hidden states, float32-accumulated for the projection."""
    rows, length = hidden_BxLxD.shape[:2]
    chunk = chunk_positions(chunk, rows, length)
    leaves, treedef = jax.tree.flatten(unembed)
    x_wrt, leaf_wrt = wrt or (False, [False] * len(leaves))

    def chunk_logits(x_BxCxD, *varied):  # the differentiated leaves, then the constant ones
        it = iter(varied)
        u = jax.tree.unflatten(treedef, [next(it) if w else leaf for w, leaf in zip(leaf_wrt, leaves)])
        return vocab_logits(x_BxCxD, u, softcap)

    varied = [leaf for w, leaf in zip(leaf_wrt, leaves) if w]

    def body(unembed_grads, xs):
        x_BxCxD, targets_BxC, weights_BxC = xs
        if x_wrt:
            logits_BxCxV, pullback = jax.vjp(chunk_logits, x_BxCxD, *varied)
        else:
            logits_BxCxV, pullback = jax.vjp(partial(chunk_logits, x_BxCxD), *varied)
        log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        losses_BxC = log_z_BxC - jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
        if wrt is None:  # the pullback is never called, and XLA drops it
            return unembed_grads, (losses_BxC, None)
        # d(sum w * loss) / d logits = w (softmax - one-hot)
        probs_BxCxV = jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        onehot_BxCxV = jax.nn.one_hot(targets_BxC, logits_BxCxV.shape[-1], dtype=probs_BxCxV.dtype)
        grads = list(pullback((probs_BxCxV - onehot_BxCxV) * weights_BxC[..., None]))
        x_grad = grads.pop(0) if x_wrt else None
        return [acc + g.astype(jnp.float32) for acc, g in zip(unembed_grads, grads)], (losses_BxC, x_grad)

    zeros = [jnp.zeros(leaf.shape, jnp.float32) for leaf in varied]
    unembed_grads, (losses_NxBxC, x_grads) = jax.lax.scan(
        body, zeros, (_chunked(hidden_BxLxD, chunk), _chunked(targets_BxL, chunk), _chunked(weights_BxL, chunk)))
    losses_BxL = _unchunked(losses_NxBxC, length)
    it = iter(unembed_grads)
    grads = (_unchunked(x_grads, length) if x_wrt else None, [next(it) if w else None for w in leaf_wrt])
    return (losses_BxL * weights_BxL).sum(), losses_BxL, grads


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden_BxLxD, unembed, targets_BxL, weights_BxL, softcap, chunk):
    total, losses_BxL, _ = _losses_and_grads(hidden_BxLxD, unembed, targets_BxL, weights_BxL, softcap, chunk, None)
    return total, losses_BxL


def _fused_fwd(hidden_BxLxD, unembed, targets_BxL, weights_BxL, softcap, chunk):
    # symbolic_zeros: the arguments come wrapped, saying which are differentiated, so a
    # frozen projection (LoRA's base) gets no gradient formed.
    if weights_BxL.perturbed or targets_BxL.perturbed:
        raise ValueError("fused_loss: the loss weights and targets are data; they have no gradient here")
    values = jax.tree.map(lambda p: p.value, (hidden_BxLxD, unembed))
    wrt = hidden_BxLxD.perturbed, [p.perturbed for p in jax.tree.leaves(unembed)]
    total, losses_BxL, (x_grad, leaf_grads) = _losses_and_grads(*values, targets_BxL.value, weights_BxL.value,
                                                                 softcap, chunk, wrt)
    leaves, treedef = jax.tree.flatten(values[1])
    leaf_grads = [None if d is None else d.astype(leaf.dtype) for d, leaf in zip(leaf_grads, leaves)]
    return (total, losses_BxL), (x_grad, jax.tree.unflatten(treedef, leaf_grads))


def _fused_bwd(softcap, chunk, grads, cotangents):
    g = cotangents[0]  # the losses' cotangent is zero: fused_loss stops their gradient
    if isinstance(g, SymbolicZero):
        g = 0.0

    def scale(d):
        return None if d is None else (d * g).astype(d.dtype)
    return *jax.tree.map(scale, grads, is_leaf=lambda d: d is None), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
