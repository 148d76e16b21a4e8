"""Jit-compiled decoding with a KV cache (greedy, or temperature / top-k / top-p
sampling), for a batch of prompts of any lengths.

Prompts are left-padded to a shared length (padding is segment 0, which nothing
attends to), prefilled in one call, then extended one token per step inside a
`lax.while_loop` that ends when every row has produced EOS or the budget is spent.

Each distinct (batch, padded prompt length, max_new_tokens) compiles once. The padded
length is the longest prompt's rounded up to a power of two, at least 16, so prompts
of up to max_len tokens compile at most log2(max_len / 16) + 1 prompt shapes per batch
size and max_new_tokens (5 up to 256 tokens), at the price of at most twice the
prefill length. The prefill computes logits for the last position only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_tune.mesh import to_host
from jit_tune.models.decoder import Decoder, KVCache

_MIN_PROMPT_LENGTH = 16  # the smallest padded prompt length


def left_pad(prompts: Sequence[Sequence[int]], batch: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-aligned prompts with segment ids (1 real, 0 pad) and positions from 0, padded
    to a power-of-two length (at least 16): few shapes get compiled."""
    length = max(_MIN_PROMPT_LENGTH, 1 << (max(len(p) for p in prompts) - 1).bit_length())
    tokens = np.full((batch, length), pad_id, np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B]: argmax at temperature 0, else sampled from the top-k / nucleus."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "temperature", "top_k", "top_p"))
def _decode(model: Decoder, tokens_BxP, positions_BxP, segment_ids_BxP, eos_id, key, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float):
    batch, prompt_len = tokens_BxP.shape
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_tokens)
    logits_Bx1xV, cache = model(tokens_BxP, positions_BxP, segment_ids_BxP, cache, last_only=True)
    key, first_key = jax.random.split(key)
    first = sample(logits_Bx1xV[:, 0], first_key, temperature, top_k, top_p)
    out_BxT = jnp.full((batch, max_new_tokens), -1, jnp.int32)

    def keep_going(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(state):
        step, token, position, cache, out, done, key = state
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | (token == eos_id)
        logits, cache = model(token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        key, step_key = jax.random.split(key)
        token = sample(logits[:, 0], step_key, temperature, top_k, top_p)
        return step + 1, token, position + 1, cache, out, done, key

    state = (0, first, positions_BxP[:, -1] + 1, cache, out_BxT, jnp.zeros((batch,), bool), key)
    return jax.lax.while_loop(keep_going, decode_one, state)[4]


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    batch: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Continuations of `prompts` (without the EOS that ended them); greedy at
    temperature 0, else sampled deterministically from `seed`."""
    results = []
    key = jax.random.key(seed)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        padded = left_pad(chunk, batch, pad_id)
        key, chunk_key = jax.random.split(key)
        out = to_host(_decode(
            model, padded["tokens"], padded["positions"], padded["segment_ids"], eos_id, chunk_key,
            max_new_tokens, temperature, top_k, top_p,
        ))
        for row in out[: len(chunk)]:
            tokens = []
            for t in row:
                if t < 0 or t == eos_id:
                    break
                tokens.append(int(t))
            results.append(tokens)
    return results


def generate_greedy(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
                    pad_id: int, batch: int) -> list[list[int]]:
    return generate(model, prompts, max_new_tokens, eos_id, pad_id, batch)
