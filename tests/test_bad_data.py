"""Bad data gets a clear answer, never a hang or a traceback: bad records are skipped
and counted once, a task with nothing to train on is an error naming it and why, empty
answers are not trained, and the counts reach the log from worker processes too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jit_tune.data.registry import build_registry
from jit_tune.cli import main

REPO = Path(__file__).resolve().parents[1]


def _config_file(tmp_path: Path, task: dict, *lines: str) -> Path:
    """A config training on one file task, built on the smoke config."""
    path = tmp_path / "cfg.py"
    path.write_text(
        "from ml_collections import ConfigDict\n"
        "from jit_tune.config import default_config, smoke\n\n\n"
        "def get_config():\n"
        "    c = smoke(default_config(), steps=6)\n"
        "    c.data.batch_size = 8\n"
        f"    c.data.tasks.mine = {task!r}\n"
        "    c.data.mixture = ConfigDict({'mine': 1.0})\n"
        + "".join(f"    {line}\n" for line in lines)
        + "    return c\n")
    return path


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _records(n: int = 20) -> list:
    return [{"prompt": f"Say {w} {i}.", "completion": w} for i, w in zip(range(n), ("owl", "cake", "moon", "kite") * n)]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """A jit-tune command in its own process, so that a hang fails the test instead of
    stalling the suite."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "jit_tune.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_data_inspect_skips_bad_records_and_names_them(tmp_path, capsys):
    records = _records()
    records[3] = '{"prompt": "broken'
    records[9] = {"prompt": "no answer"}
    config = _config_file(tmp_path, {"path": str(_jsonl(tmp_path / "say.jsonl", records))},
                          "c.data.on_bad_record = 'skip'")
    assert main(["data", "inspect", "--config", str(config), "--sample", "100"]) == 0
    out = capsys.readouterr().out
    assert "bad records skipped" in out and "say.jsonl:4: malformed JSON" in out
    assert "say.jsonl:10: missing field 'completion'" in out
    # The packed rows and the counted examples are two samples, each named.
    assert re.search(r"The first 8 batches, \d+ rows of \d+: .* Of the first 100 examples: 0 truncated", out)


@pytest.mark.parametrize("task, message", [
    (dict(fields="prompt"), "config.data.tasks.mine.fields = 'prompt': expected a dict from some of ['completion', "
                            "'prompt'] to the record's keys"),
    (dict(fields={"question": "q"}), "config.data.tasks.mine.fields = {'question': 'q'}: expected a dict from"),
    (dict(format="chat"), "config.data.tasks.mine.format = 'chat': expected one of prompt_completion, t0,"),
    (dict(typo=1), "config.data.tasks.mine: unknown keys ['typo']"),
    (dict(path="nowhere.jsonl"), "config.data.tasks.mine.path = 'nowhere.jsonl': no such file or directory"),
    (dict(path=None), "config.data.tasks.mine: 'path' = None: expected a file or directory path"),
    (dict(format="templated"), "config.data.tasks.mine: format 'templated' needs 'templates'"),
])
def test_a_bad_task_spec_is_named_with_its_config_line_at_load(tmp_path, task, message):
    from jit_tune.config import ConfigError, load_config

    data = _jsonl(tmp_path / "say.jsonl", _records())
    config = _config_file(tmp_path, {"path": str(data), **task})
    with pytest.raises(ConfigError) as error:
        load_config(str(config))
    assert f"{config}:8: {message}" in str(error.value)


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_bad_record_is_counted_once_and_drops_reach_the_log_from_workers(tmp_path, workers):
    records = _records()
    records[5] = {"prompt": "no answer"}
    records[7] = {"prompt": "Say it. " + "word " * 300, "completion": "it"}  # longer than a row
    config = _config_file(tmp_path, {"path": str(_jsonl(tmp_path / "say.jsonl", records))},
                          "c.data.on_bad_record = 'skip'", "c.data.truncation = 'drop'",
                          "c.data.validation_share = 0.0", f"c.data.workers = {workers}", "c.train.steps = 12",
                          "c.train.log_every = 1")
    workdir = tmp_path / "run"
    result = _run(["train", "--config", str(config), "--workdir", str(workdir)])
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # 12 steps of 8 rows of ~10 examples read the 20 records about 50 times over.
    assert sum(m.get("data/skipped_bad_records", 0) for m in logged) == 1
    assert sum(m.get("data/dropped_too_long", 0) for m in logged) > 20  # every epoch drops it again
    assert "say.jsonl:6: missing field 'completion'" in result.stderr
    assert "Skipped 1 bad records" in result.stderr


@pytest.mark.parametrize("records, fmt, why", [
    ([{"prompt": "Say it. " + "word " * 40, "completion": "it " * 200}] * 30, "prompt_completion",
     "longer than a row (data.seq_len = 128)"),
    ([{"messages": [{"role": "user", "content": f"Hello {i}"}]} for i in range(30)], "messages",
     "with nothing to train on (no assistant turn, or only empty answers)"),
    ([{"prompt": f"Question {i}?", "completion": "<|endoftext|>"} for i in range(30)], "t0",
     "with nothing to train on (no assistant turn, or only empty answers)"),
])
def test_a_task_with_nothing_to_train_is_an_error_naming_it_not_a_hang(tmp_path, records, fmt, why):
    config = _config_file(tmp_path, {"path": str(_jsonl(tmp_path / "x.jsonl", records)), "format": fmt})
    for command in (["data", "inspect", "--config", str(config)],
                    ["train", "--config", str(config), "--workdir", str(tmp_path / "run")]):
        result = _run(command)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "task 'mine' yields no example to train on" in result.stderr and why in result.stderr
        assert "Traceback" not in result.stderr


def test_an_empty_answer_is_not_trained_and_counts_as_no_trained_token(tokenizer, smoke_config, tmp_path):
    from ml_collections import ConfigDict

    from jit_tune.data.formats import to_conversation
    from jit_tune.data.pipeline import train_dataset
    from jit_tune.data.render import tokenize_conversation

    empty = to_conversation({"prompt": "Which one?", "completion": " <|endoftext|>"[1:]}, "t0")
    assert empty["messages"][-1]["content"] == ""
    _, mask = tokenize_conversation(tokenizer, empty["messages"])
    assert not mask.any()  # its EOS alone is not trained

    records = _records()
    for i in (2, 11):
        records[i] = {"prompt": f"Pick {i}.", "completion": "<|endoftext|>"}
    smoke_config.data.task_dirs = ConfigDict({})
    smoke_config.data.tasks = ConfigDict({"mine": {"path": str(_jsonl(tmp_path / "t0.jsonl", records)),
                                                   "format": "t0"}})
    smoke_config.data.mixture = ConfigDict({"mine": 1.0})
    smoke_config.data.validation_share = 0.0
    batch = next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config))))
    assert batch["dropped_no_trained_token"].sum() >= 1


def test_a_task_without_validation_examples_does_not_crash_the_final_eval(tmp_path):
    config = _config_file(tmp_path, {"path": str(_jsonl(tmp_path / "say.jsonl", _records()))},
                          "c.data.validation_share = 0.0")
    result = _run(["train", "--config", str(config), "--workdir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no examples" in result.stdout
    results = json.loads((tmp_path / "run/eval/results.json").read_text())["results"]
    assert results["tasks"]["mine"]["templates"] == {} and "held_in" not in results["tasks"]["mine"]
