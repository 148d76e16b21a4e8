"""Mixture rules, nested groups, file tasks in the pipeline, and the T0 config."""

import json
from pathlib import Path

import numpy as np
import pytest
from ml_collections import ConfigDict

from jit_tune.data.registry import build_registry
from jit_tune.data.mixture import MixtureError, task_rates
from jit_tune.data.pipeline import train_dataset, truncate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZES = {"a": 100.0, "b": 300.0, "c": 5000.0, "gen": float("inf")}


def _group(tasks, rule, cap=0, temperature=1.0):
    return {"tasks": tasks, "rule": rule, "cap": cap, "temperature": temperature}


def test_explicit_rates_are_normalized():
    assert task_rates({"a": 1, "b": 3}, {}, SIZES) == {"a": 0.25, "b": 0.75}


def test_examples_proportional_with_cap():
    rates = task_rates({"g": 1}, {"g": _group(("a", "b", "c"), "examples", cap=1000)}, SIZES)
    assert rates == pytest.approx({"a": 100 / 1400, "b": 300 / 1400, "c": 1000 / 1400})


def test_temperature_flattens_towards_equal():
    rates = task_rates({"g": 1}, {"g": _group(("a", "b"), "temperature", temperature=2.0)}, SIZES)
    assert rates == pytest.approx({"a": 10 / (10 + 300**0.5), "b": 300**0.5 / (10 + 300**0.5)})


def test_nested_groups_split_each_rate_by_their_own_rule():
    groups = {"small": _group(("a", "b"), "examples"), "all": _group(("small", "c"), "equal")}
    rates = task_rates({"all": 2, "gen": 2}, groups, SIZES)
    assert rates == pytest.approx({"a": 0.0625, "b": 0.1875, "c": 0.25, "gen": 0.5})


@pytest.mark.parametrize("mixture, groups, message", [
    ({"nope": 1}, {}, "'nope' is neither a task nor a group"),
    ({"g": 1}, {"g": _group(("g",), "equal")}, "group 'g' contains itself"),
    ({"g": 1}, {"g": _group(("a", "gen"), "examples")}, "unbounded size: expected a cap"),
    ({"g": 1}, {"g": _group(("a",), "sideways")}, r"rule = 'sideways': expected one of"),
    ({"a": 0}, {}, "at least one task or group with a rate > 0"),
    ({"g": 1}, {"g": _group(("a", "nope"), "examples")}, r"groups.g.tasks: \['nope'\] are neither tasks nor groups"),
    ({"g": 1}, {"g": _group(("a", "b"), "temperature", temperature=0)}, "temperature = 0: expected a finite number > 0"),
    ({"g": 1}, {"g": _group(("a", "b"), "examples", cap=-5)}, r"cap = -5: expected an integer >= 0"),
    ({"a": 1}, {"a": _group(("b", "c"), "equal")}, "groups.a: a group may not take a task's name"),
    ({"a": 1}, {"g": {**_group(("a",), "temperature"), "temprature": 2}}, r"unknown fields \['temprature'\]"),
    ({"a": 1}, {"g": _group("ab", "equal")}, "tasks = 'ab': expected a non-empty tuple"),
    ({"a": 1}, {"g": _group(("a", ["b"]), "equal")}, r"tasks = \('a', \['b'\]\): expected a non-empty tuple"),
    ({"g": 1}, {"g": _group(("h",), "examples"), "h": _group(("a", "g"), "examples")}, "'g' contains itself"),
])
def test_bad_mixtures_are_named(mixture, groups, message):
    with pytest.raises(MixtureError, match=message):
        task_rates(mixture, groups, SIZES)


