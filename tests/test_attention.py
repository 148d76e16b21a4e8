"""Every attention implementation computes the reference's (xla) values and gradients on
packed rows, never attends across a segment boundary, and stays finite on padding; the
Pallas kernels run in interpret mode on CPU."""

import dataclasses
import importlib.util
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jit_tune.models import attention as attn
from jit_tune.models import dense as dense_module
from jit_tune.models.decoder import Decoder, DecoderConfig
from tests.test_dense import dot_operand_dtypes

B, L, N, K, H = 2, 40, 4, 2, 16  # GQA: two query heads per kv head
# Row 0: three segments of different lengths, then padding; row 1: left padding, two segments.
SEGMENTS = np.array([[1] * 11 + [2] * 17 + [3] * 5 + [0] * 7, [0] * 6 + [1] * 20 + [2] * 14], np.int32)
SLOTS = jnp.arange(L)
IMPLEMENTATIONS = {
    "xla_tiled": partial(attn.xla_tiled, tile=8, max_tiles=3),  # 40 queries: tiles of 13, 14 and 13
    "xla_tiled_one_tile": attn.xla_tiled,
    "xla_chunked": partial(attn.xla_chunked, block=16),  # 40 keys: three blocks, the last one padded
    "xla_chunked_one_block": attn.xla_chunked,
    "splash": attn.splash,
    "pallas_gpu": attn.pallas_gpu,
    # Tiles of their own (config.model.attention_blocks), several per pass over the padded row.
    "splash_blocks": partial(attn.splash, blocks=attn.Blocks(q=128, kv=256, q_dkv=256, kv_dkv=128, q_dq=128)),
    "pallas_gpu_blocks": partial(attn.pallas_gpu, blocks=attn.Blocks(q=64, kv=32, q_dkv=16, kv_dkv=32, q_dq=32,
                                                                     kv_dq=64)),
}
CASES = [(0, 0.0), (8, 0.0), (0, 2.0), (8, 2.0)]  # (window, softcap)


def _supports(name: str, window: int, softcap: float) -> bool:
    return not name.startswith("pallas_gpu") or not (window or softcap)


def _qkv(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    # Logits of a few units: the soft-cap at 2 bends them.
    q = 2.0 * jax.random.normal(keys[0], (B, L, N, H))
    return q, jax.random.normal(keys[1], (B, L, K, H)), jax.random.normal(keys[2], (B, L, K, H))


def _values_and_grads(fn, q, k, v, segments, window, softcap, cotangent):
    def run(q, k, v):
        return fn(q, k, v, segments, segments, SLOTS, SLOTS, window=window, softcap=softcap, scale=H**-0.5)

    out, vjp = jax.jit(lambda q, k, v: jax.vjp(run, q, k, v))(q, k, v)
    return out, vjp(cotangent)


@pytest.mark.parametrize("window,softcap", CASES)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_values_and_gradients_match_the_reference(name, window, softcap):
    if not _supports(name, window, softcap):
        pytest.skip("pallas_gpu has no window or soft-cap (test_pallas_gpu_refuses_window_and_softcap)")
    q, k, v = _qkv()
    segments = jnp.asarray(SEGMENTS)
    real = (segments != 0)[..., None, None]
    # Padding rows' outputs are arbitrary and their loss is masked: no cotangent there.
    cotangent = jax.random.normal(jax.random.key(7), (B, L, N, H)) * real
    ref, ref_grads = _values_and_grads(attn.xla, q, k, v, segments, window, softcap, cotangent)
    out, grads = _values_and_grads(IMPLEMENTATIONS[name], q, k, v, segments, window, softcap, cotangent)
    np.testing.assert_allclose(out * real, ref * real, atol=1e-5, rtol=1e-5)
    for wrt, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f"d/d{wrt}")


