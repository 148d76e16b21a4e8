"""The Python API the CLI, notebooks and tests share."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from jit_tune import mesh as mesh_lib
from jit_tune.config import ConfigError, apply_override, config_from_dict, load_config, validate
from jit_tune.data.tokenizer import get_tokenizer
from jit_tune.eval import evaluator
from jit_tune.train.checkpoint import Checkpointer
from jit_tune.train.loop import train
from jit_tune.train.state import create_model_and_optimizer

__all__ = ["load_config", "train", "load_workdir", "evaluate_workdir"]


def load_workdir(workdir: Path, overrides: list[str] = ()):
    """(config, tokenizer, model) from a workdir's config.json and latest checkpoint."""
    config_path = Path(workdir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file; is {workdir} a jit-tune workdir?")
    config = config_from_dict(json.loads(config_path.read_text()), str(config_path))
    config.unlock()
    for item in overrides:
        apply_override(config, item)
    config.lock()
    validate(config, str(config_path))
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", config.train.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"{workdir}/checkpoints: no checkpoint to load")
    d = config.data
    tokenizer = get_tokenizer(d.tokenizer, workdir, d.tokenizer_vocab_size, d.builtin_seed)
    mesh = mesh_lib.make_mesh(config)
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=True)
    checkpointer.restore(step, model, optimizer)
    checkpointer.close()
    return config, tokenizer, model, step, mesh


def evaluate_workdir(workdir: Path, overrides: list[str] = ()) -> dict:
    config, tokenizer, model, step, mesh = load_workdir(workdir, overrides)
    with jax.set_mesh(mesh):
        results = evaluator.evaluate(model, tokenizer, config)
    evaluator.print_table(results, step)
    evaluator.save_results(results, step, workdir)
    return results
