"""The `jit-tune sweep` verbs, each resumable and each readable on its own, all keyed on
the sweep directory (the manifest holds the sweep's config from `plan` on):

  plan      the manifest of proxy runs (deterministic from the sweep's seed), printed
  run       the pending runs: here (in one process, or N at once), or through launch/
  collect   one table of every run (results.csv, results.parquet)
  fit       surrogates of the target with out-of-fold trust figures (fit.json)
  propose   the mixture the chosen surrogate predicts is best (proposal.json)
  confirm   trains the proposal and the baseline mixtures with the same seeds, and
            compares predicted with actual (confirm.json)
  report    report.html and report.md with the plots
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from ml_collections import ConfigDict
from rich.console import Console
from rich.table import Table

from jit_tune.config import ConfigError
from jit_tune.files import atomic_write_json, no_empty_folders_on_error, read_json
from jit_tune.sweep import fit as fit_lib
from jit_tune.sweep import plan as plan_lib
from jit_tune.sweep.collect import collect
from jit_tune.sweep.config import sweep_from_dict
from jit_tune.sweep.propose import kl_divergence, propose
from jit_tune.sweep.runner import failure, run_local

# Piped to a file or a scheduler's log, rich would squeeze the tables (a column per mixture
# unit) into 80 columns and cut the numbers; there they take the width they need.
console = Console(width=None if sys.stdout.isatty() else 10_000)


def _sweep(manifest: dict) -> ConfigDict:
    return sweep_from_dict(manifest["config"], f"{manifest['name']}'s manifest")


def _weights_table(manifest: dict, runs: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ["run", "kind", "seed", "status"] + manifest["units"]:
        table.add_column(column, justify="left" if column in ("run", "kind", "status") else "right")
    for run in runs:
        table.add_row(run["id"], run.get("label") or run["kind"], str(run["seed"]), plan_lib.status(run),
                      *(f"{run['mixture'].get(u, 0.0):.3f}" for u in manifest["units"]))
    return table


def plan(sweep: ConfigDict, spec: str, directory: Path) -> dict:
    with no_empty_folders_on_error(directory):  # a manifest the disk refused leaves no empty sweep directory
        manifest = plan_lib.plan(sweep, spec, directory)
    console.print(_weights_table(manifest, manifest["runs"], f"Sweep {manifest['name']}: {len(manifest['runs'])} runs "
                                 f"in {directory} (units: mixture entries of {manifest['base']})"))
    if manifest["left_out"]:
        console.print(f"{manifest['left_out']} candidate mixtures broke sweep.constraints and were left out")
    return manifest


def run(directory: Path, processes: int = 1, kind: str | None = None, dry_run: bool = False) -> int:
    return run_local(directory, processes, kind, dry_run)


def collect_table(directory: Path) -> pd.DataFrame:
    manifest = plan_lib.load_manifest(directory)
    table = collect(directory)
    shown = Table(title=f"Sweep {manifest['name']}: {directory}/results.csv and results.parquet")
    for column in ("run", "kind", "seed", "status", "target"):
        shown.add_column(column, justify="right" if column in ("seed", "target") else "left")
    for _, row in table.iterrows():
        shown.add_row(row["id"], row["label"] or row["kind"], str(row["seed"]), row["status"],
                      "-" if pd.isna(row["target"]) else f"{row['target']:.4f}")
    console.print(shown)
    for run in manifest["runs"]:
        if plan_lib.status(run) == "failed":
            console.print(f"failed: {run['id']}: {failure(run).splitlines()[0]}", markup=False)
    unfinished = table[(table["status"] != "finished")]
    if len(unfinished):
        console.print(f"not finished ({len(unfinished)}): {', '.join(unfinished['id'])}")
    return table


def _training_data(manifest: dict, table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rows = table[(table["kind"] == "proxy") & (table["status"] == "finished") & table["target"].notna()]
    W = rows[[f"w/{u}" for u in manifest["units"]]].to_numpy(float)
    return rows, W, rows["target"].to_numpy(float)


def fit(directory: Path) -> dict:
    manifest = plan_lib.load_manifest(directory)
    sweep = _sweep(manifest)
    table = collect(directory)
    rows, W, y = _training_data(manifest, table)
    fits = fit_lib.fit_surrogates(W, y, tuple(sweep.fit.models), sweep.fit.folds, sweep.target.maximize, sweep.seed)
    chosen = sweep.propose.model or fit_lib.best_model(fits)
    result = {"target": manifest["config"]["target"]["metrics"], "maximize": sweep.target.maximize, "chosen": chosen,
              "runs": list(rows["id"]), "models": {name: {**f.summary(), "oof": f.oof.tolist()}
                                                 for name, f in fits.items()}}
    atomic_write_json(Path(directory) / "fit.json", result)
    shown = Table(title=f"Surrogates of the target on {len(y)} finished proxy runs (out-of-fold, "
                        f"{'leave-one-out' if not sweep.fit.folds else f'{sweep.fit.folds}-fold'})")
    for column in ("model", "Spearman", "RMSE", "regret@1", ""):
        shown.add_column(column, justify="left" if column in ("model", "") else "right")
    for name, f in fits.items():
        shown.add_row(name, f"{f.spearman:.3f}", f"{f.rmse:.4f}", f"{f.regret:.4f}", "chosen" if name == chosen else "")
    console.print(shown)
    console.print(_trust(fits[chosen], y))
    return result


def _trust(f, y: np.ndarray) -> str:
    """How far to trust the chosen surrogate, in words a person can act on."""
    spread = float(np.ptp(y)) if len(y) else 0.0
    verdict = ("ranks mixtures well" if f.spearman >= 0.8 else "ranks mixtures roughly" if f.spearman >= 0.5
               else "does not rank mixtures reliably: add runs, or train the proxies longer")
    return (f"{f.name}: out-of-fold Spearman {f.spearman:.2f} ({verdict}); its top-ranked run is {f.regret:.4f} from the "
            f"best observed target (the targets span {spread:.4f}).")


def propose_mixture(directory: Path) -> dict:
    manifest = plan_lib.load_manifest(directory)
    sweep = _sweep(manifest)
    fitted = read_json(Path(directory) / "fit.json") if (Path(directory) / "fit.json").is_file() \
        else fit(directory)
    table = collect(directory, write=False)
    rows, W, y = _training_data(manifest, table)
    if list(rows["id"]) != fitted["runs"]:  # more runs finished since: fit again
        fitted = fit(directory)
    chosen = fitted["chosen"]
    surrogate = fit_lib.fit_surrogates(W, y, (chosen,), sweep.fit.folds, sweep.target.maximize, sweep.seed)[chosen]
    prior, lower, upper = (np.asarray(manifest[k]) for k in ("prior", "lower", "upper"))
    max_kl = float(kl_divergence(W, prior).max()) if sweep.propose.within_observed else None
    proposal = propose(surrogate, prior, lower, upper, sweep.propose.kl, sweep.target.maximize,
                       sweep.propose.samples, sweep.seed, max_kl)
    result = {"model": chosen, **proposal.to_dict(manifest["units"]),
              "prior": dict(zip(manifest["units"], prior.tolist()))}
    atomic_write_json(Path(directory) / "proposal.json", result)
    shown = Table(title=f"Proposed mixture ({chosen}; predicted target {proposal.predicted:.4f} ± {proposal.std:.4f}, "
                        f"KL to the prior {proposal.kl:.3f})")
    for column in ("unit", "proposed", "prior"):
        shown.add_column(column, justify="left" if column == "unit" else "right")
    for unit, w, p in zip(manifest["units"], proposal.weights, prior):
        shown.add_row(unit, f"{w:.3f}", f"{p:.3f}")
    console.print(shown)
    return result


def _baseline(manifest: dict, label: str) -> dict[str, float]:
    """The uniform or examples-proportional mixture over the units."""
    from jit_tune.sweep.space import prior_weights

    sizes = np.asarray([np.inf if s is None else s for s in manifest["sizes"]])
    weights = prior_weights(label, sizes, manifest["config"]["space"]["cap"])
    return dict(zip(manifest["units"], weights.tolist()))


def plan_confirm(directory: Path) -> list[dict]:
    """Add the confirmation runs to the manifest (once): the proposal and each baseline,
    with the confirmation seeds."""
    manifest = plan_lib.load_manifest(directory)
    sweep = _sweep(manifest)
    proposal = read_json(Path(directory) / "proposal.json")
    mixtures = {"proposed": proposal["weights"], **{b: _baseline(manifest, b) for b in sweep.confirm.baselines}}
    existing = {r["id"]: r for r in manifest["runs"] if r["kind"] == "confirm"}
    for label, mixture in mixtures.items():
        for seed in sweep.confirm.seeds:
            run_id = f"confirm-{label}-s{seed}"
            if run_id in existing:
                if label == "proposed" and existing[run_id]["mixture"] != mixture:
                    raise ConfigError(f"{directory}: {run_id} was planned with another proposal; confirm a new "
                                      "proposal in a new sweep directory")
                continue
            workdir = (Path(directory) / "runs" / run_id).absolute()
            manifest["runs"].append({"id": run_id, "kind": "confirm", "label": label, "seed": seed,
                                     "mixture": mixture, "workdir": str(workdir),
                                     "argv": plan_lib.run_argv(sweep, workdir, seed, mixture,
                                                               extra=tuple(sweep.confirm.overrides))})
    plan_lib.save_manifest(directory, manifest)
    return [r for r in manifest["runs"] if r["kind"] == "confirm"]


def confirm(directory: Path, processes: int = 1, dry_run: bool = False) -> int:
    plan_confirm(directory)
    code = run_local(directory, processes, "confirm", dry_run)
    if dry_run or code:
        return code
    return 0 if compare(directory) is not None else 1


def compare(directory: Path) -> pd.DataFrame | None:
    """Predicted against actual for the confirmation runs (confirm.json)."""
    manifest = plan_lib.load_manifest(directory)
    sweep = _sweep(manifest)
    proposal = read_json(Path(directory) / "proposal.json")
    table = collect(directory)
    rows = table[table["kind"] == "confirm"][["label", "seed", "status", "target"]].copy()
    rows["predicted"] = np.where(rows["label"] == "proposed", proposal["predicted"], np.nan)
    means = rows.groupby("label")["target"].mean()
    better = (lambda a, b: a > b) if sweep.target.maximize else (lambda a, b: a < b)
    verdicts = {b: bool(better(means.get("proposed", np.nan), means.get(b, np.nan))) for b in sweep.confirm.baselines}
    result = {"target": manifest["config"]["target"]["metrics"], "maximize": sweep.target.maximize,
              "predicted": proposal["predicted"], "means": means.to_dict(), "beats": verdicts,
              "runs": rows.to_dict("records")}
    atomic_write_json(Path(directory) / "confirm.json", result)
    shown = Table(title="Confirmation: the proposal against the baselines, same seeds")
    for column in ("mixture", "seeds", "target (mean)", "per seed"):
        shown.add_column(column, justify="left" if column == "mixture" else "right")
    for label, group in rows.groupby("label", sort=False):
        shown.add_row(label, str(len(group)), f"{group['target'].mean():.4f}",
                      ", ".join("-" if pd.isna(t) else f"{t:.4f}" for t in group["target"]))
    console.print(shown)
    console.print(f"predicted {proposal['predicted']:.4f} ± {proposal['std']:.4f}, actual "
                  f"{means.get('proposed', float('nan')):.4f}; " + "; ".join(
                      f"{'beats' if won else 'does not beat'} {b}" for b, won in verdicts.items()))
    return rows


def report(directory: Path) -> tuple[Path, Path]:
    from jit_tune.sweep.report import write_report

    manifest = plan_lib.load_manifest(directory)
    sweep = _sweep(manifest)
    table = collect(directory)
    read = lambda name: read_json(Path(directory) / name) if (Path(directory) / name).is_file() else None  # noqa: E731
    fitted, proposal, confirmed = read("fit.json"), read("proposal.json"), read("confirm.json")
    confirm_table = pd.DataFrame(confirmed["runs"]) if confirmed else None
    target = " + ".join(f"{w:g} x {c}" for c, w in manifest["config"]["target"]["metrics"].items())
    paths = write_report(Path(directory), table, manifest["units"], target, sweep.target.maximize,
                         fitted["models"] if fitted else {}, fitted["chosen"] if fitted else None,
                         proposal, dict(zip(manifest["units"], manifest["prior"])), confirm_table,
                         title=f"Mixture sweep {manifest['name']}")
    console.print(f"wrote {paths[0]} and {paths[1]}")
    return paths