@pytest.mark.parametrize("bf16_dots", [True, False], ids=["bf16-dots", "no-bf16-dots"])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (8, 2.0)])
def test_tiled_bfloat16_values_and_gradients_are_near_the_float32_reference(window, softcap, bf16_dots,
                                                                            monkeypatch):
    # In bfloat16 on a CPU with bfloat16 dots xla_tiled's backward materializes transposes
    # by hand (dense.row_major) and its products are bfloat16; on one without, it takes
    # plain transposes and its products are float32, on upcast operands. Both, anywhere.
    monkeypatch.setattr(dense_module, "host_bf16_dots", lambda: bf16_dots)
    q, k, v = _qkv()
    segments = jnp.asarray(SEGMENTS)
    real = (segments != 0)[..., None, None]
    cotangent = jax.random.normal(jax.random.key(7), (B, L, N, H)) * real
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, cotangent)]
    ref, ref_grads = _values_and_grads(attn.xla, *(x.astype(jnp.float32) for x in bf16[:3]), segments, window,
                                       softcap, bf16[3].astype(jnp.float32))
    out, grads = _values_and_grads(IMPLEMENTATIONS["xla_tiled"], *bf16[:3], segments, window, softcap, bf16[3])
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    tiled = partial(IMPLEMENTATIONS["xla_tiled"], q_segment_BxL=segments, kv_segment_BxS=segments, q_slot_L=SLOTS,
                    kv_slot_S=SLOTS, window=window, softcap=softcap, scale=H**-0.5)
    jaxpr = jax.make_jaxpr(lambda *qkv: jax.vjp(tiled, *qkv)[1](bf16[3]))(*bf16[:3])
    # The row-major copies (dense.row_major: dS and P [b, K, rows, keys] to keys-major, rows
    # split into tiles), where the case says.
    assert ("transpose[permutation=(0, 1, 4, 2, 3)]" in str(jaxpr)) == bf16_dots
    products = set(dot_operand_dtypes(lambda *qkv: jax.vjp(tiled, *qkv)[1](bf16[3]), *bf16[:3]))
    assert products == {("bfloat16", "bfloat16") if bf16_dots else ("float32", "float32")}, products
    np.testing.assert_allclose(out.astype(jnp.float32) * real, ref * real, atol=0.03)
    for wrt, got, want in zip("qkv", grads, ref_grads):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.03 * scale, err_msg=f"d/d{wrt}")


def _leaks_across_segments(fn, window: int = 0) -> bool:
    """Whether changing segment 2's keys and values (row 0) changes any other token's output."""
    q, k, v = _qkv(1)
    segments = jnp.asarray(SEGMENTS)
    run = jax.jit(lambda k, v: fn(q, k, v, segments, segments, SLOTS, SLOTS, window=window, softcap=0.0, scale=0.25))
    changed = SEGMENTS == 2
    changed[1] = False
    out = np.asarray(run(k, v))
    new = np.asarray(run(jnp.where(changed[..., None, None], 10.0, k), jnp.where(changed[..., None, None], -5.0, v)))
    assert not np.allclose(new[changed], out[changed])  # the change does something
    others = (SEGMENTS != 0) & ~changed
    return not np.array_equal(new[others], out[others])


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_no_token_attends_across_a_segment_boundary(name):
    assert not _leaks_across_segments(IMPLEMENTATIONS[name])
    if _supports(name, 8, 0.0):
        assert not _leaks_across_segments(IMPLEMENTATIONS[name], window=8)


def test_the_segment_check_catches_a_leak():
    def leaky(q, k, v, q_segment, kv_segment, *args, **kwargs):
        return attn.xla(q, k, v, jnp.ones_like(q_segment), jnp.ones_like(kv_segment), *args, **kwargs)

    assert _leaks_across_segments(leaky)


@pytest.mark.parametrize("name", ["xla", *IMPLEMENTATIONS])
def test_fully_padded_rows_give_no_nan(name):
    fn = attn.xla if name == "xla" else IMPLEMENTATIONS[name]
    window, softcap = (0, 0.0) if name.startswith("pallas_gpu") else (8, 2.0)
    q, k, v = _qkv(2)
    segments = jnp.asarray(SEGMENTS).at[1].set(0)  # row 1: padding only
    cotangent = jnp.ones((B, L, N, H))  # padding outputs get gradients too
    out, grads = _values_and_grads(fn, q, k, v, segments, window, softcap, cotangent)
    assert all(np.isfinite(x).all() for x in (out, *grads))


def test_pallas_gpu_refuses_window_and_softcap():
    q, k, v = _qkv()
    for window, softcap in ((8, 0.0), (0, 30.0)):
        with pytest.raises(ValueError, match="no sliding window or logit soft-cap"):
            attn.attention(q, k, v, SEGMENTS, SEGMENTS, SLOTS, SLOTS, window=window, softcap=softcap, scale=0.25,
                           implementation="pallas_gpu")


def test_kernels_refuse_tiles_they_cannot_take():
    q, k, v = _qkv()
    run = partial(attn.attention, q, k, v, SEGMENTS, SEGMENTS, SLOTS, SLOTS, scale=0.25)
    with pytest.raises(ValueError, match=r"attention_blocks q_dq = 32 and kv_dkv = 64: expected them equal"):
        run(implementation="pallas_gpu", blocks=attn.Blocks(kv_dkv=64))  # q_dq keeps JAX's 32
    with pytest.raises(ValueError, match=r"attention_blocks .*'q': 64.*expected multiples of 128"):
        run(implementation="splash", blocks=attn.Blocks(q=64))


