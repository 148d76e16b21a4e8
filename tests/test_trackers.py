"""Weights & Biases logging, offline: a run logs its metrics and config to W&B, and a
resumed run continues the same W&B run."""

import json
import struct

import pytest

from jit_tune.cli import main

wandb = pytest.importorskip("wandb", reason="wandb not installed: pip install 'jit_tune[wandb]'")
from wandb.proto import wandb_internal_pb2  # noqa: E402

SMOKE = ["--config", "configs/tiny.py:smoke"]
BLOCK = 32768  # the .wandb file is a LevelDB log: 32 KiB blocks of records with 7-byte headers


def wandb_records(path):
    """The protobuf Records of a .wandb file, as `wandb sync` reads them."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(run_dirs):
    """{step: {key: value}} over the runs' files, and the W&B run ids."""
    steps, ids = {}, set()
    for run_dir in run_dirs:
        for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                steps.setdefault(items.pop("_step", record.history.step.num), {}).update(items)
    return steps, ids


def test_a_run_logs_to_wandb_offline_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    flags = [*SMOKE, "--workdir", str(workdir), "--config.logging.wandb.project=jit-tune-test",
             "--config.logging.wandb.mode=offline", "--config.logging.group=sweep-a", "--config.train.log_every=1",
             "--config.optimizer.warmup_steps=1"]
    assert main(["train", *flags, "--config.train.steps=2"]) == 0
    assert main(["train", *flags, "--config.train.steps=4"]) == 0  # resumes from step 2

    runs = sorted((tmp_path / "wandb_files/wandb").glob("offline-run-*"))
    assert len(runs) == 2
    steps, ids = history(runs)
    assert ids == {(workdir / "wandb_run_id").read_text().strip()}  # one W&B run, continued
    assert sorted(s for s in steps if "loss" in steps[s]) == [1, 2, 3, 4]
    jsonl = {line["step"]: line for line in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2, 3, 4):
        assert steps[step]["loss"] == pytest.approx(jsonl[step]["loss"])
        assert steps[step]["train/tokens/" + "sort"] == jsonl[step]["train/tokens/sort"]


def test_wandb_settings_are_checked_at_load(tmp_path, capsys):
    assert main(["train", *SMOKE, "--workdir", str(tmp_path / "r"), "--config.logging.wandb.project=p",
                 "--config.logging.wandb.mode=sometimes"]) == 2
    err = capsys.readouterr().err
    assert "logging.wandb.mode" in err and "'online', 'offline' or 'disabled'" in err
    assert not (tmp_path / "r").exists()
