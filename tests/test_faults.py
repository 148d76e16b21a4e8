"""Preemption and faults, on real training processes: SIGTERM saves and exits with the
documented code; kill -9 in the middle of a save leaves the previous checkpoint
restorable."""

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jit_tune.train.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]


def _start_training(workdir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jit_tune.cli", "train", "--config", "configs/tiny.py:smoke", "--workdir",
               str(workdir), "--config.train.steps=100000", "--config.train.log_every=1", *overrides]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def _checkpoint_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_sigusr1_saves_on_demand_and_sigterm_saves_and_exits_75(tmp_path):
    from jit_tune.train.checkpoint import Checkpointer

    workdir = tmp_path / "run"
    process = _start_training(workdir, "--config.train.checkpoint_every=1000", "--config.train.keep_checkpoints=5")
    _wait_for(lambda: len(_logged_steps(workdir)) >= 2, process)
    process.send_signal(signal.SIGUSR1)  # a checkpoint now, and training goes on
    _wait_for(lambda: len(_checkpoint_steps(workdir)) == 1, process)
    on_demand = _checkpoint_steps(workdir)[0]
    _wait_for(lambda: max(_logged_steps(workdir)) >= on_demand + 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    assert "preempted (SIGTERM): saved a checkpoint at step" in err and "Traceback" not in err
    checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
    try:
        # the checkpoint is the last step that ran, not the last interval save (there was none)
        assert checkpointer.latest_step() == max(_logged_steps(workdir)) >= on_demand + 2
        assert on_demand in checkpointer.manager.all_steps()
    finally:
        checkpointer.close()


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    from jit_tune.config import config_from_dict
    from jit_tune.train.loop import setup

    for attempt in range(5):  # a save can finish between seeing it under way and the kill: then again
        workdir = tmp_path / f"run{attempt}"
        process = _start_training(workdir, "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3")
        checkpoints = workdir / "checkpoints"

        def saving() -> bool:  # Orbax writes into a temporary directory, then renames it
            return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir()) and any(
                p.name.isdigit() for p in checkpoints.iterdir())

        _wait_for(saving, process)
        process.kill()
        process.communicate()
        if any("tmp" in p.name for p in checkpoints.iterdir()):  # killed mid-save
            break
    else:
        raise AssertionError("no kill landed during a save in 5 tries")

    config = config_from_dict(json.loads((workdir / "config.json").read_text()), "config.json")
    run = setup(config, workdir)  # restores the latest complete checkpoint
    checkpointer, step = run.checkpointer, run.step
    checkpointer.close()
    assert step >= 1 and (checkpoints / str(step)).is_dir()


def test_skip_mode_drops_non_finite_updates_and_keeps_finite_ones(smoke_config):
    import jax.numpy as jnp
    import numpy as np

    from jit_tune.train.optimizer import make_optimizer

    smoke_config.train.on_nonfinite = "skip"
    smoke_config.optimizer.warmup_steps = 0
    tx = make_optimizer(smoke_config)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.full((2, 2), jnp.nan)}, state, params)
    assert not np.any(updates["w"])  # skipped: no change at all
    updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"])


def test_skip_mode_stops_after_too_many_non_finite_steps_in_a_row(tmp_path, capsys):
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=30",
            "--config.train.log_every=1", "--config.train.on_nonfinite=skip", "--config.train.max_skipped_steps=3",
            "--config.optimizer.lr=1e38", "--config.train.checkpoint_every=100"]
    assert main(args) == 3
    out, err = capsys.readouterr()
    assert "its update was skipped" in out + err and "for 4 steps in a row (train.max_skipped_steps = 3)" in err
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in logged if "skipped_steps" in m][:3] == [1, 2, 3]


def test_keeps_the_last_n_checkpoints_and_every_kth(tmp_path):
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.steps=7",
                 "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2",
                 "--config.train.keep_every=3"]) == 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6, 7]


