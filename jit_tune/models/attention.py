"""Attention: one function, several implementations, chosen by `config.model.attention`.

Every implementation computes the same thing: a query attends a key only within the
same non-zero segment (packed examples never see each other; segment 0 is padding), not
in the future (kv_slot <= q_slot), and with `window` > 0 only the last `window` slots;
logits are scaled by `scale` and, with `softcap` > 0, soft-capped as cap * tanh(x / cap).
Rows with no key to attend (padding) give a finite output and finite gradients; their
loss is masked.

  xla          the reference: the whole [B, K, G, L, S] float32 score matrix and a masked
               softmax. Any slots (it also serves cached decoding).
  xla_tiled    the reference on tiles of queries, each against the keys before its end
               (and within its window): the masked triangle is skipped. Its backward is
               written out, flash-style, in plain matmuls. Training layout only (q and kv
               one sequence, slots = arange). The CPU default: about twice as fast as xla.
  xla_chunked  pure JAX, flash-style: a scan over key/value blocks with an online softmax,
               never the whole score matrix; each block is recomputed in the backward pass.
  splash       TPU Pallas splash attention. Training layout only: q and kv the same
               sequence with slots = arange (causal and local masks are static).
  pallas_gpu   the Pallas Triton flash attention for GPUs. Training layout only; it has
               no sliding window and no soft-cap.

Not here: cuDNN through jax.nn.dot_product_attention. It takes no segment ids, so packed
rows would attend across examples (MaxText issue 4476).

Pallas kernels run in interpret mode where the mesh's platform is not theirs, so the
tests run them on CPU. Their tile sizes are `Blocks` (config.model.attention_blocks),
each 0 by default: the kernel's own choice. Mosaic and Triton kernels cannot be partitioned by the compiler:
under a mesh they run per shard in a shard_map over the batch (and heads) axes.

Shape suffixes: B batch, L query length, S key length, N query heads, K key/value heads,
G = N // K, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec as P

from jit_tune.mesh import platform
from jit_tune.models.dense import matmul, row_major

# A finite fill for masked logits: fully masked rows stay free of NaN (exp(0) = 1, not 0/0).
MASKED = -1e30

# config.model.attention = "auto" on a CPU host: one line, so a benchmark can change it.
CPU_DEFAULT = "xla_tiled"


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of the Pallas kernels (config.model.attention_blocks): queries and keys
    per tile in the forward pass (q, kv), the dK/dV pass (q_dkv, kv_dkv) and the dQ pass
    (q_dq, kv_dq). 0 keeps the kernel's default: splash the largest of 512, 256 and 128
    that divides the padded length, everywhere; pallas_gpu JAX's BlockSizes, 128 forward
    and 32 backward. Kernels tile a length padded to a multiple of every one."""

    q: int = 0
    kv: int = 0
    q_dkv: int = 0
    kv_dkv: int = 0
    q_dq: int = 0
    kv_dq: int = 0

    def resolved(self, default) -> dict[str, int]:
        """Each field, or `default(name)` where 0."""
        return {f.name: getattr(self, f.name) or default(f.name) for f in dataclasses.fields(self)}


