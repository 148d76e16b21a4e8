"""Jit-compiled greedy decoding with a KV cache, for a batch of prompts of any lengths.

Prompts are left-padded to a shared length (padding is segment 0, which nothing
attends to), prefilled in one call, then extended one token per step inside a
`lax.while_loop` that ends when every row has produced EOS or the budget is spent.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_tune.models.decoder import Decoder, KVCache

_LENGTH_BUCKET = 16  # prompt lengths round up to this, so few shapes get compiled


def left_pad(prompts: Sequence[Sequence[int]], batch: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-aligned prompts with segment ids (1 real, 0 pad) and positions from 0."""
    length = -(-max(len(p) for p in prompts) // _LENGTH_BUCKET) * _LENGTH_BUCKET
    tokens = np.full((batch, length), pad_id, np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        segment_ids[row, length - len(prompt):] = 1
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


@nnx.jit(static_argnames=("max_new_tokens",))
def _greedy(model: Decoder, tokens_BxP, positions_BxP, segment_ids_BxP, eos_id, max_new_tokens: int):
    batch, prompt_len = tokens_BxP.shape
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model(tokens_BxP, positions_BxP, segment_ids_BxP, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out_BxT = jnp.full((batch, max_new_tokens), -1, jnp.int32)

    def keep_going(state):
        step, _, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(state):
        step, token, position, cache, out, done = state
        out = out.at[:, step].set(jnp.where(done, -1, token))
        done = done | (token == eos_id)
        logits, cache = model(token[:, None], position[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return step + 1, token, position + 1, cache, out, done

    state = (0, first, positions_BxP[:, -1] + 1, cache, out_BxT, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(keep_going, decode_one, state)[4]


def generate_greedy(
    model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int, pad_id: int, batch: int
) -> list[list[int]]:
    """Greedy continuations of `prompts` (without the EOS that ended them)."""
    results = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start: start + batch]
        padded = left_pad(chunk, batch, pad_id)
        out = np.asarray(_greedy(model, padded["tokens"], padded["positions"], padded["segment_ids"], eos_id, max_new_tokens))
        for row in out[: len(chunk)]:
            tokens = []
            for t in row:
                if t < 0 or t == eos_id:
                    break
                tokens.append(int(t))
            results.append(tokens)
    return results
