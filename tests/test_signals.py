"""SIGTERM, SIGUSR1 and Ctrl-C (SIGINT) in every phase of a real `jit-tune` process (the table in
jit_tune/train/preemption.py): each signal is sent when the process logs that it has
entered the phase."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jit_tune.cli import main
from jit_tune.train.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "configs/tiny.py:smoke"]


def _run_and_signal(args: list[str], when: str, signum: int, timeout: float = 300) -> tuple[int, str]:
    """Run `jit-tune ARGS`; send `signum` as soon as a stderr line starts with `when`.
    Returns the exit code and stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen([sys.executable, "-m", "jit_tune.cli", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, sent = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if line.startswith(when) and not sent.is_set():
                process.send_signal(signum)
                sent.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
        reader.join()
    assert sent.is_set(), f"never saw {when!r}:\n{''.join(lines)[-3000:]}"
    return process.returncode, "".join(lines)


def _checkpoints(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_sigterm_during_start_up_stops_at_once_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"  # a BPE on 12 x 20,000 examples takes seconds to train
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.data.tokenizer=bpe",
                                 "--config.data.tokenizer_corpus_examples=20000"], "Building the tokenizer",
                                signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err
    assert "stopped by SIGTERM during start-up" in err and "Traceback" not in err
    assert not (workdir / "config.json").exists() and _checkpoints(workdir) == []


@pytest.mark.slow  # a 20,000-example BPE corpus makes start-up long enough to signal
def test_sigusr1_during_start_up_saves_at_the_first_step_boundary(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.data.tokenizer=bpe",
                                 "--config.data.tokenizer_corpus_examples=20000", "--config.train.keep_checkpoints=5"],
                                "Building the tokenizer", signal.SIGUSR1)
    assert code == 0, err
    assert "step 0: saved a checkpoint on demand (SIGUSR1)" in err
    assert _checkpoints(workdir) == [0, 3, 6]  # the on-demand one, then the interval ones


def test_sigterm_during_a_restore_stops_and_the_checkpoint_stays_good(tmp_path):
    workdir = tmp_path / "run"
    assert main(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=4"]) == 0
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=8"],
                                "Restoring step 4", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err
    assert "stopped by SIGTERM during start-up" in err and "Traceback" not in err
    assert _checkpoints(workdir) == [3, 4]
    assert main(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=8"]) == 0
    assert _checkpoints(workdir)[-1] == 8


def test_sigterm_while_the_first_step_compiles_saves_that_step(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=50"],
                                "Compiling the train step", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err
    assert "preempted (SIGTERM): saved a checkpoint at step 1" in err and "Traceback" not in err
    assert _checkpoints(workdir) == [1]


def test_ctrl_c_in_training_saves_at_the_next_step_and_exits_130_and_a_rerun_resumes(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=50"],
                                "Compiling the train step", signal.SIGINT)
    assert code == EXIT_INTERRUPTED, err
    assert "interrupted (Ctrl-C): saved a checkpoint at step 1" in err and "Traceback" not in err
    assert _checkpoints(workdir) == [1]
    assert main(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=4"]) == 0
    assert _checkpoints(workdir)[-1] == 4


@pytest.mark.slow  # as SIGTERM's start-up test
def test_ctrl_c_during_start_up_stops_at_once_without_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir), "--config.data.tokenizer=bpe",
                                 "--config.data.tokenizer_corpus_examples=20000"], "Building the tokenizer",
                                signal.SIGINT)
    assert code == EXIT_INTERRUPTED, err
    assert "jit-tune: interrupted (Ctrl-C) during start-up" in err and "Traceback" not in err
    assert not (workdir / "config.json").exists() and _checkpoints(workdir) == []


def test_sigterm_during_the_final_eval_stops_and_a_rerun_evaluates(tmp_path, capsys):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir)], "Evaluating at step 6", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, err
    assert "stopped by SIGTERM during the final evaluation; the final checkpoint is saved" in err
    assert _checkpoints(workdir)[-1] == 6 and not (workdir / "eval/results.json").exists()
    assert main(["train", *SMOKE, "--workdir", str(workdir)]) == 0
    assert json.loads((workdir / "eval/results.json").read_text())["step"] == 6


@pytest.mark.slow
def test_sigusr1_during_the_final_eval_is_noted_and_the_eval_finishes(tmp_path):
    workdir = tmp_path / "run"
    code, err = _run_and_signal(["train", *SMOKE, "--workdir", str(workdir)], "Evaluating at step 6", signal.SIGUSR1)
    assert code == 0, err
    assert "SIGUSR1 (final eval): nothing to save" in err and (workdir / "eval/results.json").is_file()


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, EXIT_PREEMPTED, "stopped by SIGTERM"),
                                                (signal.SIGINT, EXIT_INTERRUPTED, "interrupted (Ctrl-C)")])
def test_sigterm_or_ctrl_c_to_another_command_stops_it_without_a_traceback(tmp_path, signum, code, said):
    workdir = tmp_path / "run"
    assert main(["train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=3"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen([sys.executable, "-m", "jit_tune.cli", "eval", "--workdir", str(workdir)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=1.5)  # importing JAX alone takes longer: the handlers are set before it
    except subprocess.TimeoutExpired:
        pass
    process.send_signal(signum)  # a Ctrl-C must neither be swallowed nor crash JAX's shutdown (exit -11)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == code, err
    assert f"jit-tune: {said} before it finished" in err and "Traceback" not in err
