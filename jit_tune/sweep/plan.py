"""A sweep's plan: the manifest of its runs, each an ordinary jit_tune workdir.

    <sweep dir>/manifest.json   {name, sweep, base, units, prior, seed, left_out, runs: [run...]}
    run: {id, kind (proxy | confirm), point, seed, mixture {unit: weight}, workdir, argv}
    <sweep dir>/runs/<id>/      the run's workdir: `jit-tune <argv>` trains or resumes it

`argv` is the whole `jit-tune` command line of a run, so every engine (local processes,
a SLURM array, GKE, a TPU VM) runs the same thing, and a person can run one by hand. A
run's status is read from its workdir, never stored: finished (its final evaluation is
written), failed (the local runner wrote `.sweep_failed`), started (a checkpoint or
config exists) or planned.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from jit_tune.config import ConfigError, config_to_dict, load_config
from jit_tune.data.registry import build_registry
from jit_tune.files import atomic_write_json, read_json
from jit_tune.sweep import space

MANIFEST = "manifest.json"
# The plan is a function of the sweep config, and runs' results live in their workdirs.
MANIFEST_ADVICE = ("move it aside and run `jit-tune sweep plan` with the same sweep config into this directory: it "
                   "plans the same runs, and finished runs are found in their workdirs")
MANIFEST_KEYS = ("runs",)  # what every verb and launcher reads
FAILED = ".sweep_failed"


def run_argv(sweep: ConfigDict, workdir: Path, seed: int, mixture: dict[str, float], extra=()) -> list[str]:
    return ["train", "--config", sweep.base, "--workdir", str(workdir), *sweep.overrides, *extra,
            f"--config.seed={seed}", f"--config.logging.group={sweep.name}",
            *(f"--config.data.mixture.{unit}={weight!r}" for unit, weight in mixture.items())]


def base_run_config(sweep: ConfigDict) -> ConfigDict:
    """The base run config with the sweep's overrides: what every run starts from."""
    return load_config(sweep.base, list(sweep.overrides))


def units_of(sweep: ConfigDict, run_config: ConfigDict) -> list[str]:
    units = list(sweep.space.units) or [u for u, rate in run_config.data.mixture.items() if rate > 0]
    unknown = [u for u in units if u not in run_config.data.mixture]
    if unknown:
        raise ConfigError(f"sweep.space.units: {unknown} are not entries of the base config's data.mixture "
                          f"({', '.join(run_config.data.mixture)})")
    return units


def examples_per_step(run_config: ConfigDict, registry) -> float:
    """Examples a training step reads, measured on a few packed batches."""
    from jit_tune.data.pipeline import run_tokenizer, train_dataset

    iterator = iter(train_dataset(run_config, run_tokenizer(run_config, registry), registry))
    batches = [next(iterator) for _ in range(4)]
    starts = sum(int(((b["positions"] == 0) & (b["segment_ids"] > 0)).sum()) for b in batches)
    return starts / len(batches)


def result_columns(registry) -> set[str]:
    """Every column `collect` can read from the runs' eval/results.json (collect.flatten_results):
    KIND/NAME/GROUP/METRIC, for the base config's eval tasks, its clusters, and the overall
    sets; a task's metrics also as medians over its templates."""
    from jit_tune.eval.metrics import METRICS

    metrics = ("score", "loss", *METRICS)
    names = [("task", name) for name in registry.eval_tasks] + [("cluster", name) for name in registry.clusters]
    names += [("overall", name) for name in ("all", "trained", "unseen")]
    return {f"{kind}/{name}/{group}/{median}{metric}" for kind, name in names for group in ("held_in", "held_out")
            for metric in metrics for median in ("", "median_")[:1 + (kind == "task")]}


def check_target(sweep: ConfigDict, registry) -> None:
    """sweep.target.metrics name result columns: a typo is found when planning, not after
    every run has trained."""
    known = result_columns(registry)
    unknown = [column for column in sweep.target.metrics if column not in known]
    if unknown:
        hints = [f"{c!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(c, known, 1))
                             else "") for c in unknown]
        raise ConfigError(f"sweep.target.metrics: {', '.join(hints)}: not a column of the runs' results; expected "
                          "KIND/NAME/GROUP/METRIC: KIND task, cluster or overall; NAME an eval task or cluster of the "
                          "base config, or all, trained, unseen; GROUP held_in or held_out; METRIC score, loss or a "
                          "metric name (median_METRIC for a task)")


def plan(sweep: ConfigDict, sweep_spec: str, directory: Path) -> dict:
    """The manifest for `sweep`, written to `directory` (deterministic from the sweep's
    seed). An existing manifest is kept when it plans the same runs, else refused."""
    run_config = base_run_config(sweep)
    registry = build_registry(run_config)
    check_target(sweep, registry)
    units = units_of(sweep, run_config)
    sizes = space.unit_sizes(run_config, registry, units)
    prior = space.prior_weights(sweep.space.prior, sizes, sweep.space.cap)
    drawn = examples_per_step(run_config, registry) * run_config.train.steps if sweep.constraints.max_epochs else 0
    lower, upper = space.weight_bounds(sweep, sizes, drawn)
    points, left_out = space.sample(sweep, units, prior, lower, upper)
    runs = []
    for point, weights in enumerate(points):
        for seed in sweep.seeds:
            run_id = f"p{point:03d}-s{seed}"
            workdir = (directory / "runs" / run_id).absolute()
            mixture = {u: float(w) for u, w in zip(units, weights)}
            runs.append({"id": run_id, "kind": "proxy", "point": point, "seed": seed, "mixture": mixture,
                         "workdir": str(workdir), "argv": run_argv(sweep, workdir, seed, mixture)})
    manifest = {"name": sweep.name, "sweep": sweep_spec, "config": config_to_dict(sweep), "base": sweep.base,
                "units": units, "sizes": [None if np.isinf(x) else x for x in sizes.tolist()],
                "prior": prior.tolist(), "upper": upper.tolist(), "lower": lower.tolist(), "left_out": left_out,
                "runs": runs}
    path = directory / MANIFEST
    if path.is_file():
        existing = read_json(path, MANIFEST_ADVICE, MANIFEST_KEYS)
        planned = [r for r in existing["runs"] if r["kind"] == "proxy"]
        if [(r["id"], r["mixture"]) for r in planned] != [(r["id"], r["mixture"]) for r in runs]:
            raise ConfigError(f"{path}: this directory holds a different plan; plan the changed sweep into a new "
                              "directory (its runs would be mixed up with these)")
        return existing
    atomic_write_json(path, manifest)
    return manifest


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run `jit-tune sweep plan` first")
    return read_json(path, MANIFEST_ADVICE, MANIFEST_KEYS)


def save_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_json(Path(directory) / MANIFEST, manifest)


def status(run: dict) -> str:
    """finished | failed | started | planned, read from the run's workdir."""
    workdir = Path(run["workdir"])
    results, config = workdir / "eval" / "results.json", workdir / "config.json"
    if results.is_file() and config.is_file():
        steps = read_json(config, keys=("train",))["train"]["steps"]
        if read_json(results, keys=("step",))["step"] == steps:
            return "finished"
    if (workdir / FAILED).is_file():
        return "failed"
    return "started" if config.is_file() else "planned"


def pending(manifest: dict, kind: str | None = None) -> list[dict]:
    """The runs that are not finished (of `kind`, if given), in plan order."""
    return [r for r in manifest["runs"] if (kind is None or r["kind"] == kind) and status(r) != "finished"]
