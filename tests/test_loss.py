"""The chunked training loss: the same losses, gradients and per-task sums as full
logits, for any chunk size (dividing the row length or not), packed rows, a loss mask,
microbatches and a sharded mesh; and it keeps less memory than full logits. The fused
loss on its own: gradients of any subset of the projection's factors, a scaled
cotangent, and an error when asked for what it does not differentiate. Evaluation's
per-token losses: chunked the same way, equal to full logits', and as lean."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jit_tune import mesh as mesh_lib
from jit_tune.models.decoder import Decoder, DecoderConfig, Unembedding, vocab_logits
from jit_tune.train.loss import fused_loss
from jit_tune.train.state import create_model_and_optimizer
from jit_tune.train.step import summed_loss_and_grads, token_losses

TASKS = 3
SMALL = DecoderConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64)


def one_device():
    """The train step's sharding constraints need a mesh: here a single device."""
    return jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), mesh_lib.AXES))


def small_model(config: DecoderConfig) -> Decoder:
    with nnx.use_eager_sharding(False):  # no mesh: unsharded parameters
        return Decoder(config, nnx.Rngs(0))


def packed_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of 2-3 packed examples and some padding: segment ids, positions restarting
    per example, a task per example and a loss mask on part of each example."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((rows, length), np.int32) for k in
             ("inputs", "targets", "loss_mask", "segment_ids", "positions", "task_ids")}
    for r in range(rows):
        start = 0
        for segment in range(1, rng.integers(2, 4) + 1):
            size = int(rng.integers(3, length // 2))
            end = min(start + size, length - 2)  # the row ends in padding
            if end <= start:
                break
            batch["segment_ids"][r, start:end] = segment
            batch["positions"][r, start:end] = np.arange(end - start)
            batch["task_ids"][r, start:end] = rng.integers(1, TASKS + 1)
            batch["loss_mask"][r, start + (end - start) // 2:end] = 1  # the "response" half
            start = end
    real = batch["segment_ids"] > 0
    batch["inputs"] = np.where(real, rng.integers(1, vocab, (rows, length)), 0).astype(np.int32)
    batch["targets"] = np.where(real, rng.integers(1, vocab, (rows, length)), 0).astype(np.int32)
    return batch


def full_logits_losses(model: Decoder, batch: dict) -> jax.Array:
    """The per-token cross-entropy [B, L] from the model's whole float32 logits."""
    logits, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


@nnx.jit
def _full_logits_loss(model: Decoder, batch: dict):
    mask = batch["loss_mask"].astype(jnp.float32)

    def loss(m):
        per_token = full_logits_losses(m, batch) * mask
        return per_token.sum(), per_token

    (loss_sum, per_token), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return loss_sum, grads, per_token


def reference(model: Decoder, batch: dict) -> tuple[float, nnx.State, np.ndarray, np.ndarray]:
    """Loss sum and gradient from full logits, and per-task loss sums and trained tokens."""
    loss_sum, grads, per_token = _full_logits_loss(model, batch)
    per_token, tasks, mask = np.asarray(per_token), np.asarray(batch["task_ids"]), np.asarray(batch["loss_mask"])
    task_sums = np.array([per_token[tasks == t].sum() for t in range(1, TASKS + 1)])
    task_tokens = np.array([mask[tasks == t].sum() for t in range(1, TASKS + 1)])
    return float(loss_sum), grads, task_sums, task_tokens


def assert_matches(got, want, rtol=1e-5):
    sums, grads = got
    loss_sum, want_grads, task_sums, task_tokens = want
    np.testing.assert_allclose(float(sums["loss_sum"]), loss_sum, rtol=rtol)
    np.testing.assert_allclose(sums["task_loss_sums"], task_sums, rtol=rtol)
    np.testing.assert_array_equal(sums["task_tokens"], task_tokens)
    flat, want_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(want_grads)
    assert [p for p, _ in flat] == [p for p, _ in want_flat]
    for (path, g), (_, w) in zip(flat, want_flat):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6 * float(jnp.abs(w).max()),
                                   err_msg=jax.tree_util.keystr(path))


loss_and_grads = nnx.jit(summed_loss_and_grads, static_argnames=("microbatches", "loss_chunk", "num_tasks"))


@pytest.mark.parametrize("final_softcap, tie", [(0.0, False), (5.0, True)])
def test_chunked_loss_and_gradients_equal_full_logits(final_softcap, tie):
    import dataclasses

    model = small_model(dataclasses.replace(SMALL, final_softcap=final_softcap, tie_embeddings=tie))
    batch = packed_batch(rows=4, length=24, vocab=SMALL.vocab_size)
    want = reference(model, batch)
    with one_device():
        # 5 and 7 do not divide 24; 100 is longer than a row. (Each pair is a compilation.)
        for chunk, microbatches in ((0, 1), (1, 2), (5, 1), (7, 2), (8, 2), (100, 1)):
            assert_matches(loss_and_grads(model, batch, microbatches, chunk, TASKS), want)


def test_chunked_loss_on_a_sharded_mesh(smoke_config):
    smoke_config.mesh.shape.update({"data": 2, "fsdp": 2, "tensor": 2})
    smoke_config.model.update(n_heads=8, n_kv_heads=8, head_dim=8)  # 8 heads split over 2-way tensor
    mesh = mesh_lib.make_mesh(smoke_config, jax.devices())
    model, _ = create_model_and_optimizer(smoke_config, mesh)
    local = packed_batch(rows=8, length=40, vocab=smoke_config.model.vocab_size, seed=1)
    with mesh_lib.use_mesh(smoke_config, mesh):
        batch = mesh_lib.global_batch(local, mesh)
        want = reference(model, batch)
        for chunk in (0, 16, 13):
            assert_matches(loss_and_grads(model, batch, 2, chunk, TASKS), want, rtol=2e-5)


def test_chunks_keep_a_fraction_of_the_memory_of_full_logits():
    """Full float32 logits of 8 x 256 tokens over 8,192 words are 64 MiB, and the
    backward pass keeps them (and the softmax); 32-token chunks need 8 MiB at a time. On a
    CPU, a chunk longer than the rows (the default 1,024) still takes 512 rows at a time:
    64 positions of each row here, 16 MiB."""
    temp = temp_bytes(lambda model, batch, chunk: loss_and_grads.lower(model, batch, 1, chunk, 0),
                      vocab=8192, rows=8, chunks=(0, 32, 1024))
    assert temp[32] < temp[0] / 3 and temp[32] < temp[1024] < temp[0] / 2, temp


def temp_bytes(lower, vocab: int, rows: int, chunks: tuple[int, ...]) -> dict[int, int]:
    """Compiled temporaries of `lower(model, batch, chunk)` for each chunk: a one-layer
    model over `vocab` words, `rows` packed rows of 256 tokens."""
    model = small_model(DecoderConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                                      mlp_dim=64))
    batch = packed_batch(rows=rows, length=256, vocab=vocab)
    with one_device():
        return {chunk: lower(model, batch, chunk).compile().memory_analysis().temp_size_in_bytes for chunk in chunks}


@pytest.mark.parametrize("final_softcap", [0.0, 5.0])
def test_evaluation_losses_in_chunks_equal_full_logits(final_softcap):
    import dataclasses

    model = small_model(dataclasses.replace(SMALL, final_softcap=final_softcap))
    batch = packed_batch(rows=4, length=24, vocab=SMALL.vocab_size)
    want = np.asarray(nnx.jit(full_logits_losses)(model, batch))
    losses = nnx.jit(token_losses, static_argnames="chunk")
    with one_device():
        for chunk in (0, 5, 8, 100):
            np.testing.assert_allclose(losses(model, batch, chunk), want, rtol=1e-5, atol=1e-6, err_msg=f"{chunk=}")


def test_evaluation_losses_in_chunks_keep_a_fraction_of_the_memory_of_full_logits():
    """Scoring 4 rows of 256 tokens over 65,536 words: full float32 logits are 256 MiB
    (evaluation's batches once held them whole, and ran out of memory at long rows)."""
    from jit_tune.eval.scoring import segment_logliks

    temp = temp_bytes(segment_logliks.lower, vocab=65536, rows=4, chunks=(0, 16))
    assert temp[0] > 256 * 2**20 > 8 * temp[16], temp


def _fused_inputs(seed=0, b=3, length=37, d=16, v=50, r=4):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)  # noqa: E731
    unembed = Unembedding(normal(d, v), normal(d, r), normal(r, v))
    return (normal(b, length, d) / 0.3, unembed, jnp.asarray(rng.integers(0, v, (b, length))),
            jnp.asarray(rng.integers(0, 2, (b, length)), jnp.float32))


