"""A workdir is never lost and always reloads: a rejected command leaves it as it was,
every verb works from its saved config whatever the run trained on, a resume says what
it changed, and logs hold each step once."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jit_tune.cli import main

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "configs/tiny.py:smoke"]


def _train(workdir: Path, *args: str) -> int:
    return main(["train", *SMOKE, "--workdir", str(workdir), *args])


def test_a_rejected_train_leaves_the_workdir_as_it_was(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "--config.train.steps=4") == 0
    saved = (workdir / "config.json").read_bytes()
    tokenizer = (workdir / "tokenizer/tokenizer.json").read_bytes()
    capsys.readouterr()

    rejected = {  # each fails after the config loaded, where the old loop had already saved it
        "--config.model.d_model=96": "config.model.d_model: 64 -> 96",
        "--config.data.tokenizer_vocab_size=300": "config.data.tokenizer_vocab_size: 512 -> 300",
        f"--config.model.init_from={tmp_path / 'missing'}": "config.model.init_from",
    }
    for override, message in rejected.items():
        assert _train(workdir, "--config.train.steps=4", override) == 2, override
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert (workdir / "config.json").read_bytes() == saved, override
        assert (workdir / "tokenizer/tokenizer.json").read_bytes() == tokenizer
    assert main(["eval", "--workdir", str(workdir)]) == 0


def test_a_first_run_that_is_rejected_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"  # chatml adds two marker tokens: 302 tokens for a 300-token model
    assert _train(workdir, "--config.model.vocab_size=300", "--config.data.tokenizer_vocab_size=300",
                  "--config.data.chat_template=chatml") == 2
    assert "expected at least the tokenizer's 302 tokens" in capsys.readouterr().err
    assert not (workdir / "config.json").exists() and not (workdir / "tokenizer").exists()


def test_a_run_on_file_tasks_and_some_built_in_ones_reloads_for_every_verb(tmp_path, capsys):
    data = tmp_path / "say.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n"
                            for w in ("owl", "cake", "moon", "kite") * 10))
    # Train on a file task mixed with one built-in task, from a config file naming it.
    config = tmp_path / "mine.py"
    config.write_text(
        "from ml_collections import ConfigDict\n"
        "from jit_tune.config import default_config, smoke\n\n\n"
        "def get_config():\n"
        "    c = smoke(default_config(), steps=3)\n"
        f"    c.data.tasks.say = dict(path={str(data)!r})\n"
        "    c.data.validation_share = 0.2\n"
        "    c.data.batch_size = 8\n"
        "    c.data.mixture = ConfigDict({'say': 1.0, 'sort': 1.0})\n"
        "    return c\n")
    mine = tmp_path / "mine"
    assert main(["train", "--config", str(config), "--workdir", str(mine)]) == 0
    capsys.readouterr()

    assert main(["eval", "--workdir", str(mine)]) == 0
    results = json.loads((mine / "eval/results.json").read_text())["results"]["tasks"]
    assert set(results) == {"say", "sort"}  # what it trained on, not all twelve built-in tasks
    data.rename(tmp_path / "moved.jsonl")  # export and generate need no training data
    assert main(["export", "--workdir", str(mine), "--out", str(tmp_path / "hf")]) == 0
    assert main(["generate", "--workdir", str(mine), "--prompt", "Say owl.", "--max-new-tokens", "2"]) == 0
    assert main(["eval", "--workdir", str(mine)]) == 2  # eval does: a clear error naming the file
    assert "say.jsonl" in capsys.readouterr().err


def test_resume_lists_what_it_changes_and_keeps_the_saved_overrides_without_config(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "--config.train.steps=4", "--config.data.mixture.sort=0.0") == 0
    capsys.readouterr()

    # Without --config: the saved config, the override included, with new overrides on top.
    assert main(["train", "--workdir", str(workdir), "--config.train.steps=6"]) == 0
    err = capsys.readouterr().err
    assert "config.train.steps: 4 -> 6" in err and "mixture" not in err.split("Resuming")[1].split("Reading")[0]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all("mixture/sort" not in record for record in logged)

    # The config file without the override: the mixture changes back, and says so.
    assert _train(workdir, "--config.train.steps=8") == 0
    err = capsys.readouterr().err
    assert "with these config changes (applied)" in err and "config.data.mixture.sort: 0.0 -> 1.5" in err
    assert "config.train.steps: 6 -> 8" in err


def _tensorboard_steps(directory: Path) -> dict[str, list[int]]:
    """Each tag's steps as TensorBoard shows them: it reads the event files in order, and
    a SessionLog START at step s (what SummaryWriter(purge_step=s) writes) discards the
    events of earlier files from step s on."""
    from tensorboardX.proto import event_pb2

    steps: dict[str, list[int]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps = {tag: [s for s in seen if s < event.step] for tag, seen in steps.items()}
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_a_resume_from_step_0_purges_the_killed_runs_tensorboard_events(tmp_path):
    """A run killed before its first checkpoint was finalized resumes from step 0: the
    events it logged must go, like its metrics.jsonl lines (CI once saw them twice)."""
    from jit_tune.train.trackers import TensorBoardTracker

    for start_step, steps in ((0, range(1, 9)), (0, range(1, 4)), (2, range(3, 6))):
        tracker = TensorBoardTracker(tmp_path, start_step, {"step": 2, "loss": 2.0} if start_step else None)
        for step in steps:
            tracker.log(step, {"loss": float(step)})
        tracker.close()  # restarts within a second: each writer has a file of its own, in order
    assert _tensorboard_steps(tmp_path / "tensorboard") == {"loss": [1, 2, 3, 4, 5]}


@pytest.mark.slow  # a line in the log
def test_a_workdir_whose_checkpoints_are_gone_says_so_when_it_starts_again(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _train(workdir, "--config.train.steps=3") == 0
    for step in (workdir / "checkpoints").iterdir():
        step.rename(tmp_path / step.name)  # moved elsewhere by hand
    capsys.readouterr()
    assert _train(workdir, "--config.train.steps=3") == 0
    assert (f"Starting {workdir} at step 0: its run logged up to step 3 but left no checkpoint in "
            f"{workdir}/checkpoints") in capsys.readouterr().err


def test_after_a_kill_and_a_resume_logs_hold_each_step_once(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "jit_tune.cli", "train", *SMOKE, "--workdir", str(workdir), "--config.train.steps=1000",
         "--config.train.log_every=1", "--config.train.checkpoint_every=4"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # after step 7 was logged: steps 5-7 are past the checkpoint at 4
    process.communicate()

    assert _train(workdir, "--config.train.steps=12", "--config.train.log_every=1",
                  "--config.train.checkpoint_every=4") == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))  # the eval results joined step 12's line
    for tag, logged in _tensorboard_steps(workdir / "tensorboard").items():
        assert len(logged) == len(set(logged)), (tag, logged)
    assert _tensorboard_steps(workdir / "tensorboard")["loss"] == list(range(1, 13))


def test_atomic_directory_leaves_the_old_one_when_filling_fails(tmp_path):
    from jit_tune.files import atomic_directory, atomic_write_bytes, atomic_write_text

    target = tmp_path / "out"
    with atomic_directory(target) as directory:
        (directory / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as directory:
            (directory / "a.txt").write_text("second, half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    atomic_write_text(tmp_path / "f.json", "{}")
    with pytest.raises(TypeError):  # fails half-way, after the temporary file was opened
        atomic_write_bytes(tmp_path / "f.json", "not bytes")
    assert (tmp_path / "f.json").read_text() == "{}"


def test_an_export_killed_at_any_moment_leaves_a_whole_export_or_none(tmp_path):
    transformers = pytest.importorskip("transformers")
    workdir, out = tmp_path / "run", tmp_path / "hf"
    assert _train(workdir, "--config.train.steps=3") == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jit_tune.cli", "export", "--workdir", str(workdir), "--out", str(out)]
    began = time.monotonic()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    duration = time.monotonic() - began
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    for fraction in (0.6, 0.8, 0.9, 0.97):  # late in an export, when it writes files
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        process.kill()
        process.wait()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the earlier export, whole
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no half-written leftovers


def test_export_replaces_only_its_own_earlier_exports(tmp_path, capsys):
    """A Hugging Face model dir (a run's own init_from, say) looks like an export but holds
    no export marker: export refuses it, and a file as --out, and leaves both as they were."""
    model = tmp_path / "base"
    model.mkdir()
    files = {"config.json": b"{}", "model.safetensors.index.json": b"{}", "README.md": b"mine"}
    for name, data in files.items():
        (model / name).write_bytes(data)
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(model)]) == 2
    error = capsys.readouterr().err
    assert f"--out {model}: exists and is not an earlier jit_tune export" in error and "Traceback" not in error
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    assert main(["export", "--workdir", str(tmp_path / "run"), "--out", str(afile)]) == 2
    assert f"--out {afile}: is a file; give a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine\n"
