"""A Llama-architecture decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every parameter carries logical axis names (`embed`, `heads`, `mlp`, ...); the mesh
rules in the config map them to mesh axes, so sharding is declared once, in the config.

Attention takes segment ids and positions: tokens attend only within their own segment
(packed examples never see each other; segment 0 is padding) and RoPE positions restart
per segment. The same call serves training (no cache) and cached decoding, where the
keys and values of earlier steps live in an explicit `KVCache` passed in and out.

With `lora.rank`, targeted weights carry LoRA adapters (models/lora.py) and, with
`lora.base_quantization`, the frozen projections are stored int8 or NF4
(models/quantize.py); every projection goes through `lora.project`.

Shape suffixes: B batch, L query length, S key length, D model dim, N query heads,
K key/value heads, G = N // K, H head dim, F mlp dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec

from jit_tune.models.attention import Blocks, attention, resolve, soft_cap
from jit_tune.models.dense import dense
from jit_tune.models.lora import LoraConfig, adapter, add_adapter, embedding_delta, project
from jit_tune.models.quantize import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    # "default", or "llama3": Llama 3.1's frequency-dependent stretch of the rotary base.
    rope_scaling: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on queries and keys, before RoPE
    # Gemma switches.
    norm_offset: float = 0.0  # 1.0: norms scale by (1 + w)
    embed_scale: bool = False  # embeddings times sqrt(d_model)
    post_norms: bool = False  # norms on the attention and MLP outputs too
    mlp_activation: str = "silu"  # or "gelu_tanh"
    attn_softcap: float = 0.0  # 0: off; else logits = cap * tanh(logits / cap)
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5 (0: head_dim)
    # Local attention: layers marked "sliding" see only the last `sliding_window` tokens
    # and, if rope_local_theta is set, use a default rope with that base.
    sliding_window: int = 0
    layer_types: tuple = ()  # per layer "full" or "sliding"; empty: all full
    rope_local_theta: float = 0.0
    # The context length servers size their cache by (HF max_position_embeddings). Not used
    # by the forward pass; carried so export writes it. 0: not known, not written.
    max_position_embeddings: int = 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # stored parameters (and optimizer moments); float32 = master weights
    # Training recomputes each block's activations in the backward pass instead of keeping
    # them: "none", "full" (keep only the block inputs) or "dots" (keep matmul outputs).
    remat: str = "none"
    # One scanned, stacked block instead of n_layers unrolled ones: compile time and
    # program size stop growing with depth. Needs identical layers (no mixed layer_types).
    scan_layers: bool = False
    # Attention implementation (models/attention.py): xla, xla_tiled, xla_chunked, splash,
    # pallas_gpu, or "auto", resolved when a layer is traced, by the backend of the process
    # running it (a saved "auto" picks the kernel of wherever the model is loaded). Cached
    # decoding always uses xla.
    attention: str = "xla"
    attention_blocks: Blocks = Blocks()  # the Pallas kernels' tile sizes (0: the kernel's default)
    # LoRA adapters and the frozen base's storage (rank 0: none, full fine-tuning).
    lora: LoraConfig = LoraConfig()

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
    """Keys/values of every layer for slots [0, S), and which segment each slot holds
    (0 = empty or padding). Decoding writes new tokens at slot `index`: a prompt of
    several tokens into an empty cache (the prefill, attended like a training row), then
    one token a call."""

    k_LxBxSxKxH: jax.Array
    v_LxBxSxKxH: jax.Array
    segment_ids_BxS: jax.Array
    index: jax.Array  # scalar int32: the next slot to write

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, length: int) -> KVCache:
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
        zeros = jnp.zeros(shape, config.compute_dtype)
        return cls(zeros, zeros, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))


def constrain(x: jax.Array, *logical: str | None) -> jax.Array:
    """Pin an activation's sharding by logical axis names, through the logical-axis rules
    in effect (mesh.use_mesh sets them while tracing a step; without rules this is a
    no-op). Activations are split over the batch; weights are gathered to meet them."""
    rules = get_logical_axis_rules()
    if not rules:
        return x
    table = dict(rules)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(table.get(name) for name in logical)))


def _param(config: DecoderConfig, rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...],
           fan_in: int) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=fan_in**-0.5)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(config.param_dtype)), out_sharding=axes)


def _projection(module: nnx.Module, name: str, config: DecoderConfig, rngs: nnx.Rngs, shape: tuple[int, ...],
                axes: tuple[str, ...], n_in: int) -> None:
    """The weight `name` [in..., out...] of `module` (its first `n_in` axes are inputs): a
    Param, or frozen and quantized with lora.base_quantization; and its LoRA adapter when
    lora.targets names it."""
    weight = _param(config, rngs, shape, axes, math.prod(shape[:n_in]))
    if config.lora.base_quantization != "none":
        weight = QuantizedWeight(weight[...], axes, n_in, config.lora.base_quantization)
    setattr(module, name, weight)
    add_adapter(module, name, shape, axes, n_in, config.lora, rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0, param_dtype: str = "float32"):
        # Initialized to the identity whatever the offset.
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.dtype(param_dtype)), out_sharding=("norm",))
        self.eps, self.offset = eps, offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_frequencies(config: DecoderConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies [H/2], as transformers computes them for each rope type."""
    h = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if local and config.rope_local_theta:
        return inv_freq
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / config.rope_factor
    if config.rope_scaling == "llama3":
        c = config
        wavelen = 2 * jnp.pi / inv_freq
        low_freq_wavelen = c.rope_original_max_position / c.rope_low_freq_factor
        high_freq_wavelen = c.rope_original_max_position / c.rope_high_freq_factor
        scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / c.rope_factor, inv_freq)
        smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) / (
            c.rope_high_freq_factor - c.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: DecoderConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's rotary angles side by side, [B, L, H] (cos in the
    first half): the full layers' table and the sliding layers' (the same one unless
    rope_local_theta is set). Computed once per forward pass for every layer, as
    transformers' rotary embedding is: made in each layer, XLA's CPU fusion computed the
    cosines and sines again inside each rotation, for every element of the queries and
    keys, forward and backward (the benchmark model's rotary passes ran 5x slower for it)."""

    def table(local: bool) -> jax.Array:
        angles_BxLxH2 = positions_BxL[..., None].astype(jnp.float32) * rope_frequencies(config, local)
        return jnp.concatenate([jnp.cos(angles_BxLxH2), jnp.sin(angles_BxLxH2)], axis=-1)

    full = table(local=False)
    return full, (table(local=True) if config.rope_local_theta else full)


def apply_rope(x_BxLxNxH: jax.Array, cos_sin_BxLxH: jax.Array) -> jax.Array:
    """Rotary embedding in the half-split layout Hugging Face Llama uses, from a
    `rope_tables` table."""
    cos, sin = jnp.split(cos_sin_BxLxH[:, :, None, :], 2, axis=-1)
    x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, config: DecoderConfig, layer: int, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.sliding = c.is_sliding(layer)
        _projection(self, "q_DxNxH", c, rngs, (c.d_model, c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), 1)
        _projection(self, "k_DxKxH", c, rngs, (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 1)
        _projection(self, "v_DxKxH", c, rngs, (c.d_model, c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), 1)
        _projection(self, "o_NxHxD", c, rngs, (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"), 2)
        if c.qkv_bias:
            zeros = partial(jnp.zeros, dtype=jnp.dtype(c.param_dtype))
            self.q_bias_NxH = nnx.Param(zeros((c.n_heads, c.head_dim)), out_sharding=("heads", "head_dim"))
            self.k_bias_KxH = nnx.Param(zeros((c.n_kv_heads, c.head_dim)), out_sharding=("kv_heads", "head_dim"))
            self.v_bias_KxH = nnx.Param(zeros((c.n_kv_heads, c.head_dim)), out_sharding=("kv_heads", "head_dim"))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.norm_eps, c.norm_offset, c.param_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.norm_eps, c.norm_offset, c.param_dtype)

    def __call__(self, x_BxLxD, rope_tables, segment_ids_BxL, slots_L, cache_kv=None, dropout_key=None):
        c = self.config
        dt = c.compute_dtype
        q = project(self, "q_DxNxH", "bld,dnh->blnh", x_BxLxD, c.lora, dropout_key)
        k = project(self, "k_DxKxH", "bld,dkh->blkh", x_BxLxD, c.lora, dropout_key)
        v = project(self, "v_DxKxH", "bld,dkh->blkh", x_BxLxD, c.lora, dropout_key)
        if c.qkv_bias:
            q = q + self.q_bias_NxH[...].astype(dt)
            k = k + self.k_bias_KxH[...].astype(dt)
            v = v + self.v_bias_KxH[...].astype(dt)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos_sin_BxLxH = rope_tables[self.sliding]  # (full, sliding)
        q, k = apply_rope(q, cos_sin_BxLxH), apply_rope(k, cos_sin_BxLxH)

        kv_segment, kv_slots, new_cache_kv = segment_ids_BxL, slots_L, None
        implementation = resolve(c.attention, c)
        if cache_kv is not None:  # decoding: write this step's keys/values
            k_cache, v_cache, cache_segment, start = cache_kv
            new_cache_kv = (jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1),
                            jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1))
            # A prompt (several tokens) goes into an empty cache (KVCache): its queries see
            # only its own keys, training's form, which the kernels take without the
            # [B, K, G, L, S] scores. One new token attends to every cache slot with the
            # reference, which takes any slots.
            if q.shape[1] == 1:
                k, v = new_cache_kv
                kv_segment, kv_slots, implementation = cache_segment, jnp.arange(k.shape[1]), "xla"
        out = attention(q, k, v, segment_ids_BxL, kv_segment, slots_L, kv_slots,
                        window=c.sliding_window if self.sliding else 0, softcap=c.attn_softcap,
                        scale=(c.query_pre_attn_scalar or c.head_dim) ** -0.5, implementation=implementation,
                        blocks=c.attention_blocks)
        return project(self, "o_NxHxD", "blnh,nhd->bld", out, c.lora, dropout_key), new_cache_kv


class MLP(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c = config
        _projection(self, "gate_DxF", c, rngs, (c.d_model, c.mlp_dim), ("embed", "mlp"), 1)
        _projection(self, "up_DxF", c, rngs, (c.d_model, c.mlp_dim), ("embed", "mlp"), 1)
        _projection(self, "down_FxD", c, rngs, (c.mlp_dim, c.d_model), ("mlp", "embed"), 1)
        self.activation, self.lora = c.mlp_activation, c.lora

    def __call__(self, x_BxLxD, dropout_key=None):
        gate = project(self, "gate_DxF", "bld,df->blf", x_BxLxD, self.lora, dropout_key)
        up = project(self, "up_DxF", "bld,df->blf", x_BxLxD, self.lora, dropout_key)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return project(self, "down_FxD", "blf,fd->bld", act * up, self.lora, dropout_key)


# "dots" keeps the outputs of matmuls against weights (no batch dimensions), not the
# attention score einsums, which are as large as the activations they would save.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Block(nnx.Module):
    def __init__(self, config: DecoderConfig, layer: int, rngs: nnx.Rngs):
        c = config
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_offset, c.param_dtype)
        self.attn = Attention(c, layer, rngs)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_offset, c.param_dtype)
        self.mlp = MLP(c, rngs)
        if c.post_norms:
            self.attn_post_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_offset, c.param_dtype)
            self.mlp_post_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_offset, c.param_dtype)
        self.post_norms = c.post_norms

    def __call__(self, x, rope_tables, segment_ids, slots, cache_kv=None, dropout_key=None):
        # One dropout key for the layer: each projection folds in its own stem (lora.project).
        attn_out, new_cache_kv = self.attn(self.attn_norm(x), rope_tables, segment_ids, slots, cache_kv, dropout_key)
        mlp_in = x + (self.attn_post_norm(attn_out) if self.post_norms else attn_out)
        mlp_out = self.mlp(self.mlp_norm(mlp_in), dropout_key)
        return mlp_in + (self.mlp_post_norm(mlp_out) if self.post_norms else mlp_out), new_cache_kv