def attention_mask(q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, window: int = 0) -> jax.Array:
    """True where a query may attend a key: same non-padding segment, not in the future,
    and with a window, fewer than `window` slots back (a segment's slots are contiguous)."""
    same_segment = q_segment_BxL[:, :, None] == kv_segment_BxS[:, None, :]
    causal = kv_slot_S[None, None, :] <= q_slot_L[None, :, None]
    mask = same_segment & causal & (kv_segment_BxS[:, None, :] != 0)
    if window:
        mask &= kv_slot_S[None, None, :] > q_slot_L[None, :, None] - window
    return mask


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap), or x when cap is 0 (attention logits here, final logits in the decoder)."""
    return cap * jnp.tanh(x / cap) if cap else x


def _masked_logits(q_BxLxKxGxH, k_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S,
                   window: int, softcap: float, scale: float) -> jax.Array:
    """Float32 scores [B, K, G, L, S], masked ones set to MASKED."""
    logits = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    logits = soft_cap(logits * scale, softcap)
    mask_BxLxS = attention_mask(q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, window)
    return jnp.where(mask_BxLxS[:, None, None], logits, MASKED)


def _grouped(q_BxLxNxH: jax.Array, kv_heads: int) -> jax.Array:
    b, l, n, h = q_BxLxNxH.shape
    return q_BxLxNxH.reshape(b, l, kv_heads, n // kv_heads, h)


def xla(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, *,
        window: int = 0, softcap: float = 0.0, scale: float) -> jax.Array:
    """The reference: the whole score matrix, a masked softmax over it."""
    b, l, n, h = q_BxLxNxH.shape
    logits = _masked_logits(_grouped(q_BxLxNxH, k_BxSxKxH.shape[2]), k_BxSxKxH, q_segment_BxL, kv_segment_BxS,
                            q_slot_L, kv_slot_S, window, softcap, scale)
    probs = jax.nn.softmax(logits, axis=-1).astype(q_BxLxNxH.dtype)
    return jnp.einsum("bkgls,bskh->blkgh", probs, v_BxSxKxH).reshape(b, l, n, h)


def xla_chunked(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, *,
                window: int = 0, softcap: float = 0.0, scale: float, block: int = 512) -> jax.Array:
    """Flash-style in pure JAX: scan over key/value blocks keeping a running max, sum and
    weighted sum of values per query; memory is [B, K, G, L, block], not [..., L, S]."""
    b, l, n, h = q_BxLxNxH.shape
    s, kv_heads = k_BxSxKxH.shape[1:3]
    block = min(block, s)
    blocks = -(-s // block)
    pad = blocks * block - s
    # Padded keys get segment 0: masked for every query.
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k_BxSxKxH, v_BxSxKxH))
    kv_segment = jnp.pad(kv_segment_BxS, ((0, 0), (0, pad)))
    kv_slot = jnp.pad(kv_slot_S, (0, pad))
    # Blocks on the leading axis, which scan walks.
    k_blocks, v_blocks = (x.reshape(b, blocks, block, kv_heads, h).swapaxes(0, 1) for x in (k, v))
    xs = (k_blocks, v_blocks, kv_segment.reshape(b, blocks, block).swapaxes(0, 1), kv_slot.reshape(blocks, block))
    q_BxLxKxGxH = _grouped(q_BxLxNxH, kv_heads)

    # Recomputed in the backward pass: only the (max, sum, acc) carries are kept per block.
    @partial(jax.checkpoint, prevent_cse=False)
    def step(carry, block_xs):
        max_BxKxGxL, sum_BxKxGxL, acc_BxKxGxLxH = carry
        k_b, v_b, segment_b, slot_b = block_xs
        logits = _masked_logits(q_BxLxKxGxH, k_b, q_segment_BxL, segment_b, q_slot_L, slot_b, window, softcap, scale)
        # The max only keeps exp in range; the result does not depend on it, so no gradient.
        new_max = jax.lax.stop_gradient(jnp.maximum(max_BxKxGxL, logits.max(-1)))
        # A row masked so far has max MASKED and sums exp(0) = 1 per masked key (finite,
        # like the reference's uniform softmax); its first real key makes this 0.
        correction = jnp.exp(max_BxKxGxL - new_max)
        probs = jnp.exp(logits - new_max[..., None])
        acc_BxKxGxLxH = acc_BxKxGxLxH * correction[..., None] + jnp.einsum(
            "bkgls,bskh->bkglh", probs.astype(v_b.dtype), v_b, preferred_element_type=jnp.float32)
        return (new_max, sum_BxKxGxL * correction + probs.sum(-1), acc_BxKxGxLxH), None

    stats_shape = q_BxLxKxGxH.shape[:1] + q_BxLxKxGxH.shape[2:4] + (l,)
    init = (jnp.full(stats_shape, MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(stats_shape + (h,), jnp.float32))
    (_, sum_BxKxGxL, acc_BxKxGxLxH), _ = jax.lax.scan(step, init, xs)
    out_BxKxGxLxH = acc_BxKxGxLxH / sum_BxKxGxL[..., None]
    return out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(b, l, n, h).astype(q_BxLxNxH.dtype)


def xla_tiled(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, *,
              window: int = 0, softcap: float = 0.0, scale: float, tile: int = 128, max_tiles: int = 8) -> jax.Array:
    """The reference a tile of queries at a time, each against only the keys it can see:
    none after the tile's last query (causal) and, with a window, none before its first
    query's window. The masked upper triangle is mostly never computed: n tiles do
    (n + 1) / 2n of the work and hold 1/n of the scores at a time."""
    _training_layout("xla_tiled", q_BxLxNxH, k_BxSxKxH)
    length = q_BxLxNxH.shape[1]
    tiles = max(1, min(max_tiles, length // tile))
    bounds = tuple(round(i * length / tiles) for i in range(tiles + 1))
    return _tiled(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S,
                  bounds, window, softcap, scale)


def _spans(bounds: tuple[int, ...], window: int):
    """Each tile's (first query, end, first key it can see): slots are arange, key j is slot j."""
    for start, end in zip(bounds, bounds[1:]):
        yield start, end, max(0, start - window + 1) if window else 0


