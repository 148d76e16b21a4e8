"""Mixture sweeps end to end: a sweep is a config file; plan is deterministic and
respects the constraints; runs are ordinary workdirs run here (also by two processes at
once) or through launch/; collect keeps failed and unfinished runs; fit, propose,
confirm and report complete on a few-step sweep."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ml_collections import ConfigDict

from jit_tune.cli import main
from jit_tune.config import ConfigError
from jit_tune.data.registry import build_registry
from jit_tune.sweep import plan as plan_lib
from jit_tune.sweep.config import load_sweep

SMOKE = "configs/sweep_tiny.py:smoke"


def _sweep(**changes):
    sweep = load_sweep(SMOKE)
    for key, value in changes.items():
        node = sweep
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return sweep


def test_a_plan_is_deterministic_in_the_seed_and_kept_within_the_constraints(tmp_path):
    sweep = _sweep(**{"space.points": 12, "constraints.min_weight": 0.05, "constraints.max_weight": 0.3})
    first = plan_lib.plan(sweep, SMOKE, tmp_path / "a")
    again = plan_lib.plan(sweep, SMOKE, tmp_path / "b")
    assert [r["mixture"] for r in first["runs"]] == [r["mixture"] for r in again["runs"]]
    weights = np.asarray([list(r["mixture"].values()) for r in first["runs"]])
    assert weights.shape == (12, 8) and np.allclose(weights.sum(axis=1), 1)
    assert weights.min() >= 0.05 - 1e-9 and weights.max() <= 0.3 + 1e-9
    other = plan_lib.plan(_sweep(seed=1, **{"space.points": 12}), SMOKE, tmp_path / "c")
    assert [r["mixture"] for r in other["runs"]] != [r["mixture"] for r in first["runs"]]
    with pytest.raises(ConfigError, match="this directory holds a different plan"):
        plan_lib.plan(_sweep(seed=1, **{"space.points": 12}), SMOKE, tmp_path / "a")
    typo = _sweep(**{"target.metrics": ConfigDict({"overall/unseen/heldin/loss": 1.0})})
    with pytest.raises(ConfigError, match=r"sweep.target.metrics: 'overall/unseen/heldin/loss' \(did you mean "
                                          r"'overall/unseen/held_in/loss'\?\): not a column of the runs' results"):
        plan_lib.plan(typo, SMOKE, tmp_path / "d")  # found before any run trains
    assert not (tmp_path / "d").exists()


def test_grid_leave_one_out_and_task_count_spaces(tmp_path):
    grid = ConfigDict({"sort": (0.0, 0.125, 0.5), "reverse": (0.125, 1.0)})  # the others at the prior's 0.125
    full = plan_lib.plan(_sweep(**{"space.kind": "grid", "constraints.min_weight": 0.0,
                                   "constraints.max_weight": 1.0, "space.grid": grid}), SMOKE, tmp_path / "grid")
    assert len(full["runs"]) == 6 and full["left_out"] == 0
    capped = plan_lib.plan(_sweep(**{"space.kind": "grid", "constraints.min_weight": 0.0, "space.grid": grid}), SMOKE,
                           tmp_path / "capped")  # reverse at 1.0 is over the 0.5 cap once normalized, unless sort is too
    assert len(capped["runs"]) == 4 and capped["left_out"] == 2
    loo = plan_lib.plan(_sweep(**{"space.kind": "leave_one_out", "constraints.min_weight": 0.0}), SMOKE,
                        tmp_path / "loo")
    zeros = [sum(w == 0 for w in r["mixture"].values()) for r in loo["runs"]]
    assert zeros == [0] + [1] * 8  # the prior, then each unit left out
    counts = plan_lib.plan(_sweep(**{"space.kind": "task_count", "constraints.min_weight": 0.0, "space.points": 2,
                                     "constraints.max_weight": 1.0}),
                           SMOKE, tmp_path / "count")
    trained = sorted({sum(w > 0 for w in r["mixture"].values()) for r in counts["runs"]})
    assert trained == [1, 2, 4, 8]  # FLAN's ablation: 1, 2, 4, ... of the units


def test_max_epochs_bounds_the_weight_of_small_tasks(tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": str(i)}) + "\n" for i in range(40)))
    base = tmp_path / "base.py"
    base.write_text("from ml_collections import ConfigDict\nfrom jit_tune.config import default_config, smoke\n\n\n"
                    "def get_config():\n    c = smoke(default_config(), steps=20)\n    c.data.batch_size = 8\n"
                    f"    c.data.tasks.small = dict(path={str(data)!r})\n"
                    "    c.data.mixture = ConfigDict({'small': 1.0, 'sort': 1.0, 'reverse': 1.0})\n    return c\n")
    sweep = _sweep(base=str(base), overrides=(), **{"constraints.max_epochs": 2.0, "constraints.min_weight": 0.0})
    manifest = plan_lib.plan(sweep, SMOKE, tmp_path / "s")
    small = [r["mixture"]["small"] for r in manifest["runs"]]
    # 20 steps of 8 rows of ~8 examples: 2 epochs of 40 records is about 6% of the draws.
    upper = dict(zip(manifest["units"], manifest["upper"]))
    assert max(small) <= upper["small"] + 1e-9 < 0.2 and upper["sort"] == 0.5  # generated tasks: no epoch limit


@pytest.mark.slow
def test_a_sweep_runs_end_to_end_and_every_verb_reads_alone(tmp_path, capsys):
    directory = tmp_path / "sweep"
    assert main(["sweep", "all", "--sweep", SMOKE, "--dir", str(directory)]) == 0
    manifest = plan_lib.load_manifest(directory)
    assert [r["kind"] for r in manifest["runs"]].count("confirm") == 3  # proposed, uniform, examples x 1 seed
    assert all(plan_lib.status(r) == "finished" for r in manifest["runs"])

    table = pd.read_parquet(directory / "results.parquet")
    assert len(table) == 7 and table["target"].notna().all()
    for column in ("w/sort", "task/sort/held_in/exact_match", "cluster/counting/held_in/score",
                   "overall/unseen/held_in/loss", "task/count_unique/held_in/acc"):
        assert column in table.columns, column
    # what planning checks sweep.target.metrics against covers every column collected
    registry = build_registry(plan_lib.base_run_config(load_sweep(SMOKE)))
    results = [c for c in table.columns if c.startswith(("task/", "cluster/", "overall/"))]
    assert results and set(results) <= plan_lib.result_columns(registry)
    assert pd.read_csv(directory / "results.csv").shape == table.shape
    fit = json.loads((directory / "fit.json").read_text())
    assert set(fit["models"]) == {"linear", "lightgbm"} and fit["chosen"] in fit["models"]
    assert {"spearman", "rmse", "regret"} <= set(fit["models"]["linear"])
    proposal = json.loads((directory / "proposal.json").read_text())
    assert sum(proposal["weights"].values()) == pytest.approx(1.0)
    assert min(proposal["weights"].values()) >= 0.02 - 1e-6 and max(proposal["weights"].values()) <= 0.5 + 1e-6
    confirm = json.loads((directory / "confirm.json").read_text())
    assert set(confirm["beats"]) == {"uniform", "examples"} and "proposed" in confirm["means"]
    html = (directory / "report.html").read_text()
    assert "<img" in html and "sweep_tiny" in html
    # Every run is an ordinary workdir, grouped by the sweep's name.
    run = manifest["runs"][0]
    lines = [json.loads(line) for line in (Path(run["workdir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(line["group"] == "sweep_tiny" for line in lines)
    capsys.readouterr()
    assert main(["eval", "--workdir", run["workdir"]]) == 0

    # Each verb again, alone: nothing to run, the same table, the same fit.
    assert main(["sweep", "run", "--dir", str(directory)]) == 0
    assert "0 pending runs" in capsys.readouterr().out
    assert main(["sweep", "collect", "--dir", str(directory)]) == 0
    assert main(["sweep", "fit", "--dir", str(directory)]) == 0
    assert json.loads((directory / "fit.json").read_text())["models"] == fit["models"]


@pytest.mark.slow
def test_two_local_processes_share_the_runs_and_failures_are_listed_not_dropped(tmp_path, capsys):
    directory = tmp_path / "sweep"
    assert main(["sweep", "plan", "--sweep", SMOKE, "--dir", str(directory)]) == 0
    manifest = plan_lib.load_manifest(directory)
    broken = manifest["runs"][1]
    broken["argv"] = broken["argv"] + ["--config.data.mixture.uppercase=-1.0"]  # a run that cannot start
    plan_lib.save_manifest(directory, manifest)
    capsys.readouterr()
    assert main(["sweep", "run", "--dir", str(directory), "--processes", "2"]) == 1
    statuses = {r["id"]: plan_lib.status(r) for r in plan_lib.load_manifest(directory)["runs"]}
    assert statuses.pop(broken["id"]) == "failed" and set(statuses.values()) == {"finished"}
    assert main(["sweep", "collect", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert f"failed: {broken['id']}: ConfigError" in out and f"not finished (1): {broken['id']}" in out
    table = pd.read_csv(directory / "results.csv")
    assert len(table) == 4 and table.set_index("id").loc[broken["id"], "status"] == "failed"


def test_a_saved_sweep_reloads_on_todays_defaults_and_an_unknown_field_is_named():
    from jit_tune.sweep.config import default_sweep_config, sweep_from_dict

    saved = default_sweep_config().to_dict()
    saved["base"] = "configs/tiny.py:heldout"
    saved["space"]["points"] = 5
    del saved["confirm"]  # a manifest from before the field existed
    sweep = sweep_from_dict(saved, "s's manifest")
    assert sweep.space.points == 5 and sweep.confirm == default_sweep_config().confirm
    with pytest.raises(ConfigError, match="s's manifest: unknown sweep field space.pointz"):
        sweep_from_dict({**saved, "space": {"pointz": 5}}, "s's manifest")
    with pytest.raises(ConfigError, match=r"s's manifest: sweep.space.points = None: expected an integer"):
        sweep_from_dict({**saved, "space": {"points": None}}, "s's manifest")
    with pytest.raises(ConfigError, match=r"s's manifest: sweep.space: expected a section \(a JSON object"):
        sweep_from_dict({**saved, "space": [5]}, "s's manifest")


def test_a_damaged_manifest_is_named_left_as_it_is_and_planning_again_restores_it(tmp_path, capsys):
    directory = tmp_path / "sweep"
    assert main(["sweep", "plan", "--sweep", SMOKE, "--dir", str(directory)]) == 0
    manifest = directory / "manifest.json"
    whole = manifest.read_text()
    manifest.write_text(whole[: len(whole) // 2])  # cut short, as by a full disk
    capsys.readouterr()
    assert main(["sweep", "run", "--dir", str(directory), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"error: {manifest}:\d+: not valid JSON \(.* at column \d+\); the file was left as it is: "
                     "move it aside and run `jit-tune sweep plan`", err)
    assert manifest.read_text() == whole[: len(whole) // 2]
    for wrong, said in (("[]", r"expected a JSON object \(\{...\}\), found list"),
                        ('{"name": "s"}', "expected the field 'runs', which jit_tune writes there; not found")):
        manifest.write_text(wrong)  # parses, but is not a manifest
        assert main(["sweep", "run", "--dir", str(directory), "--dry-run"]) == 2
        assert re.search(rf"error: {manifest}: {said}.*left as it is: move it aside", capsys.readouterr().err)
    manifest.rename(directory / "manifest.damaged")
    assert main(["sweep", "plan", "--sweep", SMOKE, "--dir", str(directory)]) == 0
    assert json.loads(manifest.read_text())["runs"] == json.loads(whole)["runs"]
