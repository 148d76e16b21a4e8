"""Products of activations and weights: x [tokens..., in...] times W [in..., out...].

Written as one 2D matmul over the flattened tokens and the flattened in/out axes, so
both passes stay plain matmuls: an einsum contracting several token axes (the weight
gradient of "bld,df->blf" contracts b and l) makes XLA first copy the activations and
their gradient into a canonical layout, copies as large as the activations (on CPU a
third of the MLP's backward time).

On CPU the backward is written by hand (a custom VJP), for XLA's CPU backend runs a
bfloat16 matmul on its fast kernels (YNNPACK) only when both operands are row-major,
[M, K] times [K, N], and asked for a float32 result; any other bfloat16 dot it upcasts
to float32, at half the speed. So the gradient is cast back to the compute dtype (as
PyTorch's autocast keeps it) and the transposed operands of the two backward products
are materialized row-major: a plain transpose XLA folds into the dot (and upcasts), so
it is written as reverse-transpose-reverse, which it computes. TPU and GPU use the
plain product and JAX's own gradient: their matmul units take any layout and
accumulate in float32 anyway.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jit_tune.mesh import platform


def _matmul(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)


def row_major(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x.transpose(axes), computed, on CPU below float32, rather than folded into the dot
    that takes it (which XLA would then upcast): XLA folds a bare transpose, not one
    between two reversals of the axis that lands last."""
    if x.dtype == jnp.float32 or platform() != "cpu":  # float32 dots are fast in any layout
        return x.transpose(axes)
    return jnp.flip(jnp.flip(x, axes[-1]).transpose(axes), -1)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x_TxI: jax.Array, w_IxO: jax.Array, dtype) -> jax.Array:
    return _matmul(x_TxI, w_IxO, dtype)


def _cpu_matmul_fwd(x_TxI, w_IxO, dtype):
    return _matmul(x_TxI, w_IxO, dtype), (x_TxI, w_IxO)


def _cpu_matmul_bwd(dtype, residuals, g_TxO):
    x_TxI, w_IxO = residuals
    g_TxO = g_TxO.astype(x_TxI.dtype)
    return (_matmul(g_TxO, row_major(w_IxO, (1, 0)), x_TxI.dtype),
            _matmul(row_major(x_TxI, (1, 0)), g_TxO, w_IxO.dtype))


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, dtype=None) -> jax.Array:
    """x [..., in...] (its last `n_in` axes) contracted with w [in..., out...] (its
    first `n_in`), accumulated in float32: [..., out...] in `dtype` (default x's; w is
    cast to x's dtype first)."""
    lead, ins, outs = x.shape[:-n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(ins)
    x_TxI, w_IxO = x.reshape(-1, k), w.astype(x.dtype).reshape(k, math.prod(outs))
    dtype = jnp.dtype(dtype or x.dtype)
    if platform() == "cpu":
        y = _cpu_matmul(x_TxI, w_IxO, dtype)
    else:
        y = jnp.matmul(x_TxI, w_IxO, preferred_element_type=dtype)
    return y.reshape(*lead, *outs)
