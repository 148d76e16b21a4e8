"""Weight decay by what a parameter is, not by its rank: never norm scales or biases
(also when scanned layers stack them into matrices), embeddings as configured."""

import jax
import pytest
from flax import nnx

from jit_tune import mesh as mesh_lib
from jit_tune.models.decoder import Decoder
from jit_tune.train.optimizer import decay_mask
from jit_tune.train.state import decoder_config


def _decayed(smoke_config) -> dict[str, bool]:
    mesh = mesh_lib.make_mesh(smoke_config)
    with mesh_lib.use_mesh(smoke_config, mesh):
        model = nnx.eval_shape(lambda: Decoder(decoder_config(smoke_config), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = decay_mask(params, smoke_config.optimizer.decay_embeddings)
    return {jax.tree_util.keystr(path): decayed for path, decayed in jax.tree_util.tree_leaves_with_path(mask)}


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_norms_and_biases_are_never_decayed(smoke_config, scan, decay_embeddings):
    smoke_config.model.scan_layers = scan
    smoke_config.model.qkv_bias = True  # Qwen2's q/k/v biases
    smoke_config.model.qk_norm = True
    smoke_config.optimizer.decay_embeddings = decay_embeddings
    decayed = _decayed(smoke_config)
    for name, decays in decayed.items():
        if "norm" in name or "bias" in name:
            assert not decays, name
        elif "embed" in name:
            assert decays == decay_embeddings, name
        else:
            assert decays, name  # the projection matrices
    assert any("bias" in name for name in decayed) and any("'scale'" in name for name in decayed)
    if scan:  # stacked norm scales are [layers, d]: matrices by rank, norms by name
        assert "['blocks']['attn_norm']['scale']" in decayed


def test_the_optimizer_applies_the_mask(smoke_config):
    """A step with zero gradients moves only decayed parameters (AdamW's decay term)."""
    import jax.numpy as jnp
    import numpy as np

    from jit_tune.train.optimizer import make_optimizer

    smoke_config.optimizer.warmup_steps = 0
    smoke_config.optimizer.grad_clip = 0.0
    tx = make_optimizer(smoke_config)
    params = {"final_norm": {"scale": jnp.ones((4, 4))}, "mlp": {"up_DxF": jnp.ones((4, 4))},
              "attn": {"q_bias_NxH": jnp.ones((4, 4))}}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert not np.any(updates["final_norm"]["scale"]) and not np.any(updates["attn"]["q_bias_NxH"])
    assert np.all(np.asarray(updates["mlp"]["up_DxF"]) < 0)