def _autodiff_loss(x, unembed, targets, weights, softcap):
    logits = vocab_logits(x, unembed, softcap)
    return (weights * (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])).sum()


@pytest.mark.parametrize("softcap, chunk", [(0.0, 0), (0.0, 8), (5.0, 5), (5.0, 100)])
def test_fused_loss_gradients_of_the_factors_it_is_asked_for(softcap, chunk):
    """LoRA trains A and B with W frozen (no gradient of W is formed then); full
    fine-tuning trains W and the hidden states' path. Each against plain autodiff."""
    x, unembed, targets, weights = _fused_inputs()
    for argnums, wrap in (((0, 1), lambda u: u), ((1,), lambda u: u._replace(w_DxV=unembed.w_DxV))):
        def want(x, u):
            return _autodiff_loss(x, wrap(u), targets, weights, softcap)

        def got(x, u):
            return fused_loss(x, wrap(u), targets, weights, softcap, chunk)[0]
        (want_value, want_grads), (got_value, got_grads) = (
            jax.value_and_grad(f, argnums=argnums)(x, unembed) for f in (want, got))
        np.testing.assert_allclose(got_value, want_value, rtol=1e-6)
        for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))
    losses = fused_loss(x, unembed, targets, weights, softcap, chunk)[1]
    logits = vocab_logits(x, unembed, softcap)
    np.testing.assert_allclose(losses, jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, targets[..., None], -1)[..., 0], rtol=1e-5)


def test_fused_loss_scales_its_gradient_by_the_cotangent():
    """The gradient is formed in the forward pass for a cotangent of 1; the backward
    pass must still scale it (a loss divided by its token count, or summed twice)."""
    x, unembed, targets, weights = _fused_inputs(seed=1)
    grads = jax.grad(lambda x, u: -2.5 * fused_loss(x, u, targets, weights, 0.0, 8)[0], argnums=(0, 1))(x, unembed)
    want = jax.grad(lambda x, u: -2.5 * _autodiff_loss(x, u, targets, weights, 0.0), argnums=(0, 1))(x, unembed)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_fused_loss_refuses_a_gradient_of_its_weights():
    """The loss mask is data: a gradient of it would silently be zero, so it is an error."""
    x, unembed, targets, weights = _fused_inputs()
    with pytest.raises(ValueError, match="weights and targets are data"):
        jax.grad(lambda w: fused_loss(x, unembed, targets, w, 0.0, 8)[0])(weights)
