"""Training behaviour: mesh-independent losses, exact resume, the CLI end to end."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from jit_tune.data.registry import build_registry
from jit_tune import mesh as mesh_lib
from jit_tune.config import ConfigError, load_config
from jit_tune.data.pipeline import train_dataset
from jit_tune.train.loop import setup, train
from jit_tune.train.state import create_model_and_optimizer
from jit_tune.train.step import train_step


def _losses(config, tokenizer, devices, steps=3):
    mesh = mesh_lib.make_mesh(config, devices)
    mesh_lib.check_batch_divides(config.data.batch_size, mesh, config.train.microbatches)
    model, optimizer = create_model_and_optimizer(config, mesh)
    batches = iter(train_dataset(config, tokenizer, build_registry(config)))
    losses = []
    with mesh_lib.use_mesh(config, mesh):
        for _ in range(steps):
            metrics = train_step(model, optimizer, mesh_lib.global_batch(next(batches), mesh),
                                 config.train.microbatches)
            losses.append(float(metrics["loss"]))
    return losses


# The 2 x 2 x 2 mesh shards along every axis at once; each axis alone is left to `-m slow`.
@pytest.mark.parametrize("shape", [pytest.param({"data": 8, "fsdp": 1, "tensor": 1}, marks=pytest.mark.slow),
                                   pytest.param({"data": 1, "fsdp": 8, "tensor": 1}, marks=pytest.mark.slow),
                                   pytest.param({"data": 1, "fsdp": 1, "tensor": 8}, marks=pytest.mark.slow),
                                   {"data": 2, "fsdp": 2, "tensor": 2}])
def test_loss_on_8_devices_equals_1_device(tokenizer, smoke_config, shape):
    assert len(jax.devices()) == 8
    # 8 heads of each kind, so that 8-way tensor parallelism splits them evenly.
    smoke_config.model.update(n_heads=8, n_kv_heads=8, head_dim=24)
    single = _losses(smoke_config, tokenizer, jax.devices()[:1])
    smoke_config.mesh.shape.update(shape)
    sharded = _losses(smoke_config, tokenizer, jax.devices())
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0]


def test_scanned_layers_train_alike_on_1_and_8_devices_with_remat(tokenizer, smoke_config):
    smoke_config.model.update(scan_layers=True, remat="full")
    single = _losses(smoke_config, tokenizer, jax.devices()[:1])
    smoke_config.mesh.shape.update({"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(_losses(smoke_config, tokenizer, jax.devices()), single, rtol=1e-5)
    assert single[-1] < single[0]


def test_scan_layers_needs_identical_layers():
    with pytest.raises(ConfigError, match="model.scan_layers = True: expected false when model.layer_types mixes"):
        load_config("configs/tiny.py", ["--config.model.scan_layers=True", "--config.model.n_layers=2",
                                        "--config.model.layer_types=('full','sliding')",
                                        "--config.model.sliding_window=8"])


@pytest.mark.parametrize("devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_gradient_accumulation_equals_one_big_batch(tokenizer, smoke_config, devices):
    smoke_config.data.batch_size = 16
    whole = _losses(smoke_config, tokenizer, jax.devices()[:devices])
    smoke_config.train.microbatches = 2
    accumulated = _losses(smoke_config, tokenizer, jax.devices()[:devices])
    np.testing.assert_allclose(accumulated, whole, rtol=1e-5)
    smoke_config.train.microbatches = 4
    if devices == 8:  # 2 rows per device do not split into 4 microbatches
        with pytest.raises(ConfigError, match=r"multiple of the data x fsdp mesh size \(8\) times train.microbatches"):
            _losses(smoke_config, tokenizer, jax.devices())


def _step_losses(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, smoke_config, workers):
    smoke_config.data.workers = workers  # 1: rows come from a Grain worker process
    smoke_config.train.log_every = 1
    smoke_config.train.checkpoint_every = 100
    smoke_config.eval.examples_per_task = 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(smoke_config, straight)
    assert train(smoke_config, resumed, stop_at_step=3) is None
    assert sorted(_step_losses(resumed)) == [1, 2, 3]

    # The restored data iterator yields exactly the batch the uninterrupted run saw next.
    run = setup(smoke_config, resumed)
    tokenizer, data_iterator, checkpointer, step = run.tokenizer, run.data_iterator, run.checkpointer, run.step
    run = checkpointer.saved_run(3)
    checkpointer.close()
    assert step == 3
    assert run["config"] == json.loads(json.dumps(smoke_config.to_dict(), default=list))
    assert run["process_count"] == 1 and run["device_count"] == 8
    fresh = iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config)))
    for _ in range(3):
        next(fresh)
    expected, got = next(fresh), next(data_iterator)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])

    train(smoke_config, resumed)
    assert _step_losses(resumed) == _step_losses(straight)  # bit for bit on CPU


def test_cli_train_twice_resumes_and_writes_the_workdir(tmp_path, capsys):
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir)]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "Evaluation at step 6" in first.out and "held-out" in first.out and "did not fit a row" not in first.out
    # Where the start-up goes: the packer's open rows fill before the first batch leaves.
    assert re.search(r"Packing the first batch: 256 open rows of 128 tokens fill first .*\n"
                     r"First batch after \d+\.\d s\nCompiling the train step", first.err)
    for name in ("config.json", "metrics.jsonl", "eval/results.json", "tokenizer/tokenizer.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").iterdir())
    results = json.loads((workdir / "eval/results.json").read_text())["results"]
    assert {"held_in", "held_out"} <= set(results["tasks"]["reverse"])
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    shares = {k: v for k, v in logged[0].items() if k.startswith("mixture/")}
    assert len(shares) == 12 and sum(shares.values()) == pytest.approx(1.0)  # the realized mixture
    assert 0.9 < logged[0]["data/packing_efficiency"] <= 1 and logged[0]["data/examples_per_row"] > 3
    assert logged[0]["data/truncated"] == 0 == logged[0]["data/dropped_too_long"]

    assert main(args) == 0  # the same command again: resumes at the end, evaluates again
    assert f"Resuming {workdir} at step 6" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "eval/results.json").read_text())["results"] == results


def test_diverged_run_stops_with_a_message_and_keeps_the_good_checkpoint(tmp_path, capsys):
    from jit_tune.cli import main
    from jit_tune.train.checkpoint import Checkpointer

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir)]
    assert main(args + ["--config.train.steps=3"]) == 0
    # Resume with an absurd learning rate: the loss leaves the finite range.
    code = main(args + ["--config.train.steps=6", "--config.optimizer.lr=1e38"])
    assert code == 3
    err = capsys.readouterr().err.lower()
    assert "loss is nan" in err or "loss is inf" in err
    checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
    assert checkpointer.latest_step() == 3
    checkpointer.close()


def test_resume_with_an_incompatible_config_is_a_clear_error_and_eval_or_export_read_the_parameters_alone(
        tmp_path, capsys):
    """The optimizer's state changes shape with grad_clip: a resume needs it and stops;
    eval and export read only the parameters (the moments, twice their size, are never
    held), so they load the same parameters either way."""
    from jit_tune.api import load_workdir
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=3"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--config.optimizer.grad_clip=0.0"]) == 2
    err = capsys.readouterr().err
    assert "do not fit this config" in err and "Traceback" not in err
    params = [nnx.state(load_workdir(workdir, overrides)[2], nnx.Param) for overrides in
              ([], ["--config.optimizer.grad_clip=0.0"])]
    assert all(np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, params), strict=True))
    assert main(["eval", "--workdir", str(workdir), "--config.model.mlp_dim=40"]) == 2  # the parameters' shapes
    err = capsys.readouterr().err
    assert "do not fit this config" in err and "cannot be read" not in err and "Traceback" not in err
    assert "parameter blocks/0/mlp/down_FxD: (128, 64) in the checkpoint, (40, 64) for this config" in err
    config = workdir / "config.json"  # JSON, but not a config jit_tune wrote
    for wrong, said in (("[]", r"expected a JSON object ({...}), found list"),
                        ("{}", "expected the fields 'model', 'data', 'train', which jit_tune writes there"),
                        ('{"model": 3, "data": {}, "train": {}}', "config.model: expected a section")):
        config.write_text(wrong)
        assert main(["eval", "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert f"{config}: {said}" in err and "left as it is" in err and config.read_text() == wrong, err


def test_a_damaged_latest_checkpoint_is_named_with_the_way_back(tmp_path, capsys):
    """A checkpoint folder left empty, or one with a truncated file: resume, eval and
    export say which one cannot be read and how to fall back, and delete nothing."""
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=4",
            "--config.train.checkpoint_every=2"]
    assert main(["train", *args]) == 0
    checkpoints = workdir / "checkpoints"
    (checkpoints / "6").mkdir()
    capsys.readouterr()
    assert main(["train", *args[:-2], "--config.train.steps=8"]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoints}/6: the checkpoint cannot be read" in err and "steps 2, 4; move" in err
    assert "Traceback" not in err
    (checkpoints / "6").rmdir()
    # Every data file truncated: which file holds the parameters (all eval and export read)
    # and which only the optimizer's moments varies from save to save.
    for data in (p for p in (checkpoints / "4/state").rglob("*") if p.is_file() and "/d/" in str(p)):
        data.write_bytes(data.read_bytes()[:100])
    for verb in (["eval", "--workdir", str(workdir)], ["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert f"{checkpoints}/4: the checkpoint cannot be read" in err and "--step 2" in err, err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]
    assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf"), "--step", "2"]) == 0


def test_changing_rates_on_resume_continues_with_the_new_mixture(tmp_path, capsys):
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir)]
    assert main(args + ["--config.train.steps=3", "--config.train.log_every=1"]) == 0
    with open(workdir / "metrics.jsonl", "a") as metrics:  # JSON that is not a step's record, and half a line
        metrics.write('[1, 2]\n{"step": 9, "lo')
    assert main(args + ["--config.data.mixture.reverse=50.0", "--config.train.log_every=1"]) == 0
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    reverse = {m["step"]: m["mixture/reverse"] for m in logged if "mixture/reverse" in m}
    assert max(reverse[s] for s in (1, 2, 3)) < 0.3  # 1 of 12 equal-ish rates before
    assert min(reverse[s] for s in (4, 5, 6)) > 0.5  # 50 / (50 + 15) after
    capsys.readouterr()
    assert main(args + ["--config.train.steps=4", "--config.optimizer.warmup_steps=1"]) == 0  # fewer than taken
    assert "The run is at step 6, past train.steps = 4: nothing to train" in capsys.readouterr().err
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == 6


def test_data_streams_must_fit_the_processes_and_the_checkpoint(tmp_path, smoke_config, tokenizer):
    smoke_config.data.streams, smoke_config.data.batch_size = 3, 24
    with pytest.raises(ConfigError, match="streams = 3: expected a multiple of the 2 processes"):
        train_dataset(smoke_config, tokenizer, build_registry(smoke_config), process_index=0, process_count=2)
    smoke_config.data.batch_size = 8
    with pytest.raises(ConfigError, match="batch_size = 8: expected a multiple of the 3 data streams"):
        train_dataset(smoke_config, tokenizer, build_registry(smoke_config))
    smoke_config.data.streams = 2
    workdir = tmp_path / "run"
    train(smoke_config, workdir, stop_at_step=1)
    smoke_config.data.streams = 4
    with pytest.raises(ConfigError, match="has 2 data streams: set it to 2, or 0 to follow the checkpoint"):
        train(smoke_config, workdir)


@pytest.mark.slow
def test_remat_policies_keep_the_losses(tokenizer, smoke_config):
    """(Their memory savings are measured on a TPU compile: tests/test_aot.py.)"""
    losses = {}
    for policy in ("none", "dots", "full"):
        smoke_config.model.remat = policy
        losses[policy] = _losses(smoke_config, tokenizer, jax.devices()[:1], steps=2)
    np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-6)
    np.testing.assert_allclose(losses["dots"], losses["none"], rtol=1e-6)


def test_train_step_donates_the_params_and_optimizer_state(tokenizer, smoke_config):
    mesh = mesh_lib.make_mesh(smoke_config, jax.devices()[:1])
    model, optimizer = create_model_and_optimizer(smoke_config, mesh)
    old_param = model.embed_VxD[...]
    old_moment = jax.tree.leaves(nnx.state(optimizer.opt_state))[-1]
    batch = mesh_lib.global_batch(next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config)))), mesh)
    with mesh_lib.use_mesh(smoke_config, mesh):
        jax.block_until_ready(train_step(model, optimizer, batch))
    assert old_param.is_deleted() and old_moment.is_deleted()  # updated in place, not copied
    assert not model.embed_VxD[...].is_deleted()
