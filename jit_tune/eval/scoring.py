"""Log-likelihood scoring of token sequences (rank classification), packed into rows.

Rank classification scores each answer option by the log-likelihood of its tokens after
the prompt; the options of an example are short and alike in length, so one option per
padded row wastes most of the row. Here sequences are packed, several per row, as
training packs examples: each has its own segment id (1, 2, ...; 0 = padding), so
attention never crosses sequences, and positions restart at 0 per segment.

A sequence of n tokens takes n - 1 slots of a row, as in training (data.seq_len counts
inputs): token i is fed to predict token i + 1, and the last token is only predicted.
One jitted call per batch of rows returns per-segment sums, compiled once per (rows,
seq_len).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jit_tune.mesh import to_host
from jit_tune.models.decoder import Decoder
from jit_tune.train.step import token_losses

_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def pack_sequences(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `seq_len`, first fit decreasing:
    longest first (ties in input order), each into the first row with room for it."""
    free = np.zeros(len(lengths), np.int64)  # room left in each row opened so far
    rows: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths, np.int64), kind="stable"):
        n = int(lengths[i])
        if n > seq_len:
            raise ValueError(f"sequence {i} takes {n} slots; a row holds {seq_len}")
        fits = np.flatnonzero(free[: len(rows)] >= n)
        if fits.size:
            row = int(fits[0])
        else:
            row, free[len(rows)] = len(rows), seq_len
            rows.append([])
        rows[row].append(int(i))
        free[row] -= n
    return rows


@nnx.jit(static_argnames="chunk")
def segment_logliks(model: Decoder, batch: dict[str, jax.Array], chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Summed log p(target) over the masked targets, and their count, per row and segment
    id: [B, L + 1] each (a row of L slots holds at most L segments). The logits are
    formed `chunk` positions of each row at a time (0: all at once)."""
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    # token_losses is -log_softmax(float32 logits) at each target.
    logp_BxL = -token_losses(model, batch, chunk) * mask_BxL
    per_segment = jax.vmap(partial(jax.ops.segment_sum, num_segments=mask_BxL.shape[1] + 1))
    return per_segment(logp_BxL, batch["segment_ids"]), per_segment(mask_BxL, batch["segment_ids"])


def _rows(sequences: Sequence[tuple[np.ndarray, np.ndarray]], groups: Sequence[list[int]], seq_len: int,
          rows: int) -> dict[str, np.ndarray]:
    """Next-token rows (the training layout): the groups' sequences side by side, segment
    s of a row holding the group's s-th sequence; rows past the groups are padding."""
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in _FIELDS}
    for r, group in enumerate(groups):
        start = 0
        for segment, i in enumerate(group, 1):
            ids, mask = sequences[i]
            span = slice(start, start + len(ids) - 1)
            batch["inputs"][r, span], batch["targets"][r, span] = ids[:-1], ids[1:]
            batch["loss_mask"][r, span] = mask[1:]
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(len(ids) - 1)
            start = span.stop
    return batch


def sequence_logliks(model: Decoder, sequences: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, rows: int,
                     packed: bool = True, chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence (token ids [n], score mask [n]): the summed log p(ids[i] | ids[:i])
    over the i with mask[i] = 1 (float64), and how many there are (int64), in input
    order. With `packed`, sequences share rows (see pack_sequences); else one per row.
    Batches of `rows` rows of `seq_len` slots; a sequence of n tokens needs n - 1 slots;
    the logits `chunk` positions of each row at a time (0: all at once).
    Run it under the model's mesh (jax.set_mesh), like the rest of evaluation."""
    sequences = [(np.asarray(ids), np.asarray(mask)) for ids, mask in sequences]
    for i, (ids, mask) in enumerate(sequences):
        if len(ids) - 1 > seq_len:
            raise ValueError(f"sequence {i} has {len(ids)} tokens; rows of seq_len={seq_len} score sequences "
                             f"of at most {seq_len + 1} (the last token is only predicted); truncate its prompt")
        if len(mask) != len(ids) or (len(mask) and mask[0]):
            raise ValueError(f"sequence {i}: its mask needs one entry per token ({len(mask)} for {len(ids)}) "
                             "and mask[0] = 0 (the first token has no context to be scored in)")
    scored = [i for i, (ids, _) in enumerate(sequences) if len(ids) > 1]  # one token scores nothing
    if packed:
        groups = [[scored[j] for j in g] for g in pack_sequences([len(sequences[i][0]) - 1 for i in scored], seq_len)]
    else:
        groups = [[i] for i in scored]

    sums, counts = np.zeros(len(sequences), np.float64), np.zeros(len(sequences), np.int64)
    for start in range(0, len(groups), rows):
        batch_groups = groups[start: start + rows]
        sums_BxS, counts_BxS = segment_logliks(model, _rows(sequences, batch_groups, seq_len, rows), chunk)
        sums_BxS, counts_BxS = to_host(sums_BxS), to_host(counts_BxS)
        for r, group in enumerate(batch_groups):
            sums[group] = sums_BxS[r, 1: len(group) + 1]
            counts[group] = np.rint(counts_BxS[r, 1: len(group) + 1])
    return sums, counts
