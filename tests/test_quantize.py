"""QLoRA's base storage (models/quantize.py): int8 per output channel and NF4 in blocks of
64, within their error bounds, and the same codes and scales as qwix computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jit_tune.models.quantize import NF4_BLOCK, NF4_LEVELS, dequantize, quantize

# (shape, the weight's own rank, n_in): q_DxNxH, o_NxHxD, and a stacked (scanned) gate_DxF
# with its leading layers axis.
WEIGHTS = [((128, 4, 64), 3, 1), ((4, 64, 128), 3, 2), ((3, 128, 192), 2, 1)]


def _weight(shape, seed=0):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    w[..., :3] *= 40.0  # outliers: absmax scaling must cope with them
    return jnp.asarray(w)


@pytest.mark.parametrize("shape, ndim, n_in", WEIGHTS)
def test_int8_error_is_at_most_half_a_step_per_output_channel(shape, ndim, n_in):
    w = _weight(shape)
    codes, scales = quantize(w, "int8", ndim, n_in)
    assert codes.dtype == jnp.int8 and codes.shape == w.shape
    inputs = tuple(range(len(shape) - ndim, len(shape) - ndim + n_in))
    assert scales.shape == tuple(1 if i in inputs else n for i, n in enumerate(shape))
    error = jnp.abs(dequantize(codes, scales, "int8", ndim, n_in) - w)
    assert bool(jnp.all(error <= scales / 2 * (1 + 1e-6)))
    assert float(jnp.abs(codes).max()) == 127  # each channel's absmax uses the whole range


@pytest.mark.parametrize("shape, ndim, n_in", WEIGHTS)
def test_nf4_packs_two_codes_a_byte_and_rounds_each_block_to_its_nearest_level(shape, ndim, n_in):
    w = _weight(shape)
    codes, scales = quantize(w, "nf4", ndim, n_in)
    axis = len(shape) - ndim + n_in - 1  # the last input axis: blocks run along it
    assert codes.dtype == jnp.uint8
    assert codes.shape == tuple(n // 2 if i == axis else n for i, n in enumerate(shape))
    assert scales.shape == tuple(n // NF4_BLOCK if i == axis else n for i, n in enumerate(shape))
    restored = dequantize(codes, scales, "nf4", ndim, n_in)
    block_scale = jnp.repeat(scales, NF4_BLOCK, axis=axis)
    half_gap = np.diff(NF4_LEVELS).max() / 2
    assert bool(jnp.all(jnp.abs(restored - w) <= block_scale * half_gap * (1 + 1e-6)))
    # Nearest level: no other level is closer to the normalized weight.
    normalized = (w / block_scale)[..., None]
    chosen = jnp.abs((restored / block_scale)[..., None] - normalized)
    assert bool(jnp.all(chosen <= jnp.abs(jnp.asarray(NF4_LEVELS) - normalized).min(-1, keepdims=True) + 1e-6))
    # Each block's absmax is represented exactly (levels +-1).
    assert bool(jnp.all(jnp.isclose(jnp.abs(restored).max(axis=axis), jnp.abs(w).max(axis=axis))))


def test_a_zero_block_stays_zero():
    w = jnp.zeros((128, 8))
    for kind in ("int8", "nf4"):
        codes, scales = quantize(w, kind, 2, 1)
        assert bool(jnp.all(dequantize(codes, scales, kind, 2, 1) == 0))


def test_codes_and_scales_match_qwix():
    """qwix (Google's JAX quantization library) as the reference: its NF4 maps the same
    blocks to the same levels, its int8 gives the same per-channel scales and codes."""
    qwix = pytest.importorskip("qwix")
    w = _weight((256, 96), seed=1)
    codes, scales = quantize(w, "nf4", 2, 1)
    ref = qwix.quantize(w, "nf4", tiled_axes={0: NF4_BLOCK}, channelwise_axes=(1,))
    unpacked = jnp.stack([codes & 0xF, codes >> 4], axis=1).reshape(w.shape)
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(ref.qvalue).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(scales), np.asarray(ref.scale), rtol=1e-6)

    codes, scales = quantize(w, "int8", 2, 1)
    ref = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))
    # qwix's symmetric int8 bound is 127.5 (the top bucket's upper edge); ours is 127.
    np.testing.assert_allclose(np.asarray(scales) * 127, np.asarray(ref.scale) * 127.5, rtol=1e-6)
    assert float(jnp.abs(dequantize(codes, scales, "int8", 2, 1) - qwix.dequantize(ref)).max()) <= float(
        scales.max())


def test_quantize_runs_sharded_under_jit():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))
    w = jax.device_put(_weight((512, 64)), NamedSharding(mesh, P("fsdp")))
    codes, scales = jax.jit(lambda x: quantize(x, "nf4", 2, 1))(w)
    np.testing.assert_allclose(np.asarray(dequantize(codes, scales, "nf4", 2, 1)),
                               np.asarray(dequantize(*quantize(np.asarray(w), "nf4", 2, 1), "nf4", 2, 1)))