def test_the_decoder_hands_its_tiles_to_the_kernel():
    from jit_tune.config import load_config
    from jit_tune.train.state import decoder_config

    # "auto" (here xla_tiled) takes any tiles at load; on a GPU it would be pallas_gpu.
    config = load_config(str(Path(__file__).parents[1] / "configs" / "tiny.py"),
                         ["--config.model.attention_blocks.kv_dkv=64"])
    blocks = decoder_config(config).attention_blocks
    assert blocks == attn.Blocks(kv_dkv=64)
    tokens, positions, segments = _packed_row()
    model = _model(dataclasses.replace(CONFIG, attention="pallas_gpu", attention_blocks=blocks))
    with pytest.raises(ValueError, match="q_dq = 32 and kv_dkv = 64"):  # the kernel saw them
        model(tokens, positions, segments)


def test_kernels_run_per_shard_under_a_mesh():
    """Under an 8-device mesh (batch over data x fsdp, heads over tensor) the Pallas
    kernels run in a shard_map, as Mosaic and Triton need, with the same results."""
    from jit_tune.config import default_config
    from jit_tune.mesh import logical_rules, make_mesh, use_mesh

    config = default_config()
    config.mesh.shape.update(data=2, fsdp=2, tensor=2)
    q, k, v = (jnp.concatenate([x, x[::-1]]) for x in _qkv())  # batch 4: one row per data x fsdp shard
    segments = jnp.asarray(np.concatenate([SEGMENTS, SEGMENTS[::-1]]))
    real = (segments != 0)[..., None, None]
    ref = attn.xla(q, k, v, segments, segments, SLOTS, SLOTS, scale=0.25)
    assert dict(logical_rules(config))["kv_heads"] == "tensor"
    with use_mesh(config, make_mesh(config)):
        for name in ("splash", "pallas_gpu"):
            run = jax.jit(partial(attn.attention, scale=0.25, implementation=name))
            lowered = run.lower(q, k, v, segments, segments, SLOTS, SLOTS)
            assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
            out = run(q, k, v, segments, segments, SLOTS, SLOTS)
            np.testing.assert_allclose(out * real, ref * real, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_splash_compiles_for_a_tpu_topology():
    """The real Mosaic kernel (not interpret mode), with GQA, window, soft-cap and its
    backward pass, compiles for a v5p slice from this CPU host, per shard of a 2 x 2 mesh."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jit_tune.aot import topology_devices
    from jit_tune.config import default_config
    from jit_tune.mesh import make_mesh, use_mesh
    from jit_tune.topology import parse

    config = default_config()
    config.mesh.shape.update(data=2, tensor=2)
    mesh = make_mesh(config, topology_devices(parse("v5p:2x2x1")))
    heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    length = 300  # padded to 384 inside

    def loss(q, k, v, segments):
        slots = jnp.arange(length)
        out = attn.attention(q, k, v, segments, segments, slots, slots, window=64, softcap=30.0, scale=0.1,
                             implementation="splash")
        return out.astype(jnp.float32).sum()

    args = [jax.ShapeDtypeStruct((4, length, 8, 128), jnp.bfloat16, sharding=heads),
            *[jax.ShapeDtypeStruct((4, length, 2, 128), jnp.bfloat16, sharding=heads)] * 2,
            jax.ShapeDtypeStruct((4, length), jnp.int32, sharding=rows)]
    with use_mesh(config, mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dkv


def test_auto_resolves_by_backend(monkeypatch):
    plain = DecoderConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96)
    capped = dataclasses.replace(plain, attn_softcap=50.0)
    sliding = dataclasses.replace(plain, sliding_window=4, layer_types=("sliding", "full"))
    assert attn.resolve("auto", plain) == attn.CPU_DEFAULT == "xla_tiled"  # the tests run on CPU
    assert attn.resolve("splash", plain) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attn.resolve("auto", sliding) == "splash"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.resolve("auto", plain) == "pallas_gpu"
    assert attn.resolve("auto", capped) == attn.resolve("auto", sliding) == "xla_chunked"


def test_config_names_every_implementation():
    from jit_tune.config import ConfigError, default_config, validate

    from jit_tune.config import ATTENTION_CHOICES, ATTENTION_TILES

    config = default_config()
    assert config.model.attention == "auto"
    assert ATTENTION_CHOICES == attn.CHOICES
    assert ATTENTION_TILES == tuple(f.name for f in dataclasses.fields(attn.Blocks))
    for name in attn.CHOICES:
        config.model.attention = name
        validate(config)
    for bad in ({"attention": "flash"}, {"attention": "pallas_gpu", "attn_softcap": 50.0},
                {"attention": "pallas_gpu", "sliding_window": 4, "layer_types": ("sliding",) * 4}):
        config = default_config()
        config.model.update(bad)
        with pytest.raises(ConfigError, match="config.model.attention"):
            validate(config)


@pytest.mark.parametrize("attention,blocks,field", [
    ("auto", {"q": 48}, "q"), ("auto", {"kv": 8}, "kv"), ("auto", {"q_dkv": -32}, "q_dkv"),
    ("auto", {"kv_dq": 24}, "kv_dq"), ("splash", {"q": 64}, "q"),
    ("pallas_gpu", {"kv_dkv": 64, "q_dq": 128}, "q_dq"), ("pallas_gpu", {"kv_dkv": 64}, "q_dq")])
def test_config_refuses_tiles_a_kernel_cannot_take(attention, blocks, field):
    from jit_tune.config import ConfigError, default_config, validate

    config = default_config()
    config.model.attention = attention
    config.model.attention_blocks.update(blocks)
    with pytest.raises(ConfigError, match=rf"config.model.attention_blocks.{field} = .*expected"):
        validate(config)
    config = default_config()
    config.model.attention_blocks = {"block_q": 128}  # a config file's whole dict, the kernel's spelling
    with pytest.raises(ConfigError, match=r"(?s)config.model.attention_blocks = .*block_q.*expected the tiles q, kv, "):
        validate(config)
    for good in ({}, {"q": 256, "kv": 128}, {"kv_dkv": 128, "q_dq": 128, "q_dkv": 16}):
        config = default_config()
        config.model.attention = "pallas_gpu"
        config.model.attention_blocks.update(good)
        validate(config)


# ------------------------------------------------------------------------ the decoder

CONFIG = DecoderConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96)
# Gemma 2's switches: a sliding layer (window 4) and a global one, soft-capped logits.
GEMMA = dataclasses.replace(CONFIG, attn_softcap=20.0, final_softcap=30.0, sliding_window=4,
                            layer_types=("sliding", "full"), query_pre_attn_scalar=8.0)


def _model(config: DecoderConfig) -> Decoder:
    with nnx.use_eager_sharding(False):
        return Decoder(config, rngs=nnx.Rngs(0))  # the same weights whatever the attention


def _packed_row():
    tokens = np.random.default_rng(0).integers(1, 97, size=(1, L))
    segments = SEGMENTS[:1]
    positions = np.concatenate([np.arange(n) for n in (11, 17, 5, 7)])[None]
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize("base", [CONFIG, GEMMA], ids=["llama", "gemma2"])
@pytest.mark.parametrize("name", ["xla_tiled", "xla_chunked", "splash", "pallas_gpu"])
def test_decoder_logits_equal_xla_on_a_packed_row(base, name):
    if not _supports(name, base.sliding_window, base.attn_softcap):
        pytest.skip("pallas_gpu has no window or soft-cap")
    tokens, positions, segments = _packed_row()
    forward = nnx.jit(lambda model: model(tokens, positions, segments)[0])
    want = forward(_model(dataclasses.replace(base, attention="xla")))
    got = forward(_model(dataclasses.replace(base, attention=name)))
    real = np.asarray(segments[0] != 0)
    np.testing.assert_allclose(got[0][real], want[0][real], atol=1e-4, rtol=1e-4)


def test_cached_decoding_with_a_kernel_model_matches_its_full_recompute():
    """Decoding uses xla over the cache; the full recompute uses the model's kernel."""
    from jit_tune.eval.decode import generate_greedy

    model = _model(dataclasses.replace(GEMMA, attention="splash"))
    # The recompute right-pads to one length (one compile); padding after a token never
    # changes its logits.
    length = 16
    forward = nnx.jit(lambda model, tokens, segments: model(tokens, jnp.arange(length)[None], segments)[0])

    def next_token(sequence: list[int]) -> int:
        n = len(sequence)
        tokens = jnp.asarray([sequence + [0] * (length - n)])
        logits = forward(model, tokens, (jnp.arange(length) < n).astype(jnp.int32)[None])
        return int(np.argmax(logits[0, n - 1]))

    prompts, steps = [[5, 6, 7, 8, 9, 10], [20]], 4
    cached = generate_greedy(model, prompts, max_new_tokens=steps, eos_id=-5, pad_id=0, batch=2)
    for prompt, got in zip(prompts, cached):
        sequence = list(prompt)
        for _ in range(steps):
            sequence.append(next_token(sequence))
        assert got == sequence[len(prompt):]
