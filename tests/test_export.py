"""A jit-tune run in and out of the Hugging Face format, through the CLI."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jit_tune import api  # noqa: E402
from jit_tune.cli import main  # noqa: E402


def test_export_of_a_run_loads_in_transformers_with_its_chat_template(tmp_path, capsys):
    workdir, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir)]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name

    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "Sort these words: owl cake"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>Sort these words: owl cake<|assistant|>"
    _, _, model, _, _ = api.load_workdir(workdir)
    ids = np.asarray([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(api.logits(model, ids)) - expected).max() < 1e-4

    capsys.readouterr()
    assert main(["generate", "--hf", str(out), "--prompt", "Sort these words: owl cake", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("> Sort these words: owl cake\n")

    hf_model, hf_tokenizer = api.load_hf(out)
    free = api.generate_text(hf_model, hf_tokenizer, ["Sort these words: owl cake"], max_new_tokens=12)[0]
    assert len(free) >= 4  # an untrained smoke model rambles for all 12 tokens
    assert free == api.generate_text(model, tokenizer, ["Sort these words: owl cake"], max_new_tokens=12)[0]
    cut = api.generate_text(hf_model, hf_tokenizer, ["Sort these words: owl cake"], max_new_tokens=12, stop=[free[2:4]])
    assert cut == [free[: free.index(free[2:4])]]


def test_training_starts_from_a_hf_checkpoint(tmp_path):
    from jit_tune.config import load_config
    from jit_tune.data.tokenizer import train_builtin_tokenizer
    from jit_tune.train.loop import setup

    hf_dir = tmp_path / "hf"
    tokenizer = train_builtin_tokenizer(512, seed=0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)

    config = load_config("configs/tiny.py:smoke", [f"--config.model.init_from={hf_dir}", "--config.train.steps=3"])
    assert config.model.d_model == 64 and config.model.tie_embeddings and config.data.tokenizer == str(hf_dir)
    run = setup(config, tmp_path / "run")
    tokenizer, model = run.tokenizer, run.model
    ids = np.asarray([tokenizer("Sort these words: owl cake")["input_ids"]])
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(api.logits(model, ids)) - expected).max() < 1e-4
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["model"]["init_from"] == str(hf_dir) and saved["model"]["d_model"] == 64


def _hf_dir(directory, tie=True):
    """A small random Llama with the built-in tokenizer, saved as transformers saves it."""
    from jit_tune.data.tokenizer import train_builtin_tokenizer

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    train_builtin_tokenizer(512, seed=0).save_pretrained(directory)
    return model


def test_an_export_keeps_its_base_s_generation_defaults_and_end_of_turn_ids(tmp_path):
    from jit_tune.cli import main

    _hf_dir(tmp_path / "base")
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], do_sample=True, temperature=0.6,
                                  top_p=0.9).save_pretrained(tmp_path / "base")
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=3",
                 f"--config.model.init_from={tmp_path / 'base'}"]) == 0
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.6, 0.9)
    assert generation.eos_token_id == [2, 7] + [i for i in [tokenizer.eos_token_id] if i not in (2, 7)]
    assert (generation.bos_token_id, generation.pad_token_id) == (tokenizer.bos_token_id, tokenizer.pad_token_id)


@pytest.mark.parametrize("remove, missing", [
    (("config.json", "model.safetensors", "tokenizer.json"), "config.json and weights and a tokenizer"),
    (("model.safetensors",), "weights"),
    (("tokenizer.json",), "a tokenizer"),
])
def test_init_from_a_directory_missing_parts_says_which(tmp_path, remove, missing):
    from jit_tune.config import ConfigError, load_config

    _hf_dir(tmp_path)
    for name in remove:
        (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match=f"command line --config.model.init_from=.*: the directory lacks {missing};"):
        load_config("configs/tiny.py", [f"--config.model.init_from={tmp_path}"])


def test_init_from_keeps_the_model_tokenizer_and_refuses_a_trained_bpe(tmp_path):
    from jit_tune.config import ConfigError, load_config

    _hf_dir(tmp_path)
    with pytest.raises(ConfigError, match="config.data.tokenizer = 'bpe' with config.model.init_from"):
        load_config("configs/tiny.py", [f"--config.model.init_from={tmp_path}", "--config.data.tokenizer=bpe"])
    assert load_config("configs/tiny.py", [f"--config.model.init_from={tmp_path}"]).data.tokenizer == str(tmp_path)


def test_init_from_a_workdir_says_to_export_it_first(tmp_path):
    from jit_tune.config import ConfigError, load_config

    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir),
                 "--config.train.steps=2", "--config.optimizer.warmup_steps=0"]) == 0
    with pytest.raises(ConfigError, match=f"is a jit-tune workdir; export it first .*--out {workdir}/hf"):
        load_config("configs/tiny.py", [f"--config.model.init_from={workdir}"])


def test_hf_weights_train_in_scanned_layers(tmp_path):
    """configs/llama3_8b.py scans its layers and promises init_from: both at once work."""
    from jit_tune.config import load_config
    from jit_tune.train.loop import setup

    reference = _hf_dir(tmp_path / "hf", tie=False)
    config = load_config("configs/tiny.py:smoke", [f"--config.model.init_from={tmp_path / 'hf'}",
                                                    "--config.model.scan_layers=True", "--config.train.steps=3"])
    run = setup(config, tmp_path / "run")
    tokenizer, model = run.tokenizer, run.model
    ids = np.asarray([tokenizer("Sort these words: owl cake")["input_ids"]])
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(api.logits(model, ids)) - expected).max() < 1e-4
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(tmp_path / "run"),
                 f"--config.model.init_from={tmp_path / 'hf'}", "--config.model.scan_layers=True",
                 "--config.train.steps=3"]) == 0
