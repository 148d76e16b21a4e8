"""LoRA (Hu et al. 2021) as PEFT defines it: a frozen base weight W plus a trained
low-rank update (alpha / r) A B.

An adapted weight W [in..., out...] (its first n_in axes are inputs, e.g. q_DxNxH: D)
gets A [in..., r] and B [r, out...] as `nnx.LoRAParam`s beside it in the same module,
named by the weight's stem (q_DxNxH: `q_lora_a`, `q_lora_b`). Their logical axes are
the weight's input axes + "lora_rank", and "lora_rank" + its output axes, so they shard
by the same rules as the weight on every mesh, stacked (scanned) layers included.

The update is computed on activations, x W + (alpha / r) dropout(x) A B, never by
forming W + A B: the backward pass then builds no gradient of W's size. A starts
uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform) and B at zero, so step 0 is the
base model; embeddings follow PEFT's other way round (A zero, B normal).

Only adapters are trained (`trainable`): nnx.LoRAParam subclasses nnx.Param, so a
filter of nnx.Param would take the base too.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jit_tune.models.dense import dense
from jit_tune.models.quantize import QuantizedWeight

# The weights LoRA can adapt, by stem: attention, MLP, embeddings.
STEMS = ("q", "k", "v", "o", "gate", "up", "down", "embed", "unembed")
DEFAULT_TARGETS = "q|k|v|o|gate|up|down"
QUANTIZATIONS = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' inputs, in training
    targets: str = DEFAULT_TARGETS  # a regular expression that fully matches the stems adapted
    base_quantization: str = "none"  # the frozen base's projections stored as int8 or nf4 (QLoRA)
    seed: int = 0  # dropout masks derive from this and the step

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, stem: str) -> bool:
        return self.rank > 0 and re.fullmatch(self.targets, stem) is not None


def stem(weight_name: str) -> str | None:
    """q_DxNxH -> q; unembed_DxV -> unembed; None for a name that is not a stem and a
    shape (q_bias_NxH, scale)."""
    match = re.fullmatch(r"([a-z]+)_[A-Z](?:x[A-Z])*", weight_name)
    return match.group(1) if match else None


def adapted_stems(targets: str) -> list[str]:
    return [s for s in STEMS if re.fullmatch(targets, s)]


def trainable(config) -> type[nnx.Param]:
    """What a train step differentiates and the optimizer and checkpoints hold: the
    adapters with LoRA, else every parameter. `config` is a DecoderConfig."""
    return nnx.LoRAParam if config.lora.rank else nnx.Param


# The frozen base: parameters that are not adapters (quantized weights are not Params).
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def add_adapter(module: nnx.Module, weight_name: str, shape: tuple[int, ...], axes: tuple, n_in: int,
                config: LoraConfig, rngs: nnx.Rngs) -> None:
    """`{stem}_lora_a` and `{stem}_lora_b` on `module`, if config.targets names the stem.
    Adapters are float32 whatever the base's dtype: they are trained (master weights)."""
    s = stem(weight_name)
    if not config.adapts(s):
        return
    r, in_shape, out_shape = config.rank, shape[:n_in], shape[n_in:]
    if s == "embed":  # PEFT's embedding adapters: A zero, B normal
        a = jnp.zeros((*in_shape, r), jnp.float32)
        b = jax.random.normal(rngs.params(), (r, *out_shape), jnp.float32)
    else:
        bound = math.prod(in_shape) ** -0.5
        a = jax.random.uniform(rngs.params(), (*in_shape, r), jnp.float32, -bound, bound)
        b = jnp.zeros((r, *out_shape), jnp.float32)
    setattr(module, f"{s}_lora_a", nnx.LoRAParam(a, out_sharding=(*axes[:n_in], "lora_rank")))
    setattr(module, f"{s}_lora_b", nnx.LoRAParam(b, out_sharding=("lora_rank", *axes[n_in:])))


def adapter(module: nnx.Module, weight_name: str) -> tuple[nnx.LoRAParam, nnx.LoRAParam] | None:
    """The adapter (A, B) of the module's weight `weight_name`, or None."""
    s = stem(weight_name)
    a = getattr(module, f"{s}_lora_a", None) if s else None
    return None if a is None else (a, getattr(module, f"{s}_lora_b"))


def base_weight(module: nnx.Module, weight_name: str, dtype) -> jax.Array:
    """The module's weight in `dtype`, dequantized if it is stored quantized."""
    weight = getattr(module, weight_name)
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight[...].astype(dtype)


