"""The Python API the CLI, notebooks and tests share.

    from jit_tune import api
    model, tokenizer = api.load_hf("path/to/hf_dir")            # or api.load_workdir("runs/x")
    logits = api.logits(model, input_ids, positions, segment_ids)
    print(api.generate_text(model, tokenizer, ["Sort these words: owl cake"]))
    api.export_workdir("runs/x", "out/hf_dir")                   # transformers loads out/hf_dir
    api.export_workdir("runs/lora", "out/adapter")               # a LoRA run: a PEFT adapter dir
    api.export_workdir("runs/lora", "out/merged", merged=True)   # or the base with the adapters merged
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from transformers import AutoTokenizer, GenerationConfig

from jit_tune import mesh as mesh_lib
from jit_tune.config import SAVED_CONFIG_KEYS, ConfigError, apply_override, config_from_dict, default_config, load_config, validate
from jit_tune.files import atomic_directory, mark_output, read_json, replaceable_output, written_by_main
from jit_tune.data.render import prompt_ids
from jit_tune.data.registry import build_registry
from jit_tune.data.tokenizer import saved_tokenizer
from jit_tune.eval import evaluator, report
from jit_tune.eval.decode import generate
from jit_tune.models.adapters import save_peft_adapter
from jit_tune.models.decoder import Decoder
from jit_tune.models.loading import export_hf_decoder, init_from_directory, load_hf_decoder
from jit_tune.train.checkpoint import Checkpointer
from jit_tune.train.loop import train
from jit_tune.train.state import restore_model_and_optimizer

__all__ = ["load_config", "train", "load_hf", "load_workdir", "logits", "generate_text", "export_workdir",
           "evaluate_workdir"]


def _default_mesh():
    return mesh_lib.make_mesh(default_config())


def load_hf(directory: str | Path, mesh=None, dtype: str = "float32", param_dtype: str = "float32"):
    """(model, tokenizer) from a Hugging Face dir, sharded by the default rules on `mesh`,
    parameters converted to `param_dtype`, computing in `dtype`."""
    mesh = mesh or _default_mesh()
    model = load_hf_decoder(directory, mesh, mesh_lib.logical_rules(default_config()), dtype=dtype,
                            param_dtype=param_dtype)
    return model, AutoTokenizer.from_pretrained(directory)


def saved_config(workdir: str | Path, overrides: Sequence[str] = (), check_files: bool = True):
    """The config a workdir's run saved (config.json), with `--config.a.b=value`
    overrides applied; with `check_files`, its data paths must still exist."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file; is {workdir} a jit-tune workdir?")
    values = read_json(config_path, keys=SAVED_CONFIG_KEYS)
    config = config_from_dict(values, str(config_path), check_files=False)
    config.unlock()
    sources = {apply_override(config, item): f"command line {item}" for item in overrides}
    config.lock()
    validate(config, str(config_path), sources, check_files=check_files)
    return config


def load_workdir(workdir: str | Path, overrides: Sequence[str] = (), step: int | None = None,
                 need_data: bool = False):
    """(config, tokenizer, model, step, mesh) from a workdir's saved config and its latest
    checkpoint (or `step`). Its training data is needed (and checked) only with
    `need_data`: a run exports and generates wherever its data went. A LoRA run's base
    is read from its model.init_from (override it if the base has moved)."""
    workdir = Path(workdir)
    config = saved_config(workdir, overrides, check_files=need_data)
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints)
    steps = checkpointer.manager.all_steps()
    if not steps:
        raise ConfigError(f"{workdir}/checkpoints: no checkpoint to load")
    if step is not None and step not in steps:
        raise ConfigError(f"--step {step}: {workdir}/checkpoints has steps {sorted(steps)}")
    step = max(steps) if step is None else step
    tokenizer = saved_tokenizer(workdir)
    if tokenizer is None:
        raise ConfigError(f"{workdir}/tokenizer: missing; the workdir's run never started training")
    try:
        mesh = mesh_lib.make_mesh(config)
    except ConfigError:  # trained on another topology (a pod): shard over the devices here
        config.mesh.shape.update(data=1, fsdp=-1, tensor=1)
        config.mesh.dcn_shape.update(data=1, fsdp=1, tensor=1)
        mesh = mesh_lib.make_mesh(config)
    model, _ = restore_model_and_optimizer(config, mesh, checkpointer, step, with_optimizer=False)
    checkpointer.close()
    return config, tokenizer, model, step, mesh


