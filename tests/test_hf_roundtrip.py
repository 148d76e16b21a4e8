"""Import then export, for every family: transformers reloads the export as the same
class, with the same config and the same logits as the checkpoint we started from."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_parity import FAMILIES, RULES, _hf_logits, _hf_model, _mesh, _tokens  # noqa: E402

from jit_tune.models import hf  # noqa: E402
from jit_tune.models.decoder import DecoderConfig  # noqa: E402
from jit_tune.models.loading import export_hf_decoder, load_hf_decoder  # noqa: E402

# Context lengths other than each class's default (FAMILIES uses 4096), so a dropped
# max_position_embeddings shows; Mistral's null and set windows are FAMILIES entries.
OVERRIDES = {"qwen2.5": dict(max_position_embeddings=8192)}
# Config fields an export may change: they change neither the forward pass nor serving.
IGNORED = {
    "transformers_version",  # the transformers that wrote the file (the export writes none)
    "_name_or_path",  # the directory it was loaded from
}


def _export(family, tmp_path, **export_options):
    """The original transformers model and its config, and the export's directory."""
    reference = _hf_model(family, tmp_path / "in", **OVERRIDES.get(family, {}))
    original = transformers.AutoConfig.from_pretrained(tmp_path / "in")
    ours = load_hf_decoder(tmp_path / "in", _mesh(), RULES)
    # What `jit-tune export` passes: the tokenizer's ids, here the original config's.
    special = {k: getattr(original, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    export_hf_decoder(ours, tmp_path / "out", original.model_type,
                      {k: v for k, v in special.items() if v is not None}, **export_options)
    return reference, original, tmp_path / "out"


def _config_differences(original, reloaded, ignored=IGNORED):
    expected, got = original.to_dict(), reloaded.to_dict()
    return {k: (v, got.get(k, "<absent>")) for k, v in expected.items()
            if k not in ignored and got.get(k, "<absent>") != v}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_reloads_as_the_same_transformers_model(family, tmp_path):
    reference, original, out = _export(family, tmp_path)
    reloaded_config = transformers.AutoConfig.from_pretrained(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(reference)
    assert reloaded_config.architectures == original.architectures == [type(reference).__name__]
    assert _config_differences(original, reloaded_config) == {}
    tokens = _tokens()
    np.testing.assert_array_less(np.abs(_hf_logits(reloaded, tokens) - _hf_logits(reference, tokens)).max(), 1e-4)


def test_bfloat16_export_stores_bf16_tensors_and_reloads_close_to_float32(tmp_path):
    reference, original, out = _export("qwen2.5", tmp_path, dtype="bfloat16")
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    for file in files:
        with open(out / file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert {info["dtype"] for name, info in header.items() if name != "__metadata__"} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded_config = transformers.AutoConfig.from_pretrained(out)
    assert _config_differences(original, reloaded_config, IGNORED | {"dtype"}) == {}  # dtype: the point

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = reloaded.state_dict()
    for name, weight in reference.state_dict().items():  # each weight rounded once, to nearest
        torch.testing.assert_close(theirs[name], weight.to(torch.bfloat16).float(), rtol=0, atol=0)
    tokens = _tokens()
    expected = _hf_logits(reference, tokens)
    assert np.abs(_hf_logits(reloaded, tokens) - expected).max() < 0.02 * np.abs(expected).max()


@pytest.mark.parametrize("family, fields, lost", [
    ("mistral", dict(sliding_window=4, layer_types=("sliding", "full")), "layer_types"),  # Mistral: all or none
    ("llama", dict(sliding_window=4, layer_types=("sliding", "sliding")), "layer_types"),  # Llama: no window
    ("qwen2", dict(qkv_bias=False), "qkv_bias = False would reload as True"),
    ("llama", dict(final_softcap=30.0), "final_softcap"),
])
def test_export_refuses_a_model_its_family_cannot_express(family, fields, lost):
    config = DecoderConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           mlp_dim=128, **fields)
    with pytest.raises(hf.HFConfigError, match=f"cannot express this model: .*{lost}"):
        hf.hf_config_from_decoder(config, family, {})


def test_gemma3_sliding_layers_without_a_local_base_export_the_full_layers_rope():
    """rope_local_theta 0: the sliding layers rotate as the full ones do. transformers reads
    a Gemma 3 config without a sliding_attention rope as a local base of 10,000, so the
    export writes it out; a scaled rope it cannot give sliding layers is refused."""
    fields = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=128,
                  sliding_window=4, layer_types=("sliding", "full"), rope_theta=1e6, embed_scale=True,
                  mlp_activation="gelu_tanh", norm_offset=1.0, post_norms=True, qk_norm=True)
    written = hf.hf_config_from_decoder(DecoderConfig(**fields), "gemma3_text", {})
    read = transformers.Gemma3TextConfig(**written).rope_parameters
    assert read["sliding_attention"]["rope_theta"] == read["full_attention"]["rope_theta"] == 1e6
    with pytest.raises(hf.HFConfigError, match="sliding_attention"):
        hf.hf_config_from_decoder(DecoderConfig(**fields, rope_scaling="linear", rope_factor=2.0), "gemma3_text", {})