# Its backward is written out (as flash attention's is) rather than left to autodiff: every
# product is then a plain [M, K] x [K, N] matmul over the kv head's G * tile query rows, the
# layout XLA's CPU backend runs in bfloat16 (dense.py; without bfloat16 dots, dense.matmul
# runs it in float32 on upcast operands), and the softmax's gradient is one pass,
# p * (dp - rowsum(dO * O)), over the probabilities the forward pass kept.
@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _tiled(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S,
           bounds, window, softcap, scale):
    return _tiled_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S,
                      bounds, window, softcap, scale)[0]


def _tiled_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S,
               bounds, window, softcap, scale):
    b, l, n, h = q_BxLxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    g = n // kv_heads
    # Scaled queries, a kv head's G heads stacked as rows: [B, K, G, L, H].
    q_BxKxGxLxH = row_major(_grouped((q_BxLxNxH * scale).astype(q_BxLxNxH.dtype), kv_heads), (0, 2, 3, 1, 4))
    kt_BxKxHxS, v_BxKxSxH = row_major(k_BxSxKxH, (0, 2, 3, 1)), row_major(v_BxSxKxH, (0, 2, 1, 3))
    outs, kept = [], []
    for start, end, first in _spans(bounds, window):
        rows, keys = g * (end - start), end - first
        logits = matmul(q_BxKxGxLxH[:, :, :, start:end].reshape(b, kv_heads, rows, h), kt_BxKxHxS[..., first:end])
        capped_BxKxGxLxS = soft_cap(logits.reshape(b, kv_heads, g, end - start, keys), softcap)
        mask_BxLxS = attention_mask(q_segment_BxL[:, start:end], kv_segment_BxS[:, first:end], q_slot_L[start:end],
                                    kv_slot_S[first:end], window)
        probs = jax.nn.softmax(jnp.where(mask_BxLxS[:, None, None], capped_BxKxGxLxS, MASKED), axis=-1)
        outs.append(matmul(probs.astype(v_BxSxKxH.dtype).reshape(b, kv_heads, rows, keys), v_BxKxSxH[:, :, first:end]))
        # The soft-cap's derivative needs the capped logits; masked keys have probability 0.
        kept.append((probs, capped_BxKxGxLxS if softcap else None))
    out_BxKxGxLxH = jnp.concatenate([o.reshape(b, kv_heads, g, -1, h) for o in outs], axis=3)
    out = out_BxKxGxLxH.transpose(0, 3, 1, 2, 4).reshape(b, l, n, h).astype(q_BxLxNxH.dtype)
    return out, (q_BxKxGxLxH, k_BxSxKxH, v_BxSxKxH, out_BxKxGxLxH, kept)