def project(module: nnx.Module, weight_name: str, spec: str, x: jax.Array, config: LoraConfig,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """einsum(spec, x, W) for the module's weight `weight_name`, plus its adapter's
    (alpha / r) dropout(x) A B when it has one. The adapter's einsums follow from `spec`:
    for "bld,dnh->blnh", x A is "bld,dr->blr" and (x A) B is "blr,rnh->blnh"."""
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    contracted = "".join(c for c in rhs if c in lhs)
    rest = "".join(c for c in lhs if c not in rhs)
    weight_out = "".join(c for c in rhs if c not in lhs)
    if (lhs, rhs, out) != (rest + contracted, contracted + weight_out, rest + weight_out):
        # dense() contracts x's last axes with the weight's first, in order.
        raise ValueError(f"project {weight_name}: {spec!r} must contract the trailing axes of x with the "
                         f"leading axes of the weight, in order, and keep the rest in order (like 'bld,dnh->blnh')")
    y = dense(x, base_weight(module, weight_name, x.dtype), len(contracted))
    lora = adapter(module, weight_name)
    if lora is None:
        return y
    a, b = (p[...].astype(x.dtype) for p in lora)
    if dropout_key is not None and config.dropout > 0:
        # One mask per projection, as PEFT's per-module dropout (q, k and v share x).
        key = jax.random.fold_in(dropout_key, STEMS.index(stem(weight_name)))
        keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
    xa = jnp.einsum(f"{lhs},{contracted}r->{rest}r", x, a)
    return y + config.scale * jnp.einsum(f"{rest}r,r{weight_out}->{out}", xa, b)


def embedding_delta(module: nnx.Module, tokens: jax.Array, config: LoraConfig, dtype) -> jax.Array | None:
    """The embedding adapter's (alpha / r) A[tokens] B [B, L, D], or None without one."""
    lora = adapter(module, "embed_VxD")
    if lora is None:
        return None
    a, b = (p[...].astype(dtype) for p in lora)
    return config.scale * jnp.einsum("blr,rd->bld", a[tokens], b)


def dropout_key(config, step: jax.Array) -> jax.Array | None:
    """The dropout key of a train step (None without LoRA dropout): from the seed and the
    step, so a resumed run draws the same masks. `config` is a DecoderConfig."""
    c = config.lora
    if not c.rank or not c.dropout:
        return None
    return jax.random.fold_in(jax.random.key(c.seed), step)


def parameter_counts(model: nnx.Module) -> tuple[int, int]:
    """(base weights, trained parameters), the same without LoRA: a quantized weight
    counts its weights."""
    base = sum(x.size for x in jax.tree.leaves(nnx.state(model, BASE)))
    base += sum(m.size for _, m in nnx.iter_modules(model) if isinstance(m, QuantizedWeight))
    trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, trainable(model.config))))
    return base, trained


def low_rank_product(a: jax.Array, b: jax.Array, weight_ndim: int) -> jax.Array:
    """A B [lead..., in..., out...] in float32, for A [lead..., in..., r] and B [lead...,
    r, out...] (lead: a stacked model's layers axis, or nothing)."""
    lead = a.ndim + b.ndim - 2 - weight_ndim
    in_shape, out_shape, r = a.shape[lead:-1], b.shape[lead + 1:], a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], math.prod(in_shape), r).astype(jnp.float32)
    b2 = b.reshape(*b.shape[:lead], r, math.prod(out_shape)).astype(jnp.float32)
    product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return product.reshape(*a.shape[:lead], *in_shape, *out_shape)


def merged_weights(model: nnx.Module) -> dict:
    """The weights of the plain decoder `model` stands for, as a pure dict: adapted
    weights merged, W + (alpha / r) A B, and quantized ones dequantized, in float32;
    the others as stored."""
    merged = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, QuantizedWeight):
            continue  # its parent's entry
        for name, value in vars(module).items():
            if isinstance(value, QuantizedWeight):
                weight = value.dequantize(jnp.float32)
            elif isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam):
                weight = value[...]
            else:
                continue
            lora = adapter(module, name)
            if lora is not None:
                delta = low_rank_product(lora[0][...], lora[1][...], weight.ndim)
                weight = weight.astype(jnp.float32) + model.config.lora.scale * delta
            node = merged
            for key in path:
                node = node.setdefault(key, {})
            node[name] = weight
    return merged