class Decoder(nnx.Module):
    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed_VxD = nnx.Param(
            jax.random.normal(rngs.params(), (c.vocab_size, c.d_model), jnp.dtype(c.param_dtype)),
            out_sharding=("vocab", "embed"),
        )
        add_adapter(self, "embed_VxD", (c.vocab_size, c.d_model), ("vocab", "embed"), 1, c.lora, rngs)
        if c.scan_layers:
            self.blocks = _stacked_blocks(c, rngs)
        else:
            self.blocks = nnx.List([Block(c, layer, rngs) for layer in range(c.n_layers)])
        self.final_norm = RMSNorm(c.d_model, c.norm_eps, c.norm_offset, c.param_dtype)
        if not c.tie_embeddings:
            self.unembed_DxV = _param(c, rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), c.d_model)
            add_adapter(self, "unembed_DxV", (c.d_model, c.vocab_size), ("embed", "vocab"), 1, c.lora, rngs)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        segment_ids_BxL: jax.Array,
        cache: KVCache | None = None,
        last_only: bool = False,
        hidden_only: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Float32 logits [B, L, V] ([B, 1, V] for the last position only, with
        `last_only`), and the updated cache when one is given. With `hidden_only`, the
        final normed hidden states [B, L, D] instead: the training loss projects them to
        the vocabulary a chunk at a time (`vocab_logits` with `unembedding()`), so the
        whole [B, L, V] never exists. A `dropout_key` (training) turns LoRA dropout on."""
        c = self.config
        x = self.embed_VxD[...].astype(c.compute_dtype)[tokens_BxL]
        delta = embedding_delta(self, tokens_BxL, c.lora, c.compute_dtype)
        if delta is not None:
            x = x + delta
        if c.embed_scale:
            x = x * jnp.asarray(c.d_model**0.5, c.compute_dtype)
        x = constrain(x, "batch", "length", "activation_embed")
        if cache is None:
            slots = jnp.arange(tokens_BxL.shape[1])
        else:
            slots = cache.index + jnp.arange(tokens_BxL.shape[1])
            kv_segment = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids_BxS, segment_ids_BxL, cache.index, axis=1)
        new_k, new_v = [], []
        tables = rope_tables(c, positions_BxL)
        call = Block.__call__
        if cache is None and c.remat != "none":
            call = nnx.remat(call, policy=REMAT_POLICIES[c.remat], prevent_cse=True)

        def layer(block, x, k, v, i):
            layer_cache = None if cache is None else (k, v, kv_segment, cache.index)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            x, kv = call(block, x, tables, segment_ids_BxL, slots, layer_cache, key)
            return constrain(x, "batch", "length", "activation_embed"), kv

        if c.scan_layers:
            x, new_k, new_v = _scan_layers(layer, self.blocks, x, cache, c.n_layers)
        else:
            for i, block in enumerate(self.blocks):
                kv_in = (None, None) if cache is None else (cache.k_LxBxSxKxH[i], cache.v_LxBxSxKxH[i])
                x, kv = layer(block, x, *kv_in, i)
                if kv is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
        if last_only:  # a prefill samples from the last position alone: skip [B, L, V] logits
            x = x[:, -1:]
        x = self.final_norm(x)
        logits = x if hidden_only else vocab_logits(x, self.unembedding(), c.final_softcap)
        if cache is None:
            return logits, None
        if not c.scan_layers:
            new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        new_cache = KVCache(new_k, new_v, kv_segment, cache.index + tokens_BxL.shape[1])
        return logits, new_cache

    def unembedding(self) -> Unembedding:
        """The output projection [D, V] in the compute dtype (the embedding's transpose
        when tied), with its LoRA factors when adapted; `vocab_logits` applies it with
        config.final_softcap."""
        c = self.config
        unembed = self.embed_VxD[...].T if c.tie_embeddings else self.unembed_DxV[...]
        lora = None if c.tie_embeddings else adapter(self, "unembed_DxV")
        if lora is None:
            return Unembedding(unembed.astype(c.compute_dtype))
        a, b = lora
        return Unembedding(unembed.astype(c.compute_dtype), (c.lora.scale * a[...]).astype(c.compute_dtype),
                           b[...].astype(c.compute_dtype))


class Unembedding(NamedTuple):
    """The output projection and, with LoRA, its factors (A already scaled by alpha / r):
    logits = x W + (x A) B, never forming W + A B."""

    w_DxV: jax.Array
    a_DxR: jax.Array | None = None
    b_RxV: jax.Array | None = None


def vocab_logits(x_BxLxD: jax.Array, unembed: Unembedding | jax.Array, softcap: float) -> jax.Array:
    """Float32 logits of final hidden states, softcapped: of every position, or of one
    chunk of positions (train/step.py's chunked loss)."""
    if not isinstance(unembed, Unembedding):
        unembed = Unembedding(unembed)
    logits = dense(x_BxLxD, unembed.w_DxV, dtype=jnp.float32)
    if unembed.a_DxR is not None:
        x_BxLxR = jnp.einsum("bld,dr->blr", x_BxLxD, unembed.a_DxR)
        logits = logits + jnp.einsum("blr,rv->blv", x_BxLxR, unembed.b_RxV, preferred_element_type=jnp.float32)
    return constrain(soft_cap(logits, softcap), "batch", "length", "vocab")


def _stacked_blocks(config: DecoderConfig, rngs: nnx.Rngs) -> Block:
    """n_layers blocks as one Block whose parameters have a leading "layers" axis."""
    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.n_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return Block(config, 0, rngs)

    return create(rngs)


def _scan_layers(layer, blocks: Block, x: jax.Array, cache: KVCache | None, n_layers: int):
    """Run `layer` over the stacked blocks (and each layer's cache slice, when decoding),
    as a plain lax.scan over the blocks' state: it also runs inside decoding's while loop."""
    graphdef, state = nnx.split(blocks)

    def body(x, xs):
        layer_state, k, v, i = xs
        x, kv = layer(nnx.merge(graphdef, layer_state), x, k, v, i)
        return x, kv

    layers = jnp.arange(n_layers)  # each layer's index: its LoRA dropout key, as unscanned
    if cache is None:
        return jax.lax.scan(lambda x, s: (body(x, (s[0], None, None, s[1]))[0], None), x, (state, layers))[0], None, None
    x, (new_k, new_v) = jax.lax.scan(body, x, (state, cache.k_LxBxSxKxH, cache.v_LxBxSxKxH, layers))
    return x, new_k, new_v