def _tiled_bwd(bounds, window, softcap, scale, residuals, dout_BxLxNxH):
    q_BxKxGxLxH, k_BxSxKxH, v_BxSxKxH, out_BxKxGxLxH, kept = residuals
    b, kv_heads, g, l, h = q_BxKxGxLxH.shape
    dtype = q_BxKxGxLxH.dtype
    do_BxKxGxLxH = row_major(_grouped(dout_BxLxNxH.astype(dtype), kv_heads), (0, 2, 3, 1, 4))
    # rowsum(dO * O) = rowsum(P * dP): the softmax gradient's shift, from [L, H] not [L, S].
    delta_BxKxGxL = jnp.sum(do_BxKxGxLxH.astype(jnp.float32) * out_BxKxGxLxH, axis=-1)
    vt_BxKxHxS, k_BxKxSxH = row_major(v_BxSxKxH, (0, 2, 3, 1)), row_major(k_BxSxKxH, (0, 2, 1, 3))
    dk_BxKxSxH = dv_BxKxSxH = jnp.zeros(k_BxKxSxH.shape, jnp.float32)
    dqs = []
    for (start, end, first), (probs, capped) in zip(_spans(bounds, window), kept):
        rows, keys = g * (end - start), end - first
        do = do_BxKxGxLxH[:, :, :, start:end].reshape(b, kv_heads, rows, h)
        dp = matmul(do, vt_BxKxHxS[..., first:end])
        ds = probs * (dp.reshape(probs.shape) - delta_BxKxGxL[:, :, :, start:end, None])
        if softcap:  # d(cap * tanh(x / cap)) / dx = 1 - (capped / cap)^2
            ds = ds * (1 - jnp.square(capped / softcap))
        ds = ds.astype(dtype).reshape(b, kv_heads, rows, keys)
        p = probs.astype(dtype).reshape(b, kv_heads, rows, keys)
        q = q_BxKxGxLxH[:, :, :, start:end].reshape(b, kv_heads, rows, h)
        dqs.append(matmul(ds, k_BxKxSxH[:, :, first:end]))
        dk_BxKxSxH = dk_BxKxSxH.at[:, :, first:end].add(matmul(row_major(ds, (0, 1, 3, 2)), q))
        dv_BxKxSxH = dv_BxKxSxH.at[:, :, first:end].add(matmul(row_major(p, (0, 1, 3, 2)), do))
    dq_BxKxGxLxH = jnp.concatenate([dq.reshape(b, kv_heads, g, -1, h) for dq in dqs], axis=3)
    dq = (dq_BxKxGxLxH.transpose(0, 3, 1, 2, 4) * scale).reshape(b, l, kv_heads * g, h)
    dk = dk_BxKxSxH.transpose(0, 2, 1, 3).astype(k_BxSxKxH.dtype)
    dv = dv_BxKxSxH.transpose(0, 2, 1, 3).astype(v_BxSxKxH.dtype)
    return dq.astype(dtype), dk, dv, None, None, None, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _per_shard(kernel: Callable, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS) -> jax.Array:
    """`kernel` on each device's shard under a multi-device mesh: the batch split as the
    "batch" rule says, the heads as "heads"/"kv_heads" say when the kv heads divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return kernel(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS)
    rules = dict(get_logical_axis_rules())

    def axes(logical: str, size: int):
        names = rules.get(logical)
        n_shards = math.prod(mesh.shape[a] for a in ((names,) if isinstance(names, str) else names or ()))
        return names if names and size % n_shards == 0 else None

    batch = axes("batch", q_BxLxNxH.shape[0])
    heads = axes("kv_heads", k_BxSxKxH.shape[2]) if rules.get("heads") == rules.get("kv_heads") else None
    # Head n is kv head n // G: contiguous shards of N and of K hold matching heads.
    heads_spec, segment_spec = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(kernel, in_specs=(heads_spec,) * 3 + (segment_spec,) * 2, out_specs=heads_spec,
                         check_vma=False)(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS)


def _pad_length(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _training_layout(name: str, q_BxLxNxH, k_BxSxKxH) -> None:
    if q_BxLxNxH.shape[1] != k_BxSxKxH.shape[1]:
        raise ValueError(f"attention {name!r}: queries and keys must be the same sequence (training or "
                         f"packed evaluation, slots = arange), got L={q_BxLxNxH.shape[1]}, S={k_BxSxKxH.shape[1]}")


def _splash_kernel(length: int, heads: int, window: int, softcap: float, blocks: dict[str, int],
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    sizes = splash.BlockSizes(block_q=blocks["q"], block_kv=blocks["kv"], block_kv_compute=blocks["kv"],
                              block_q_dkv=blocks["q_dkv"], block_kv_dkv=blocks["kv_dkv"],
                              block_kv_dkv_compute=blocks["kv_dkv"], block_q_dq=blocks["q_dq"],
                              block_kv_dq=blocks["kv_dq"])
    shape = (length, length)
    # Local (window - 1 back, 0 ahead) is causal too; the segment ids do the packing. Built
    # per trace (it holds arrays); splash caches the costly mask analysis itself.
    mask = splash.LocalMask(shape, (window - 1, 0), offset=0) if window else splash.CausalMask(shape)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap or None, interpret=interpret)


def splash(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, *,
           window: int = 0, softcap: float = 0.0, scale: float, blocks: Blocks = Blocks()) -> jax.Array:
    """TPU splash attention, per batch row (vmap), GQA by its own grouping of query heads
    per kv head. Slots are taken to be arange (its masks are static)."""
    del q_slot_L, kv_slot_S
    _training_layout("splash", q_BxLxNxH, k_BxSxKxH)
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    l = q_BxLxNxH.shape[1]
    padded = -(-l // 128) * 128  # the kernel tiles by multiples of 128
    # By default blocks as large as the padded length allows, up to 512: fewer grid steps.
    default = next(b for b in (512, 256, 128) if padded % b == 0)
    sizes = blocks.resolved(lambda _: default)
    if any(size % 128 for size in sizes.values()):
        raise ValueError(f"attention 'splash': config.model.attention_blocks {sizes}: expected multiples of 128 "
                         "(a TPU tile's lanes), or 0 for the default")
    tile = math.lcm(*sizes.values())
    padded = -(-l // tile) * tile
    interpret = platform() != "tpu"

    def kernel(q, k, v, q_segment, kv_segment):
        run = _splash_kernel(padded, q.shape[2], window, softcap, sizes, interpret)
        # The kernel does not scale; padded tokens are segment 0, which sees itself, so no
        # row of the kernel is empty.
        q = (q * scale).astype(q.dtype)
        q, k, v = (_pad_length(x, padded).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, L, H]
        q_segment, kv_segment = _pad_length(q_segment, padded), _pad_length(kv_segment, padded)
        out = jax.vmap(lambda q, k, v, qs, ks: run(q, k, v, SegmentIds(qs, ks)))(q, k, v, q_segment, kv_segment)
        return out.transpose(0, 2, 1, 3)[:, :l]

    return _per_shard(kernel, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS)


def pallas_gpu(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L, kv_slot_S, *,
               window: int = 0, softcap: float = 0.0, scale: float, blocks: Blocks = Blocks()) -> jax.Array:
    """The Pallas Triton flash attention (causal, segment ids), with the kv heads repeated
    for GQA. Slots are taken to be arange; one segment-id array serves q and kv."""
    del q_slot_L, kv_slot_S, kv_segment_BxS
    if window or softcap:
        raise ValueError(f"attention 'pallas_gpu' has no sliding window or logit soft-cap (window={window}, "
                         f"softcap={softcap}); use 'xla_chunked' (or 'auto')")
    _training_layout("pallas_gpu", q_BxLxNxH, k_BxSxKxH)
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    default = BlockSizes.get_default()
    sizes = blocks.resolved(lambda name: getattr(default, "block_k" if name == "kv" else f"block_{name}"))
    check_pallas_gpu_blocks(sizes)
    l = q_BxLxNxH.shape[1]
    tile = math.lcm(*sizes.values())
    padded = -(-l // tile) * tile
    interpret = platform() != "gpu"
    block_sizes = BlockSizes(block_q=sizes["q"], block_k=sizes["kv"], block_q_dkv=sizes["q_dkv"],
                             block_kv_dkv=sizes["kv_dkv"], block_q_dq=sizes["q_dq"], block_kv_dq=sizes["kv_dq"])

    def kernel(q, k, v, segment, _):
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        q, k, v, segment = (_pad_length(x, padded) for x in (q, k, v, segment))
        return mha(q, k, v, segment, sm_scale=scale, causal=True, block_sizes=block_sizes,
                   interpret=interpret)[:, :l]

    return _per_shard(kernel, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, q_segment_BxL)


def check_pallas_gpu_blocks(sizes: dict[str, int]) -> None:
    """The Triton kernel's fused backward computes, for each key block of the dK/dV pass,
    dQ of the query block with the same index: so q_dq must equal kv_dkv."""
    if sizes["q_dq"] != sizes["kv_dkv"]:
        raise ValueError(f"attention 'pallas_gpu': config.model.attention_blocks q_dq = {sizes['q_dq']} and "
                         f"kv_dkv = {sizes['kv_dkv']}: expected them equal (its backward pass computes dQ of the "
                         "query block with the index of its key block)")


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": xla, "xla_tiled": xla_tiled, "xla_chunked": xla_chunked, "splash": splash, "pallas_gpu": pallas_gpu}
CHOICES = ("auto", *IMPLEMENTATIONS)  # config.model.attention


def attention(q_BxLxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, q_segment_BxL: jax.Array,
              kv_segment_BxS: jax.Array, q_slot_L: jax.Array, kv_slot_S: jax.Array, *, window: int = 0,
              softcap: float = 0.0, scale: float, implementation: str, blocks: Blocks = Blocks()) -> jax.Array:
    """Attention output [B, L, N, H] (N = K * G) by the named implementation ("auto" must be
    resolved first: see `resolve`); `blocks` are the Pallas kernels' tiles."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    tiles = {"blocks": blocks} if implementation in ("splash", "pallas_gpu") else {}
    return IMPLEMENTATIONS[implementation](q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, q_segment_BxL, kv_segment_BxS, q_slot_L,
                                           kv_slot_S, window=window, softcap=softcap, scale=scale, **tiles)


def resolve(name: str, config, backend: str | None = None) -> str:
    """The implementation `name` stands for: itself, or for "auto" the default of
    `backend` (this process's by default; `jit-tune compile` passes "tpu"). `config` is a
    DecoderConfig or config.model (the Triton kernel has no sliding window or soft-cap)."""
    if name != "auto":
        return name
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        windowed = config.sliding_window and "sliding" in tuple(config.layer_types)
        return "xla_chunked" if windowed or config.attn_softcap else "pallas_gpu"
    return CPU_DEFAULT
