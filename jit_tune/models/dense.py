"""Products of activations and weights: x [tokens..., in...] times W [in..., out...].

Written as one 2D matmul over the flattened tokens and the flattened in/out axes, so
both passes stay plain matmuls: an einsum contracting several token axes (the weight
gradient of "bld,df->blf" contracts b and l) makes XLA first copy the activations and
their gradient into a canonical layout, copies as large as the activations (on CPU a
third of the MLP's backward time).

On a CPU with bfloat16 dot instructions (x86 AVX512-BF16 or AMX, Arm BF16) the
bfloat16 backward is written by hand (a custom VJP), for XLA's CPU backend runs a
bfloat16 matmul on its fast kernels (YNNPACK) only when both operands are row-major,
[M, K] times [K, N], and asked for a float32 result; any other bfloat16 dot it upcasts
to float32, at half the speed. So the gradient is cast back to the compute dtype (as
PyTorch's autocast keeps it) and the transposed operands of the two backward products
are materialized row-major: a plain transpose XLA folds into the dot (and upcasts), so
`row_major` writes it as a transpose of finer axes, which XLA copies. A CPU without them
(AVX2 only) upcasts every bfloat16 dot, so there the copies only cost time (the
benchmark model's bf16 step, 5.4-5.6 s hand-written against 4.4-4.6 s plain, on a
Zen 3 EPYC). There bfloat16 products run as float32 ones instead (`upcast`): the
operands, as rounded to bfloat16, are upcast before each product, forward and backward,
and take float32's path below, faster than the upcasting XLA does inside a bfloat16 dot
(the benchmark model's bf16 step on an Ice Lake Xeon without bfloat16 dots, steps
interleaved in one process: 4.01 s plain, 3.62 s upcast here, 3.42 s with xla_tiled
attention's products upcast too, through `matmul`).

Float32 on any CPU takes the same custom VJP for one reason: the weight gradient
contracts the tokens, the leading axis of both of its operands, a dot XLA gives to Eigen
rather than YNNPACK, at half the rate for the unembedding's (85 against 170 GFLOP/s on
a Zen 3 core pair). A transposed copy of the activations makes it a row-major matmul
YNNPACK takes (the benchmark model's float32 step 2-4% faster); g W^T already is one.
TPU and GPU use the plain product and JAX's own gradient (accelerators' matmul units
take any layout and accumulate in float32 anyway), except where the result is wider than
the operands, as the unembedding's float32 logits from bf16: JAX's gradient would take
the wide cotangent into both backward products (on an H200, the Llama-3.2-1B
benchmark's two unembedding gradients ran as float32 TF32 products, 51 ms of a 367 ms
step), so the same custom VJP casts it to the operands' dtype first, as PyTorch's
autocast has it.
"""

from __future__ import annotations

import math
import re
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp

from jit_tune.mesh import platform


def matmul(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """a @ b accumulated in float32, in `dtype`; bfloat16 operands are upcast first where
    `upcast` says XLA would do it more slowly."""
    if upcast(a.dtype):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)