def test_an_update_that_diverges_after_a_finite_loss_is_never_checkpointed(tmp_path, capsys):
    """The loss of step N comes before update N: with a huge learning rate and a
    checkpoint every step, step 1's loss is finite but its update is not. The kept
    checkpoint must restore finite."""
    import jax
    import numpy as np

    from jit_tune.api import load_workdir
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir), "--config.train.checkpoint_every=1",
            "--config.optimizer.warmup_steps=0", "--config.train.keep_checkpoints=5"]
    assert main(args + ["--config.train.steps=2"]) == 0
    assert main(args + ["--config.train.steps=6", "--config.optimizer.lr=1e38"]) == 3
    err = capsys.readouterr().err
    found = re.search(r"step (\d+): the parameters or optimizer state are not finite after the update .*"
                      r"the last good checkpoint, step (\d+), is kept", err)
    assert found, err[-2000:]
    bad, kept = int(found[1]), int(found[2])
    assert kept == bad - 1 == _checkpoint_steps(workdir)[-1]  # every step up to the bad one was saved
    _, _, model, step, _ = load_workdir(workdir)
    assert step == kept and all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(nnx_params(model)))


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_a_write_the_file_system_refuses_exits_5_naming_the_file_and_the_rerun_resumes(tmp_path):
    """A full disk, as a file-size limit: the checkpoint write fails (EFBIG, as ENOSPC
    would), the run says so with the file's path, and the earlier checkpoint resumes."""
    from jit_tune.cli import main

    workdir = tmp_path / "run"
    smoke = ["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir)]
    assert main([*smoke, "--config.train.steps=3"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    # 200 kB per file (ulimit -f counts KiB): below a checkpoint's data file, above every other file.
    command = shlex.join([sys.executable, "-m", "jit_tune.cli", *smoke, "--config.train.steps=6"])
    refused = subprocess.run(["bash", "-c", f"ulimit -f 195 && exec {command}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 5, refused.stderr[-3000:]
    assert re.search(rf"jit-tune train: error: the file system refused: .*{workdir}/checkpoints/6.*File too large",
                     refused.stderr)
    assert "run the same command to resume" in refused.stderr
    # Orbax's background threads logged the same failure with four tracebacks above it.
    assert "Traceback" not in refused.stderr and "ERROR:absl" not in refused.stderr, refused.stderr[:3000]
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 6
    assert main([*smoke, "--config.train.steps=6"]) == 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


@contextlib.contextmanager
def _file_size_limit(size: int):
    """A full disk for files growing past `size` bytes, in this process (Python ignores
    SIGXFSZ: the write fails with EFBIG, as with ENOSPC)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_tensorboard_or_metrics_write_the_disk_refuses_stops_the_loop_naming_the_file(tmp_path):
    """SummaryWriter's thread died on a full disk and the next window waited forever on
    its queue; a metrics.jsonl write said only 'File too large'."""
    from jit_tune.train.trackers import JsonlTracker, TensorBoardTracker

    for tracker, named in ((TensorBoardTracker(tmp_path), tmp_path / "tensorboard"),
                           (JsonlTracker(tmp_path), tmp_path / "metrics.jsonl")):
        with _file_size_limit(4096), pytest.raises(OSError) as refused:
            for step in range(1, 1000):
                tracker.log(step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5})
        assert refused.value.errno == errno.EFBIG and refused.value.filename == str(named)


def test_an_atomic_write_the_disk_refuses_names_the_file_and_keeps_the_old_one(tmp_path):
    from jit_tune.files import atomic_write_bytes

    path = tmp_path / "results.json"
    path.write_text("old")
    with _file_size_limit(4096), pytest.raises(OSError) as refused:
        atomic_write_bytes(path, b"x" * 8192)
    assert refused.value.errno == errno.EFBIG and refused.value.filename == str(path)  # not the temporary's
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_sweep_plan_the_disk_refuses_names_the_manifest_and_leaves_no_directory(tmp_path, capsys):
    from jit_tune.cli import main

    directory = tmp_path / "sweep"
    with _file_size_limit(1024):  # the manifest is larger
        code = main(["sweep", "plan", "--sweep", "configs/sweep_tiny.py", "--dir", str(directory)])
    assert code == 5
    assert f"the file system refused: File too large: {directory}/manifest.json" in capsys.readouterr().err
    assert not directory.exists()
