"""Model behaviour users rely on: packing is invisible, and cached decoding matches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_tune.eval.decode import _decode, generate_greedy, left_pad
from jit_tune.models.decoder import Decoder, DecoderConfig, KVCache

CONFIG = DecoderConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96)


def _model(config=CONFIG):
    # Outside a mesh: keep the logical-axis metadata without placing shards.
    with nnx.use_eager_sharding(False):
        return Decoder(config, rngs=nnx.Rngs(0))


def _alone(model, tokens, pad_to: int = 0):
    """The logits of `tokens` as the only example of a row, padded (segment 0) to
    `pad_to` so that calls of different lengths share one shape (and compilation)."""
    n = max(len(tokens), pad_to)
    row = np.zeros(n, np.int32)
    row[: len(tokens)] = tokens
    segments = (np.arange(n) < len(tokens)).astype(np.int32)
    logits, _ = model(jnp.asarray(row[None]), jnp.arange(n)[None], jnp.asarray(segments[None]))
    return np.asarray(logits[0, : len(tokens)])


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
            sequence.append(int(np.argmax(_alone(model, sequence, pad_to=16)[-1])))
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


def _scanned_copy(model):
    """The same weights as one stacked, scanned block."""
    config = dataclasses.replace(model.config, scan_layers=True)
    scanned = _model(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    blocks = params.pop("blocks")
    params["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers), *[blocks[i] for i in sorted(blocks)])
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(scanned, state)
    return scanned


def test_scanned_layers_compute_what_unrolled_layers_do(tmp_path):
    from jit_tune.models.hf import save_params
    from jit_tune.train.step import token_losses

    model = _model()
    scanned = _scanned_copy(model)
    assert nnx.state(scanned, nnx.Param)["blocks"]["attn"]["q_DxNxH"][...].shape == (2, 64, 4, 16)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 97, size=(2, 12)))
    positions, segments = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
    np.testing.assert_allclose(scanned(tokens, positions, segments)[0], model(tokens, positions, segments)[0],
                               rtol=1e-5, atol=1e-5)
    batch = {"inputs": tokens, "targets": tokens, "positions": positions, "segment_ids": segments}

    def grads(m):
        return nnx.grad(lambda m: token_losses(m, batch).sum())(m)

    unrolled_grads = grads(model)["blocks"]
    scanned_grads = grads(scanned)["blocks"]
    np.testing.assert_allclose(scanned_grads["mlp"]["up_DxF"][...][1], unrolled_grads[1]["mlp"]["up_DxF"][...],
                               rtol=1e-4, atol=1e-6)
    prompts = [[5, 17, 3], [9, 2, 44, 61, 7]]
    assert generate_greedy(scanned, prompts, 6, -1, 0, 2) == generate_greedy(model, prompts, 6, -1, 0, 2)
    # Export writes HF's one tensor per layer from the stack, the same as from unrolled layers.
    for name, m in (("scanned", scanned), ("unrolled", model)):
        (tmp_path / name).mkdir()
        save_params(nnx.to_pure_dict(nnx.state(m, nnx.Param)), m.config, tmp_path / name)
    from safetensors.numpy import load_file
    ours, theirs = load_file(str(tmp_path / "scanned/model-00001-of-00001.safetensors")), load_file(
        str(tmp_path / "unrolled/model-00001-of-00001.safetensors"))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_last_only_logits_are_the_last_position_of_the_full_logits():
    model = _model()
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, 97, size=(2, 12)))
    # Row 0 left-padded (segment 0, then one prompt), row 1 two packed segments.
    segments = jnp.asarray([[0] * 5 + [1] * 7, [1] * 4 + [2] * 8])
    positions = jnp.asarray([[0] * 5 + list(range(7)), list(range(4)) + list(range(8))])
    full, _ = model(tokens, positions, segments)
    last, _ = model(tokens, positions, segments, last_only=True)
    assert last.shape == (2, 1, 97) and last.dtype == jnp.float32
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
    cache = KVCache.empty(CONFIG, 2, 16)
    full, full_cache = model(tokens, positions, segments, cache)
    last, last_cache = model(tokens, positions, segments, cache, last_only=True)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, last_cache, full_cache)


def test_prompt_lengths_round_up_to_powers_of_two():
    shapes = {left_pad([[1] * n], 1, 0)["tokens"].shape[1] for n in range(1, 301)}
    assert shapes == {16, 32, 64, 128, 256, 512}


def test_extra_left_padding_leaves_generation_unchanged():
    model = _model()
    prompts = [[5, 6, 7], list(range(20, 37))]  # 3 and 17 tokens: padded to 32
    assert left_pad(prompts, 2, 0)["tokens"].shape == (2, 32)
    padded = generate_greedy(model, prompts, max_new_tokens=6, eos_id=-5, pad_id=0, batch=2)
    for prompt, got in zip(prompts, padded):
        n = len(prompt)  # the prompt alone, no padding at all
        out = _decode(model, np.asarray([prompt], np.int32), np.arange(n, dtype=np.int32)[None],
                      np.ones((1, n), np.int32), -5, jax.random.key(0), 6, 0.0, 0, 1.0)
        assert got == np.asarray(out)[0].tolist()


def test_a_long_prompt_fills_the_cache_without_the_whole_score_matrix():
    """The prefill's queries see only the prompt's keys, training's form, so it runs the
    model's attention kernel; the reference holds the float32 scores of every query
    against every cache slot, 2 x 2 x 2,048 x 2,056 (64 MiB) a layer at 2,048 tokens
    (193 MiB of temporaries in all; xla_chunked's key blocks took 35, xla_tiled's tiles
    62). The decoded tokens are the same."""
    prompt, new = 2048, 8
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 97, (1, prompt)))
    positions, segments = jnp.arange(prompt)[None], jnp.ones((1, prompt), jnp.int32)
    prefill = nnx.jit(lambda m: m(tokens, positions, segments, KVCache.empty(m.config, 1, prompt + new),
                                  last_only=True)[0])
    temp, decoded = {}, {}
    for name in ("xla", "xla_tiled", "xla_chunked"):
        model = _model(dataclasses.replace(CONFIG, attention=name))
        temp[name] = prefill.lower(model).compile().memory_analysis().temp_size_in_bytes
        decoded[name] = generate_greedy(model, [tokens[0].tolist()], new, -1, 0, 1)
    assert temp["xla"] > 64 * 2**20 and temp["xla_chunked"] < temp["xla"] / 4, temp
    assert temp["xla_tiled"] < temp["xla"] / 2, temp
    assert decoded["xla"] == decoded["xla_tiled"] == decoded["xla_chunked"]


def test_rotary_tables_are_made_once_per_pass():
    """The cos/sin tables: one per rope kind per forward pass (a sliding layers' own base
    makes a second), not one per layer, nor recomputed inside the layers' fused rotations."""
    from jit_tune.models.decoder import rope_tables

    positions = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 40)), jnp.int32)
    gemma3 = dataclasses.replace(CONFIG, rope_local_theta=10_000.0, rope_theta=1e6, sliding_window=8,
                                 layer_types=("sliding", "full"))
    full, sliding = rope_tables(gemma3, positions)
    assert full.shape == (2, 40, CONFIG.head_dim) and not np.array_equal(full, sliding)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 97, (2, 40)), jnp.int32)
    segments = jnp.ones((2, 40), jnp.int32)
    for config, tables in ((CONFIG, 1), (gemma3, 2)):

        def loss(model):
            return jnp.square(model(tokens, positions, segments)[0]).mean()

        hlo = nnx.jit(nnx.grad(loss)).lower(_model(config)).compile().as_text()
        assert hlo.count(" cosine(") == tables, config