@cache
def host_bf16_dots(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this host's CPU has bfloat16 dot instructions, as Linux's /proc/cpuinfo
    lists them (x86: avx512_bf16, amx_bf16; Arm: bf16). False where it cannot tell."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {flag for line in re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M) for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def hand_written(dtype) -> bool:
    """Whether products in `dtype` take the hand-written CPU backward and row-major copies:
    below float32, traced for a CPU whose host has bfloat16 dot instructions."""
    return jnp.dtype(dtype) != jnp.float32 and platform() == "cpu" and host_bf16_dots()


def upcast(dtype) -> bool:
    """Whether products in `dtype` run as float32 products: below float32, traced for a
    CPU whose host has no bfloat16 dot instructions (module docstring)."""
    return jnp.dtype(dtype) != jnp.float32 and platform() == "cpu" and not host_bf16_dots()


def row_major(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """x.transpose(axes), computed where `hand_written`, rather than folded into the dot
    that takes it (which XLA would then upcast). XLA folds a bare transpose, not one of
    finer axes: the axis that lands last (second to last if the last stays) is split
    into (outer, tile) and both move, which XLA copies row-major as fast as a plain
    transpose. An axis no tile divides takes two reversals of the last axis around the
    transpose instead, which XLA does not fold either, but computes several times
    slower (an x^T of [4096, 1024] on a Xeon: 15 ms against 1 ms)."""
    if not hand_written(x.dtype):
        return x.transpose(axes)
    split = axes[-1] if axes[-1] != x.ndim - 1 else axes[-2]
    tile = next((t for t in (32, 16, 8, 4, 2) if x.shape[split] % t == 0 and x.shape[split] > t), 0)
    if not tile:
        return jnp.flip(jnp.flip(x, axes[-1]).transpose(axes), -1)
    fine = x.reshape(*x.shape[:split], x.shape[split] // tile, tile, *x.shape[split + 1:])
    return fine.transpose([b for a in axes for b in ((a, a + 1) if a == split else (a + (a > split),))]).reshape(
        [x.shape[a] for a in axes])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _product(x_TxI: jax.Array, w_IxO: jax.Array, dtype) -> jax.Array:
    return matmul(x_TxI, w_IxO, dtype)


def _product_fwd(x_TxI, w_IxO, dtype):
    return matmul(x_TxI, w_IxO, dtype), (x_TxI, w_IxO)


def _product_bwd(dtype, residuals, g_TxO):
    x_TxI, w_IxO = residuals
    if x_TxI.dtype != jnp.float32:  # the gradient in the compute dtype
        g_TxO = g_TxO.astype(x_TxI.dtype)
        if hand_written(x_TxI.dtype):
            return (matmul(g_TxO, row_major(w_IxO, (1, 0)), x_TxI.dtype),
                    _weight_grad(x_TxI, g_TxO, w_IxO.dtype))
        if not upcast(x_TxI.dtype):  # an accelerator's widening product (module docstring)
            return matmul(g_TxO, w_IxO.T, x_TxI.dtype), matmul(x_TxI.T, g_TxO, w_IxO.dtype)
    # Float32, or upcast from bfloat16 (module docstring): only x^T is copied (copying the
    # narrower of x and g, as bfloat16 does, measured level on a Xeon and slower on a
    # Zen 3). The barrier keeps XLA from folding the transpose back into the dot.
    x32_TxI, w32_IxO, g32_TxO = (a.astype(jnp.float32) for a in (x_TxI, w_IxO, g_TxO))
    return (matmul(g32_TxO, w32_IxO.T, x_TxI.dtype),
            matmul(jax.lax.optimization_barrier(x32_TxI.T), g32_TxO, w_IxO.dtype))


def _weight_grad(x_TxI: jax.Array, g_TxO: jax.Array, dtype) -> jax.Array:
    """x^T g, contracting the tokens, as a row-major bfloat16 product: the narrower of x
    and g is copied token-last, the fewer bytes (chosen when the copies were reversals,
    and x^T of the MLP's down projection, [1024, 4096], took 16.5 ms on a Xeon with AMX;
    by tiles, 1-2 ms, the two forms measure alike). With g the narrower, (g^T x)^T: the
    result's transpose is weight-sized, and the barrier keeps XLA from folding it into
    the dot (which it then cannot run in bfloat16)."""
    if g_TxO.shape[1] < x_TxI.shape[1]:
        dw_OxI = matmul(row_major(g_TxO, (1, 0)), x_TxI, jnp.float32)
        return jax.lax.optimization_barrier(dw_OxI).T.astype(dtype)
    return matmul(row_major(x_TxI, (1, 0)), g_TxO, dtype)


_product.defvjp(_product_fwd, _product_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1, dtype=None) -> jax.Array:
    """x [..., in...] (its last `n_in` axes) contracted with w [in..., out...] (its
    first `n_in`), accumulated in float32: [..., out...] in `dtype` (default x's; w is
    cast to x's dtype first)."""
    lead, ins, outs = x.shape[:-n_in], w.shape[:n_in], w.shape[n_in:]
    k = math.prod(ins)
    x_TxI, w_IxO = x.reshape(-1, k), w.astype(x.dtype).reshape(k, math.prod(outs))
    dtype = jnp.dtype(dtype or x.dtype)
    if platform() == "cpu" or dtype.itemsize > x.dtype.itemsize:
        y = _product(x_TxI, w_IxO, dtype)
    else:
        y = jnp.matmul(x_TxI, w_IxO, preferred_element_type=dtype)
    return y.reshape(*lead, *outs)