@pytest.mark.parametrize("group, message", [
    ("{'tasks': ('reverse', 'sortt'), 'rule': 'equal'}", r"config.data.groups.g.tasks: \['sortt'\] are neither tasks"),
    # built-in tasks are generated: examples-proportional needs a cap (found at load, not once training starts)
    ("{'tasks': ('reverse', 'sort'), 'rule': 'examples'}", "config.data.groups.g: rule 'examples' holds generated "
                                                           "tasks of unbounded size: expected a cap > 0"),
    ("{'tasks': ('reverse', 'sort')}", r"config.data.groups.g: missing \['rule'\]"),
])
def test_bad_group_in_a_config_is_rejected_at_load_with_its_line(tmp_path, group, message):
    from jit_tune.config import ConfigError, load_config

    path = tmp_path / "cfg.py"
    path.write_text(
        "from ml_collections import ConfigDict\nfrom jit_tune.config import default_config\n\n"
        "def get_config():\n    c = default_config()\n"
        f"    c.data.groups = ConfigDict({{'g': {group}}})\n"
        "    c.data.mixture = ConfigDict({'g': 1.0})\n    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:6: {message}"):
        load_config(str(path))


def test_a_file_task_may_not_take_another_task_s_name(tmp_path):
    from jit_tune.config import ConfigError, load_config

    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    path = tmp_path / "cfg.py"
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n    c = default_config()\n"
        f"    c.data.tasks.reverse = dict(path={str(data)!r})\n    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:5: config.data.tasks.reverse: a built-in task has this name"):
        load_config(str(path))
    (tmp_path / "dir" / "news").mkdir(parents=True)
    path.write_text(
        "from jit_tune.config import default_config\n\n"
        "def get_config():\n    c = default_config()\n"
        f"    c.data.tasks['t0/news'] = dict(path={str(data)!r})\n"
        f"    c.data.task_dirs.t0 = dict(path={str(tmp_path / 'dir')!r})\n    return c\n"
    )
    with pytest.raises(ConfigError, match=rf"{path}:6: config.data.task_dirs.t0: its task t0/news has the name of a task"):
        load_config(str(path))


def test_truncation_cuts_the_prompt_from_the_left_or_drops():
    features = {"inputs": np.arange(10), "targets": np.arange(1, 11), "loss_mask": np.array([0] * 7 + [1] * 3)}
    cut = truncate(features, 6, "left")
    assert cut["inputs"].tolist() == [4, 5, 6, 7, 8, 9] and cut["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    assert truncate(features, 6, "drop") is None
    assert truncate(features, 2, "left") is None  # the response alone does not fit
    assert truncate(features, 10, "drop") is features


@pytest.mark.parametrize("policy", ["left", "drop"])
def test_rows_flag_truncated_examples_and_drops_are_counted(tokenizer, smoke_config, policy):
    smoke_config.data.seq_len = 16  # built-in examples are 11 to 25 tokens
    smoke_config.data.truncation = policy
    batch = next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config))))
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    flagged = int(batch["truncated"][starts].sum())
    if policy == "left":
        assert flagged > 0
        for row, column in zip(*np.nonzero(starts & (batch["truncated"] > 0))):
            # a cut example starts mid-prompt, never with the chat template's first token
            assert batch["inputs"][row, column] != tokenizer.convert_tokens_to_ids("<|user|>")
    else:
        assert flagged == 0 and batch["dropped_too_long"].sum() > 0


def test_file_tasks_mix_with_built_in_tasks(tmp_path, tokenizer, smoke_config):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"Say {w}.", "a": w}) + "\n" for w in ("owl", "cake", "egg") * 50))
    smoke_config.data.tasks = ConfigDict({"say": {"path": str(path), "fields": {"prompt": "q", "completion": "a"}}})
    smoke_config.data.mixture = ConfigDict({"say": 3.0, "reverse": 1.0})
    assert build_registry(smoke_config).rates == {"say": 0.75, "reverse": 0.25}
    batch = next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config))))
    text = tokenizer.decode(batch["inputs"][batch["segment_ids"] > 0])
    assert "Say owl." in text or "Say cake." in text or "Say egg." in text


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent (a fresh clone); it holds the T0 sample")
def test_t0_config_mixes_clusters_equally_and_trains_end_to_end(tmp_path, capsys):
    from jit_tune.cli import main
    from jit_tune.config import load_config

    config = load_config("configs/t0.py:smoke")
    rates = build_registry(config).rates
    assert len(rates) == 27 and sum(rates.values()) == pytest.approx(1.0)
    assert rates["t0/common_gen"] == pytest.approx(1 / 8)  # a cluster of one task
    assert rates["t0/ag_news"] + rates["t0/dbpedia_14"] == pytest.approx(1 / 8)

    workdir = tmp_path / "t0"
    assert main(["train", "--config", "configs/t0.py:smoke", "--workdir", str(workdir)]) == 0
    assert "t0/ag_news" in capsys.readouterr().out
    assert len(json.loads((workdir / "tokenizer/tokenizer.json").read_text())["model"]["vocab"]) == 1024
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert all(np.isfinite(losses))


