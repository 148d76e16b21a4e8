"""The command line as a person and a log file meet it: help that shows the override
syntax, --version, --step, clear errors for misspelt variants, plain lines in log
files, throughput of training time only, and no accelerator probing on a CPU machine."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jit_tune.cli import main

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.parametrize("verb", [["train"], ["eval"], ["export"], ["generate"], ["compile"], ["data", "inspect"]])
def test_every_verb_help_shows_how_to_override_config_fields(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--help"])
    assert exit_.value.code == 0
    assert "--config.section.field=value" in capsys.readouterr().out.replace("\n", " ")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == "jit-tune 0.1.0"


def test_a_misspelt_variant_is_named_with_the_variants_there_are(tmp_path, capsys):
    assert main(["train", "--config", "configs/tiny.py:smok", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "configs/tiny.py has no variant 'smok'; did you mean configs/tiny.py:smoke?" in err
    assert "Its variants: smoke" in err and "Traceback" not in err
    assert main(["data", "inspect", "--config", "configs/llama3_8b.py:smoke"]) == 2
    assert "Its variants: lora, qlora" in capsys.readouterr().err


def test_a_config_file_that_raises_is_named_with_its_line(tmp_path, capsys):
    config = tmp_path / "broken.py"
    config.write_text("from jit_tune.config import default_config\n\n\ndef get_config():\n"
                      "    c = default_config()\n    c.train.steps = 10 / 0\n    return c\n")
    assert main(["data", "inspect", "--config", str(config)]) == 2
    assert f"{config}:6: ZeroDivisionError: division by zero" in capsys.readouterr().err


def test_eval_and_export_take_a_step(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    workdir = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir),
                 "--config.train.keep_checkpoints=3"]) == 0  # checkpoints at steps 3 and 6
    assert main(["eval", "--workdir", str(workdir), "--step", "3"]) == 0
    assert json.loads((workdir / "eval/results_step3.json").read_text())["step"] == 3
    for step in (3, 6):
        assert main(["export", "--workdir", str(workdir), "--out", str(tmp_path / f"hf{step}"), "--step", str(step),
                     "--dtype", "bfloat16"]) == 0
    weights = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf{step}").model.norm.weight
               for step in (3, 6)]
    assert weights[0].dtype == weights[1].dtype and not bool((weights[0] == weights[1]).all())
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir), "--step", "4"]) == 2
    assert "--step 4: " in (err := capsys.readouterr().err) and "has steps [3, 6]" in err


def test_a_log_file_gets_one_plain_line_per_logging_window(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as stderr:  # as SLURM's .out file or `2> log` gets it
        result = subprocess.run([sys.executable, "-m", "jit_tune.cli", "train", "--config", "configs/tiny.py:smoke",
                                 "--workdir", str(tmp_path / "run")], cwd=REPO, env=_env(), stderr=stderr,
                                stdout=subprocess.DEVNULL)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("loss " in line and "tokens/s " in line for line in lines)


def test_tokens_per_second_leave_out_compilation_and_evaluation():
    from jit_tune.train.metrics import Throughput

    now = [0.0]
    throughput = Throughput(clock=lambda: now[0])
    now[0] = 30.0  # the first step: compilation
    throughput.restart()
    for _ in range(4):  # four steps of 1,000 tokens, 1 s each
        now[0] += 1.0
        throughput.add(1000)
    with throughput.excluded():  # an evaluation in the window
        now[0] += 100.0
    assert throughput.take() == pytest.approx(1000.0)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)")
def test_a_command_on_a_cpu_machine_does_not_load_libtpu(tmp_path):
    env = {**_env(), "TF_CPP_MIN_LOG_LEVEL": "0"}  # JAX's C++ logs show what it loads
    env.pop("JAX_PLATFORMS")
    result = subprocess.run([sys.executable, "-m", "jit_tune.cli", "data", "inspect", "--config",
                             "configs/tiny.py:smoke", "--sample", "50"], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "libtpu" not in result.stderr, result.stderr[-3000:]


def test_a_rejected_run_leaves_no_empty_workdir_and_running_out_of_memory_says_what_uses_less(tmp_path, capsys):
    workdir = tmp_path / "run"
    # Refused after the checkpoint folder is opened: 8 rows do not split into 3 microbatches.
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir),
                 "--config.train.microbatches=3"]) == 2
    assert "microbatches" in capsys.readouterr().err and not workdir.exists()
    # A 64 x 2^34 MLP: its parameters alone ask the host for 4 TiB.
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(workdir),
                 "--config.model.mlp_dim=17179869184"]) == 4
    err = capsys.readouterr().err
    assert "jit-tune train: error: out of memory on CPU: " in err and "Out of memory allocating" in err, err[-3000:]
    assert "train.microbatches" in err and "eval.batch_size" in err and "Traceback" not in err
    mine = tmp_path / "mine"
    mine.mkdir()  # a folder the user made is theirs: kept, even empty
    assert main(["train", "--config", "configs/tiny.py:smoke", "--workdir", str(mine),
                 "--config.train.microbatches=3"]) == 2
    assert mine.is_dir() and not any(mine.iterdir())


def test_a_file_where_a_directory_goes_is_named(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for args, path, why in ((["train", "--config", "configs/tiny.py:smoke", "--workdir", str(afile)], afile, "File exists"),
                            (["train", "--config", "configs/tiny.py:smoke", "--workdir", str(afile / "run")],
                             afile / "run", "Not a directory"),
                            (["sweep", "plan", "--sweep", "configs/sweep_tiny.py", "--dir", str(afile)], afile,
                             "File exists")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: {why}: expected a directory there" in err and "Traceback" not in err, err
    assert afile.read_text() == "mine"


def test_orbax_callbacks_into_its_closed_event_loop_are_not_printed():
    """A failed checkpoint read leaves Orbax's other reads calling back into its closed
    event loop; their tracebacks would bury the error. Anything else still shows."""
    from types import SimpleNamespace

    from jit_tune.cli import _quiet_closed_event_loops

    shown = []
    hook = _quiet_closed_event_loops(shown.append)
    closed, other = (SimpleNamespace(exc_value=e) for e in (RuntimeError("Event loop is closed"), ValueError("x")))
    hook(closed)
    hook(other)
    assert shown == [other]


def test_generate_s_sampling_flags_are_checked_before_a_model_loads(tmp_path, capsys):
    for flags, said in ((["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
                        (["--top-p", "0", "--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1; "
                                                                   "--top-p 0.0: expected a number in (0, 1]"),
                        (["--top-k", "-2"], "--top-k -2: expected an integer >= 0")):
        # the workdir does not exist: the flags are refused before it is looked at
        assert main(["generate", "--workdir", str(tmp_path / "none"), "--prompt", "hi", *flags]) == 2
        assert f"jit-tune generate: error: generate: {said}" in capsys.readouterr().err


def test_a_workdir_given_as_a_hugging_face_dir_is_named_with_the_flag_to_use(tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"model": {}, "data": {}, "train": {"steps": 6}}))
    assert main(["generate", "--hf", str(workdir), "--prompt", "hi"]) == 2
    assert f"{workdir} is a jit-tune workdir, not a Hugging Face model directory: generate and eval take it as " \
           f"--workdir {workdir}" in capsys.readouterr().err
    broken = tmp_path / "hf"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ')  # cut short
    assert main(["generate", "--hf", str(broken), "--prompt", "hi"]) == 2
    assert f"{broken}/config.json:1: not valid JSON" in capsys.readouterr().err


def test_only_file_system_refusals_lose_their_library_tracebacks():
    """The CLI drops Orbax's logged tracebacks of a full disk (it reports the disk itself,
    exit 5); any other error logged with its traceback is kept."""
    import errno
    import logging

    from jit_tune.cli import _quiet_file_system_refusals

    def record(error):
        return logging.LogRecord("absl", logging.ERROR, "f.py", 1, "failed", None, (type(error), error, None))

    full = ValueError('OUT_OF_RANGE: Error writing "x": Failed to write 8 bytes to file 6: File too large')
    assert not _quiet_file_system_refusals(record(full))
    assert not _quiet_file_system_refusals(record(OSError(errno.ENOSPC, "No space left on device", "/ckpt/6")))
    assert _quiet_file_system_refusals(record(ValueError("shape mismatch")))
    assert _quiet_file_system_refusals(logging.LogRecord("absl", logging.ERROR, "f.py", 1, "no exc", None, None))