def logits(model: Decoder, input_ids, positions=None, segment_ids=None) -> jax.Array:
    """Float32 logits [B, L, V]; positions default to 0..L-1 and segments to one per row."""
    input_ids = jnp.asarray(input_ids)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(input_ids)
    return model(input_ids, jnp.asarray(positions), jnp.asarray(segment_ids))[0]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Generation's settings, named (as the CLI's flags) when out of range."""
    problems = [f"--{flag} {value}: expected {expected}" for flag, value, ok, expected in (
        ("max-new-tokens", max_new_tokens, max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", temperature, 0 <= temperature < float("inf"), "a finite number >= 0 (0: greedy)"),
        ("top-k", top_k, top_k >= 0, "an integer >= 0 (0: no top-k cut)"),
        ("top-p", top_p, 0 < top_p <= 1, "a number in (0, 1]")) if not ok]
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))


def generate_text(model: Decoder, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  stop: Sequence[str] = ()) -> list[str]:
    """Replies to user prompts, rendered with the tokenizer's chat template; each reply
    ends at EOS, at `max_new_tokens`, or before the first of the `stop` strings."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs = generate(model, ids, max_new_tokens, tokenizer.eos_token_id, pad, batch=len(ids),
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    texts = [tokenizer.decode(out, skip_special_tokens=True) for out in outs]
    for s in stop:
        texts = [t.split(s, 1)[0] for t in texts]
    return texts


def export_workdir(workdir: str | Path, out: str | Path, step: int | None = None, dtype: str = "float32",
                   overrides: Sequence[str] = (), merged: bool = False) -> Path:
    """A Hugging Face dir of the latest checkpoint (or `step`): config.json, safetensors
    shards (in `dtype`) with an index, the tokenizer with the chat template used in
    training, generation_config.json. Written to a temporary directory and renamed into
    place, so `out` is a whole export or untouched; an existing `out` must be an export.

    A LoRA run exports a PEFT adapter dir instead (adapter_config.json,
    adapter_model.safetensors, the tokenizer), for the base in its model.init_from; with
    `merged`, the whole model with the adapters merged in float32 (a quantized base
    dequantized), written in `dtype`."""
    out = Path(out)
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {dtype}: expected float32 or bfloat16")
    if refused := replaceable_output(out, "export"):
        raise ConfigError(refused)
    if out.resolve() in (Path(workdir).resolve(), *Path(workdir).resolve().parents):
        raise ConfigError(f"--out {out}: is the workdir {workdir} or holds it; give a directory inside or beside it")
    config, tokenizer, model, step, _ = load_workdir(workdir, overrides, step)
    # Written even when None: an absent id reloads as the family's default (Mistral's bos 1).
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
               "bos_token_id": tokenizer.bos_token_id}
    with written_by_main("export") as writer:
        if writer:
            with atomic_directory(out) as directory:
                if config.lora.rank and not merged:
                    # PEFT loads the base by this name: a .gguf base is its conversion (the weights trained on).
                    save_peft_adapter(model, directory, init_from_directory(config.model.init_from), dtype=dtype)
                else:
                    export_hf_decoder(model, directory, config.model.family, special, dtype=dtype)
                    generation_config(config.model.init_from, special).save_pretrained(directory)
                tokenizer.save_pretrained(directory)
                mark_output(directory, "export")
    return out


def generation_config(init_from: str, special: dict) -> GenerationConfig:
    """The base model's generation defaults when the run started from a Hugging Face dir
    that has them (its sampling settings, each of its end-of-turn ids), with the
    tokenizer's special ids: the export stops where its base stopped, and where the
    training chat template ends a turn."""
    base = Path(init_from) if init_from else None
    if base is None or not (base / "generation_config.json").is_file():
        return GenerationConfig(**special)
    generation = GenerationConfig.from_pretrained(base)
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if special["eos_token_id"] is not None and special["eos_token_id"] not in eos:
        eos.append(special["eos_token_id"])
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos or None
    for key in ("bos_token_id", "pad_token_id"):
        setattr(generation, key, special[key])
    return generation


def evaluate_workdir(workdir: Path, overrides: Sequence[str] = (), step: int | None = None) -> dict:
    """Evaluate a checkpoint of a workdir (the latest, or `step`) on its config's eval
    tasks; prints the table and writes workdir/eval (results and predictions)."""
    config, tokenizer, model, step, mesh = load_workdir(workdir, overrides, step, need_data=True)
    return _evaluate(model, tokenizer, config, mesh, step, workdir)


def evaluate_hf(directory: str | Path, config, out: str | Path | None = None) -> dict:
    """Evaluate a Hugging Face model as it is (before any tuning: the baseline of a run)
    on `config`'s eval tasks and metrics, with the model's own tokenizer and chat
    template; prints the table and, given `out`, writes the results there."""
    mesh = mesh_lib.make_mesh(config)
    model, tokenizer = load_hf(directory, mesh, dtype=config.model.dtype)
    return _evaluate(model, tokenizer, config, mesh, 0, out)


def _evaluate(model, tokenizer, config, mesh, step: int, out: Path | None) -> dict:
    registry = build_registry(config)
    with jax.set_mesh(mesh):
        results = evaluator.evaluate(model, tokenizer, config, registry)
    with written_by_main("eval results") as writer:
        if writer:
            report.print_table(results, step)
            if out is not None:
                report.save_results(results, step, Path(out), config.eval.predictions)
    return results