def test_data_inspect_reports_mixture_lengths_and_packing(tokenizer, smoke_config, capsys):
    from jit_tune.cli import main
    from jit_tune.data.inspect import inspect_data

    smoke_config.data.mixture = ConfigDict({"reverse": 3.0, "count": 1.0})
    stats = inspect_data(smoke_config, tokenizer, build_registry(smoke_config), n_show=1, n_sample=400, n_batches=2)
    assert stats["rates"] == {"count": 0.25, "reverse": 0.75}
    assert stats["realized"]["reverse"] == pytest.approx(0.75, abs=0.05)
    assert 0.8 < stats["packing_efficiency"] <= 1.0 and stats["examples_per_row"] > 1
    assert stats["dropped_untrained"] == 0 and stats["truncated"] == 0
    assert main(["data", "inspect", "--config", "configs/tiny.py:smoke", "--sample", "100"]) == 0
    out = capsys.readouterr().out
    assert "Mixture: realized" in out and "Packing" in out and "<|assistant|>" in out


def test_bad_records_stop_the_run_with_their_location_or_are_skipped_and_counted(tmp_path, tokenizer, smoke_config,
                                                                                caplog):
    from jit_tune.data.sources import SourceError

    path = tmp_path / "qa.jsonl"
    lines = [json.dumps({"prompt": f"Say {w}.", "completion": w}) for w in ("owl", "cake") * 30]
    lines[7] = json.dumps({"prompt": "no answer here"})
    lines[12] = '{"prompt": "broken'
    path.write_text("\n".join(lines) + "\n")
    smoke_config.data.tasks = ConfigDict({"say": {"path": str(path)}})
    smoke_config.data.mixture = ConfigDict({"say": 1.0})
    smoke_config.data.validation_share = 0.0
    with pytest.raises(SourceError, match=r"qa.jsonl:(8: missing field 'completion'|13: malformed JSON)"):
        for _ in range(3):
            next(iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config))))

    smoke_config.data.on_bad_record = "skip"
    iterator = iter(train_dataset(smoke_config, tokenizer, build_registry(smoke_config)))
    batches = [next(iterator) for _ in range(6)]  # 48 rows of ~5 examples: every record read several times
    assert sum(int(b["dropped_bad_record"].sum()) for b in batches) == 2  # each bad record once
    reasons = caplog.text
    assert "qa.jsonl:8: missing field 'completion'" in reasons and "qa.jsonl:13: malformed JSON" in reasons


def test_hosts_never_duplicate_examples(tmp_path):
    """Two real JAX processes each read their own slice of the mixture: within an epoch
    no record appears on both hosts, nor twice on one."""
    from multihost import spawn

    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Echo record {i}.", "completion": f"record {i}"}) + "\n"
                            for i in range(4000)))
    first, second = (set(report["ids"]) for report in spawn("data_worker.py", 2, str(path), "6"))
    reports = spawn("data_worker.py", 2, str(path), "6")
    assert [set(r["ids"]) for r in reports] == [first, second]  # deterministic
    assert all(len(r["ids"]) == len(set(r["ids"])) for r in reports)
    assert len(first) > 100 and len(second) > 100 and not first & second
