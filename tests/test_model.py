"""Model behaviour users rely on: packing is invisible, and cached decoding matches."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_tune.eval.decode import generate_greedy
from jit_tune.models.decoder import Decoder, DecoderConfig

CONFIG = DecoderConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96)


def _model(config=CONFIG):
    # Outside a mesh: keep the logical-axis metadata without placing shards.
    with nnx.use_eager_sharding(False):
        return Decoder(config, rngs=nnx.Rngs(0))


def _alone(model, tokens):
    n = len(tokens)
    logits, _ = model(jnp.asarray([tokens]), jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
    return np.asarray(logits[0])


def test_packed_row_logits_equal_each_example_alone():
    model = _model()
    rng = np.random.default_rng(0)
    examples = [rng.integers(1, 97, size=n).tolist() for n in (5, 9, 3)]
    row_len = 20
    tokens, segments, positions = np.zeros(row_len, np.int32), np.zeros(row_len, np.int32), np.zeros(row_len, np.int32)
    start = 0
    for s, ex in enumerate(examples, 1):
        tokens[start: start + len(ex)] = ex
        segments[start: start + len(ex)] = s
        positions[start: start + len(ex)] = np.arange(len(ex))
        start += len(ex)
    packed, _ = model(jnp.asarray(tokens[None]), jnp.asarray(positions[None]), jnp.asarray(segments[None]))
    packed = np.asarray(packed[0])
    start = 0
    for ex in examples:
        np.testing.assert_allclose(packed[start: start + len(ex)], _alone(model, ex), atol=1e-5, rtol=1e-5)
        start += len(ex)


def test_cached_greedy_decoding_matches_full_recompute():
    model = _model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    steps = 6
    cached = generate_greedy(model, prompts, max_new_tokens=steps, eos_id=-5, pad_id=0, batch=4)
    for prompt, got in zip(prompts, cached):
        sequence = list(prompt)
        for _ in range(steps):
            sequence.append(int(np.argmax(_alone(model, sequence)[-1])))
        assert got == sequence[len(prompt):]


def test_generation_stops_at_eos():
    model = _model()
    prompt = [5, 6, 7]
    free = generate_greedy(model, [prompt], max_new_tokens=5, eos_id=-5, pad_id=0, batch=1)[0]
    eos = free[2]
    stopped = generate_greedy(model, [prompt], max_new_tokens=5, eos_id=eos, pad_id=0, batch=1)[0]
    assert stopped == free[: free.index(eos)]


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    model = _model()
    bf16 = _model(DecoderConfig(**{**CONFIG.__dict__, "dtype": "bfloat16"}))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    tokens = [3, 4, 5, 6]
    full = _alone(model, tokens)
    half = _alone(bf16, tokens)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=0.15)
