"""A frozen base weight stored quantized (QLoRA's base): int8 or NF4, dequantized at use.

- int8: one absmax scale per output channel (the weight's input axes reduced), codes
  round(w / scale) in [-127, 127].
- nf4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, appendix E): blocks of 64
  consecutive weights along the last input axis, each scaled by its absmax into [-1, 1]
  and rounded to the nearest of 16 levels; two 4-bit codes packed per uint8. QLoRA's
  double quantization (8-bit scales) is not done: the float32 scales cost 0.5 bit per
  weight instead of 0.127.

Storage is two `QuantizedBase` variables, codes and scales, with logical axes derived
from the weight's, so they shard by the same rules as the float weight would. They are
not `nnx.Param`s: never differentiated, never in the optimizer state, and not in
checkpoints (a LoRA checkpoint holds the adapters; the base is read again from
init_from).

Written here rather than with qwix (which has both formats): qwix's NF4 keeps one code
per `uint4` element, whose bytes per chip depend on the backend's packing, and finds
codes with an argmin over all 16 levels per weight ([N, 16] intermediates); here the
codes are packed explicitly and found by comparing against the 15 midpoints. The test
checks the codes and scales against qwix's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# QLoRA's NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


class QuantizedBase(nnx.Variable):
    """Codes or scales of a quantized frozen weight: state, but not a trained parameter."""


def _input_axes(ndim: int, n_in: int) -> tuple[int, ...]:
    """A weight's input axes, counted from the end: the same in a stacked ([layers, ...])
    and a per-layer view of it."""
    return tuple(range(-ndim, -ndim + n_in))


def _blocked(x: jax.Array, axis: int, size: int) -> jax.Array:
    """`axis` moved last and split into [..., axis / size, size]."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _unblocked(x: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(x.reshape(*x.shape[:-2], -1), -1, axis)


def quantize(w: jax.Array, kind: str, ndim: int, n_in: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of weight `w` whose own rank is `ndim` (w may carry a leading
    layers axis) and whose first `n_in` own axes are inputs."""
    w = w.astype(jnp.float32)
    inputs = _input_axes(ndim, n_in)
    if kind == "int8":
        scales = jnp.max(jnp.abs(w), axis=inputs, keepdims=True) / 127.0
        scales = jnp.where(scales == 0, 1.0, scales)
        return jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8), scales
    axis = inputs[-1]
    blocks = _blocked(w, axis, NF4_BLOCK)  # [..., n / 64, 64]
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, blocks / absmax).astype(jnp.uint8)  # nearest level; ties go down
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., n / 64, 32]
    return _unblocked(packed, axis), _unblocked(absmax, axis)


def dequantize(codes: jax.Array, scales: jax.Array, kind: str, ndim: int, n_in: int,
               dtype=jnp.float32) -> jax.Array:
    """The float weight back from `quantize`'s codes and scales, in `dtype`. Computed in
    `dtype` itself (levels and scales rounded to it once): a bfloat16 model never holds a
    layer's weights in float32."""
    if kind == "int8":
        return codes.astype(dtype) * scales.astype(dtype)
    axis = _input_axes(ndim, n_in)[-1]
    packed = _blocked(codes, axis, NF4_BLOCK // 2)  # [..., n / 64, 32]
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], NF4_BLOCK)
    values = jnp.asarray(NF4_LEVELS, dtype)[codes] * _blocked(scales, axis, 1).astype(dtype)
    return _unblocked(values, axis)


def storage_axes(kind: str, axes: tuple, n_in: int) -> tuple[tuple, tuple]:
    """Logical axes of (codes, scales) for a weight with logical `axes`. Codes keep the
    weight's (nf4's packed axis is halved, still divisible where the weight's was). Scale
    axes of size 1 (int8's inputs) or weight / 64 (nf4's blocks) are not sharded: a mesh
    axis need not divide them."""
    if kind == "int8":
        return axes, tuple(None if i < n_in else name for i, name in enumerate(axes))
    return axes, tuple(None if i == n_in - 1 else name for i, name in enumerate(axes))


class QuantizedWeight(nnx.Module):
    """A frozen weight [in..., out...] (its first `n_in` axes are inputs) as codes and
    scales; `dequantize(dtype)` gives it back for use."""

    def __init__(self, weight: jax.Array, axes: tuple, n_in: int, kind: str):
        self.kind, self.ndim, self.n_in = kind, weight.ndim, n_in
        codes, scales = quantize(weight, kind, weight.ndim, n_in)
        codes_axes, scales_axes = storage_axes(kind, axes, n_in)
        self.codes = QuantizedBase(codes, out_sharding=codes_axes)
        self.scales = QuantizedBase(scales, out_sharding=scales_axes)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self.codes[...], self.scales[...], self.kind, self.ndim, self.n_in, dtype)

    @property
    def size(self) -> int:
        """The number of weights it stores (with a stacked model's layers axis)."""
        return math.prod(self.codes.shape) * (2 if self.kind == "nf4" else 1)
