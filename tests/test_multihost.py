"""The real training loop as several JAX processes on 127.0.0.1 (CPU, 2 devices each):
the same losses as one process, and a run saved by 2 processes resumes on 1."""

import pytest

from multihost import spawn

STEPS = 4
# Two data streams in every run, so the batches do not depend on the process count.
OVERRIDES = ["--config.data.streams=2", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
             "--config.train.checkpoint_every=2", "--config.eval.examples_per_task=1"]


def _losses(report, steps=STEPS):
    return [report["losses"][str(step)] for step in range(1, steps + 1)]


def test_two_processes_train_like_one_and_their_run_resumes_on_one(tmp_path):
    single = spawn("train_worker.py", 1, str(tmp_path / "single"), str(STEPS), *OVERRIDES, devices_per_process=4)
    # Two processes train (and save) the first half ...
    moved = tmp_path / "moved"
    double = spawn("train_worker.py", 2, str(moved), "2", *OVERRIDES)
    assert double[0]["devices"] == single[0]["devices"] == 4
    assert _losses(double[0], 2) == pytest.approx(_losses(single[0])[:2], rel=1e-5)
    # Process 0 alone wrote the shared files, whole (nothing temporary left behind).
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl",
                                                       "tensorboard", "tokenizer"]
    # ... and one process, on another mesh shape, the second.
    resumed = spawn("train_worker.py", 1, str(moved), str(STEPS), *OVERRIDES, "--config.mesh.shape.data=1",
                    "--config.mesh.shape.fsdp=2", "--config.mesh.shape.tensor=2", devices_per_process=4)
    assert _losses(resumed[0]) == pytest.approx(_losses(single[0]), rel=1e-5)


@pytest.mark.slow  # one more process group: two processes for the whole run
def test_two_processes_train_the_whole_run_like_one(tmp_path):
    single = spawn("train_worker.py", 1, str(tmp_path / "single"), str(STEPS), *OVERRIDES, devices_per_process=4)
    double = spawn("train_worker.py", 2, str(tmp_path / "double"), str(STEPS), *OVERRIDES)
    assert _losses(double[0]) == pytest.approx(_losses(single[0]), rel=1e-5)
    workdir = tmp_path / "double"
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "eval", "metrics.jsonl",
                                                         "tensorboard", "tokenizer"]
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["predictions", "results.json",
                                                                 f"results_step{STEPS}.json"]
