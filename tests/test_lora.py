"""LoRA and QLoRA: adapters beside a frozen base, sharded like it, trained alone, resumed
exactly, and exported as PEFT adapters and merged models that peft and transformers load
with jit_tune's logits. Bases are random transformers models saved with save_pretrained."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jit_tune import api  # noqa: E402
from jit_tune import mesh as mesh_lib  # noqa: E402
from jit_tune.cli import main  # noqa: E402
from jit_tune.config import ConfigError, load_config  # noqa: E402
from jit_tune.models.lora import BASE  # noqa: E402
from jit_tune.models.quantize import QuantizedWeight  # noqa: E402
from jit_tune.train.loop import train  # noqa: E402
from jit_tune.train.state import create_model_and_optimizer  # noqa: E402
from jit_tune.train.step import train_step  # noqa: E402

SMOKE = "configs/tiny.py:smoke"
ALL_TARGETS = "q|k|v|o|gate|up|down|embed|unembed"


def _hf_dir(directory, family="llama", head_dim=16, seed=0):
    """A small random model with the built-in tokenizer, saved as transformers saves it;
    weights large enough that a layout slip shows in the logits."""
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    common = dict(vocab_size=576, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  num_hidden_layers=2, intermediate_size=128)
    config = (transformers.LlamaConfig(**common, tie_word_embeddings=False) if family == "llama"
              else transformers.Qwen2Config(**common, tie_word_embeddings=True))  # Qwen2: tied, q/k/v biases
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    train_builtin_tokenizer(512, seed=0).save_pretrained(directory)
    return model


def _lora_config(hf_dir, *overrides):
    return load_config(SMOKE, [f"--config.model.init_from={hf_dir}", "--config.lora.rank=4", *overrides])


def _batch(rows=8, length=16, seed=0):
    tokens = np.random.default_rng(seed).integers(3, 512, (rows, length + 1)).astype(np.int32)  # < any vocab here
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
            "segment_ids": np.ones((rows, length), np.int32), "loss_mask": np.ones((rows, length), np.int32)}


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_step_0_is_the_base_and_training_moves_only_the_adapters(tmp_path):
    from jit_tune.models.loading import load_hf_decoder

    _hf_dir(tmp_path / "hf")
    config = _lora_config(tmp_path / "hf", f"--config.lora.targets={ALL_TARGETS}")
    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh)
    plain = load_hf_decoder(tmp_path / "hf", mesh, mesh_lib.logical_rules(config))
    ids = _batch()["inputs"]
    # B = 0 (embeddings: A = 0): the base's logits. Not bit for bit: the two programs differ
    # (the adapter's + 0 terms), so XLA may order a sum differently (ulps); a non-zero
    # adapter at step 0 moves the logits by orders of magnitude more.
    with mesh_lib.use_mesh(config, mesh):
        np.testing.assert_allclose(np.asarray(nnx.jit(api.logits)(model, ids)),
                                   np.asarray(nnx.jit(api.logits)(plain, ids)), rtol=1e-5, atol=1e-5)

    base_before = _numpy(nnx.to_pure_dict(nnx.state(model, BASE)))
    adapters = nnx.state(model, nnx.LoRAParam)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    with mesh_lib.use_mesh(config, mesh):
        for _ in range(3):
            metrics = train_step(model, optimizer, mesh_lib.global_batch(_batch(), mesh))
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, _numpy(nnx.to_pure_dict(nnx.state(model, BASE))), base_before)
    assert all(float(jnp.abs(b[...]).max()) > 0 for b in (model.blocks[0].attn.q_lora_b, model.blocks[1].mlp.down_lora_b,
                                                           model.unembed_lora_b, model.embed_lora_a))
    # Adam's two moments of each adapter, and nothing of the base (scalars: step, count).
    moments = sorted(x.shape for x in jax.tree.leaves(nnx.state(optimizer)) if np.ndim(x) > 0)
    assert moments == sorted(adapter_shapes * 2)
    # Weight decay: on adapters as on the weights they adapt; embeddings' as configured.
    from jit_tune.train.optimizer import decay_mask

    mask = decay_mask(nnx.to_pure_dict(adapters), decay_embeddings=False)
    assert mask["blocks"][0]["attn"]["q_lora_a"] and not mask["embed_lora_b"]


@pytest.mark.parametrize("scan_layers, quantization", [(False, "none"), (True, "nf4")])
def test_adapters_and_quantized_weights_shard_like_their_base_weight(tmp_path, scan_layers, quantization):
    _hf_dir(tmp_path / "hf", head_dim=64)
    config = _lora_config(tmp_path / "hf", f"--config.lora.targets={ALL_TARGETS}", "--config.mesh.shape.data=2",
                          "--config.mesh.shape.fsdp=2", "--config.mesh.shape.tensor=2",
                          f"--config.model.scan_layers={scan_layers}", f"--config.lora.base_quantization={quantization}")
    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=True)
    plain_config = load_config(SMOKE, [f"--config.model.init_from={tmp_path / 'hf'}", "--config.mesh.shape.data=2",
                                       "--config.mesh.shape.fsdp=2", "--config.mesh.shape.tensor=2",
                                       f"--config.model.scan_layers={scan_layers}"])
    plain, _ = create_model_and_optimizer(plain_config, mesh, abstract=True)

    def spec(x):
        return tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))

    checked = set()
    for path, module in nnx.iter_modules(model):
        lead = 1 if scan_layers and path[:1] == ("blocks",) else 0  # the stacked layers axis
        plain_module = plain
        for key in path:
            plain_module = plain_module[key] if isinstance(key, int) else getattr(plain_module, key)
        for name, value in vars(module).items():
            if not isinstance(value, nnx.LoRAParam) or not name.endswith("_lora_a"):
                continue
            stem = name.removesuffix("_lora_a")
            [weight_name] = [n for n in vars(plain_module) if n.startswith(stem + "_") and "lora" not in n]
            weight_spec = spec(getattr(plain_module, weight_name))
            a, b = spec(value), spec(getattr(module, f"{stem}_lora_b"))
            n_in = len(a) - 1 - lead
            assert a == weight_spec[:lead + n_in] + (None,), (path, name)
            assert b == weight_spec[:lead] + (None,) + weight_spec[lead + n_in:], (path, name)
            stored = getattr(module, weight_name)
            if isinstance(stored, QuantizedWeight):  # codes: the weight's sharding
                assert spec(stored.codes) == weight_spec
            checked.add(stem)
    assert checked == {"q", "k", "v", "o", "gate", "up", "down", "embed", "unembed"}
    assert spec(model.blocks.attn.q_lora_a if scan_layers else model.blocks[0].attn.q_lora_a) == \
        (None,) * scan_layers + ("fsdp", None)  # embed -> fsdp; lora_rank never sharded
    adapters = {(x.shape, spec(x)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))}
    assert {(x.shape, spec(x)) for x in jax.tree.leaves(nnx.state(optimizer)) if np.ndim(x) > 0} == adapters


def _checkpoint(workdir, step):
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return _numpy(restored.state)


def test_resume_is_exact_and_checks_the_base(tmp_path):
    _hf_dir(tmp_path / "hf")
    config = _lora_config(tmp_path / "hf", "--config.lora.dropout=0.1")  # dropout masks resume too
    assert train(config, tmp_path / "straight", stop_at_step=4) is None
    assert train(config, tmp_path / "resumed", stop_at_step=2) is None
    assert train(config, tmp_path / "resumed", stop_at_step=4) is None
    straight, resumed = _checkpoint(tmp_path / "straight", 4), _checkpoint(tmp_path / "resumed", 4)
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)
    # The checkpoint holds the adapters, not the base.
    layer = straight["model"]["blocks"]["0"]
    assert "embed_VxD" not in straight["model"] and set(layer["attn"]) == {f"{s}_lora_{ab}" for s in "qkvo"
                                                                           for ab in "ab"}

    _hf_dir(tmp_path / "hf", seed=1)  # another base where the first was
    with pytest.raises(ConfigError, match="not the base the LoRA adapters .* were trained on"):
        train(config, tmp_path / "resumed", stop_at_step=5)


# Qwen2 (tied embeddings, q/k/v biases) with scanned layers: stacked adapters export per layer.
@pytest.mark.parametrize("family, targets, scan", [("llama", ALL_TARGETS, False),
                                                   pytest.param("qwen2", "q|k|v|o|gate|up|down", True,
                                                                marks=pytest.mark.slow)])
def test_peft_adapter_and_merged_export_match_jit_tune(tmp_path, capsys, family, targets, scan):
    base = _hf_dir(tmp_path / "hf", family)
    config = _lora_config(tmp_path / "hf", f"--config.lora.targets={targets}", "--config.lora.alpha=8.0",
                          f"--config.model.scan_layers={scan}")
    train(config, tmp_path / "run", stop_at_step=3)  # B != 0
    capsys.readouterr()
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")]) == 0
    assert "--merged" in capsys.readouterr().out  # the note on how to get a whole model
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merged"]) == 0

    adapter_config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    expected_modules = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    if family == "llama":
        expected_modules = sorted(expected_modules + ["embed_tokens", "lm_head"])
    assert {k: adapter_config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                           "fan_in_fan_out", "target_modules", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "target_modules": expected_modules, "base_model_name_or_path": str(tmp_path / "hf")}
    # The tensors PEFT itself writes for such an adapter: same names, same shapes.
    from safetensors.numpy import load_file

    ours = load_file(tmp_path / "adapter/adapter_model.safetensors")
    reference = peft.get_peft_model(_hf_dir(tmp_path / "ref", family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=expected_modules, task_type="CAUSAL_LM"))
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()
              if "lora_" in k}  # without the base embedding layers PEFT adds for resized vocabularies
    assert {k: v.shape for k, v in ours.items()} == theirs

    _, _, model, _, _ = api.load_workdir(tmp_path / "run")
    ids = _batch(rows=1, length=12, seed=3)["inputs"]
    expected = np.asarray(api.logits(model, ids))
    assert np.abs(expected - _torch_logits(base, ids)).max() > 1e-3  # the adapters matter
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert np.abs(_torch_logits(adapted, ids) - expected).max() < 1e-4
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(_torch_logits(merged, ids) - expected).max() < 1e-4
    if family == "llama":  # generate and eval reload the workdir with its base
        assert main(["generate", "--workdir", str(tmp_path / "run"), "--prompt", "Sort: b a", "--max-new-tokens", "3"]) == 0
        assert main(["eval", "--workdir", str(tmp_path / "run"), "--config.eval.tasks=('sort',)",
                     "--config.eval.examples_per_task=2"]) == 0


# Relative L2 error of the logits against the float32 base: 4 bits cost ~9% per weight
# (int8: 0.6%), which two random layers amplify about threefold.
@pytest.mark.parametrize("kind, tolerance", [pytest.param("int8", 0.03, marks=pytest.mark.slow), ("nf4", 0.35)])
def test_qlora_is_close_to_the_base_trains_and_exports_dequantized(tmp_path, kind, tolerance):
    from jit_tune.models.loading import export_hf_decoder, load_hf_decoder

    base = _hf_dir(tmp_path / "hf", head_dim=64)  # nf4 blocks of 64 along every projection's input
    config = _lora_config(tmp_path / "hf", f"--config.lora.base_quantization={kind}", "--config.optimizer.lr=0.02")
    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh)
    assert isinstance(model.blocks[0].attn.q_DxNxH, QuantizedWeight)
    plain = load_hf_decoder(tmp_path / "hf", mesh, mesh_lib.logical_rules(config))
    ids = _batch()["inputs"]
    with mesh_lib.use_mesh(config, mesh):
        ours, full = nnx.jit(api.logits)(model, ids), nnx.jit(api.logits)(plain, ids)
        error = float(jnp.linalg.norm(ours - full) / jnp.linalg.norm(full))
        assert error < tolerance, error
        batch = mesh_lib.global_batch(_batch(), mesh)
        losses = [float(train_step(model, optimizer, batch)["loss"]) for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses

    # The merged export: the dequantized base plus the adapters, what jit_tune computes.
    export_hf_decoder(model, tmp_path / "merged", "llama")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    one = ids[:1]
    with mesh_lib.use_mesh(config, mesh):
        expected = np.asarray(nnx.jit(api.logits)(model, np.repeat(one, 8, axis=0)))[:1]
    assert np.abs(_torch_logits(merged, one) - expected).max() < 1e-4
    assert np.abs(_torch_logits(base, one) - expected).max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["--config.lora.rank=-1"], "config.lora.rank = -1: expected an integer >= 0"),
    (["--config.lora.alpha=0.0"], "config.lora.alpha = 0.0: expected a number > 0"),
    (["--config.lora.dropout=1.0"], r"config.lora.dropout = 1.0: expected a rate in \[0, 1\)"),
    (["--config.lora.targets=q|("], re.escape("config.lora.targets = 'q|(': expected a regular expression")),
    (["--config.lora.targets=q_proj|v_proj"], "expected a regular expression fully matching some of q, k, v, o"),
    (["--config.lora.rank=4", "--config.lora.targets=q|embed", "--config.model.tie_embeddings=True"],
     "expected no embed or unembed with model.tie_embeddings"),
    (["--config.lora.rank=4", "--config.lora.base_quantization=int4"],
     "config.lora.base_quantization = 'int4': expected one of none, int8, nf4"),
    (["--config.lora.base_quantization=int8"], "expected 'none' with lora.rank = 0"),
    (["--config.lora.rank=4", "--config.lora.base_quantization=nf4"], r"model \{'head_dim': 32\} are not multiples of 64"),
    (["--config.lora.rank=4", "--config.mesh.rules=(('batch', 'data'),)"], "add \\('lora_rank', None\\)"),
])
def test_bad_lora_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.py", overrides, need_weights=False)


def test_lora_needs_a_base_except_to_plan_memory():
    with pytest.raises(ConfigError, match="config.lora.rank = 4: expected 0 without config.model.init_from: LoRA "
                                          "adapts pretrained weights"):
        load_config("configs/tiny.py", ["--config.lora.rank=4"])
    assert load_config("configs/tiny.py", ["--config.lora.rank=4"], need_weights=False).lora.rank == 4
    # The 8B plans are valid configs (compiling them takes minutes: not a test).
    qlora = load_config("configs/llama3_8b.py:qlora", need_weights=False)
    assert (qlora.lora.rank, qlora.lora.base_quantization, qlora.model.param_dtype) == (16, "nf4", "bfloat16")
    assert load_config("configs/llama3_8b.py:lora", need_weights=False).lora.base_quantization == "none"


def test_compile_reports_adapter_and_optimizer_memory_against_full_fine_tuning(capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed (pip install 'jit_tune[tpu]')")
    from jit_tune.aot import compile_train_step
    from jit_tune.topology import parse

    # head_dim 64: nf4 quantizes blocks of 64 along each projection's input.
    shape = ["--config.model.head_dim=64", "--config.model.n_heads=3", "--config.model.n_kv_heads=3",
             "--config.model.n_layers=2", "--config.data.seq_len=64", "--config.data.batch_size=8"]
    full = compile_train_step(load_config("configs/tiny.py", shape), parse("v5e:2x2"))
    qlora = compile_train_step(load_config("configs/tiny.py", shape + [
        "--config.lora.rank=8", "--config.lora.base_quantization=nf4"], need_weights=False), parse("v5e:2x2"))
    assert qlora.parameters == full.parameters  # the base, counted in weights
    assert 0 < qlora.trained_parameters < 0.1 * full.parameters == 0.1 * full.trained_parameters
    assert qlora.optimizer_bytes < 0.1 * full.optimizer_bytes  # moments of the adapters only
    assert qlora.param_bytes - qlora.adapter_bytes < 0.35 * full.param_bytes  # 4-bit codes (+ float32 embeddings)
    assert "LoRA rank 8 on q|k|v|o|gate|up|down, base nf4" in qlora.table()
    assert "trained parameters (LoRA adapters)" in qlora.table()
