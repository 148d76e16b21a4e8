"""A sweep is a config file like every config: `get_config()` returning a ConfigDict that
starts from `default_sweep_config()` and names the base run config, the search space
over the mixture, the constraints and the target (configs/sweep_tiny.py).

Every run of a sweep is an ordinary run of the base config (`base`, with `overrides`)
whose mixture entries named in `space.units` get the sampled weights and whose seed is
one of `seeds`; its workdir works with every verb.
"""

from __future__ import annotations

import ml_collections

from jit_tune.config import ConfigError, load_config, mistyped, update_from_saved

KINDS = ("dirichlet", "grid", "leave_one_out", "task_count")
PRIORS = ("uniform", "examples")
MODELS = ("log_linear", "lightgbm", "linear")


def default_sweep_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.name = "sweep"  # the runs' group id in their metrics (config.logging.group) and trackers
    s.seed = 0  # the plan (every mixture) is a function of this
    s.base = ""  # the run config every run starts from: "path.py[:variant]"
    s.overrides = ()  # --config.a.b=value for every run, e.g. a proxy's size and steps
    s.seeds = (0,)  # run seeds (config.seed) repeated at every point

    s.space = ml_collections.ConfigDict()
    s.space.kind = "dirichlet"  # dirichlet | grid | leave_one_out | task_count
    # The base mixture's entries (task or group names) whose weights are swept; (): every
    # entry with a rate > 0. Entries not swept keep their base rates (rates are relative).
    s.space.units = ()
    s.space.points = 16  # dirichlet: samples; task_count: subsets per count
    s.space.prior = "uniform"  # the prior weights: uniform, or examples-proportional (with space.cap)
    s.space.cap = 0  # examples-proportional cap on a unit's examples (0: none; needed for generated tasks)
    # Dirichlet concentration around the prior: alpha = concentration * len(units) * prior;
    # 1 spreads samples over the simplex, larger values stay near the prior.
    s.space.concentration = 1.0
    s.space.grid = ml_collections.ConfigDict()  # grid: unit -> (weights...); every combination
    s.space.counts = ()  # task_count: how many units to train on; (): 1, 2, 4, ... up to all

    s.constraints = ml_collections.ConfigDict()
    s.constraints.min_weight = 0.0  # of every swept unit (weights over the units sum to 1)
    s.constraints.max_weight = 1.0
    # At most this many passes over any unit's records at the planned steps (0: no limit);
    # generated tasks are never limited.
    s.constraints.max_epochs = 0.0

    s.target = ml_collections.ConfigDict()
    # Columns of the collected table (`sweep collect`) and their weights: a weighted sum
    # is the target, e.g. {"overall/unseen/held_in/score": 1.0}.
    s.target.metrics = ml_collections.ConfigDict({"overall/all/held_in/score": 1.0})
    s.target.maximize = True

    s.fit = ml_collections.ConfigDict()
    s.fit.models = MODELS  # surrogates fitted; each gets out-of-fold trust figures
    s.fit.folds = 0  # cross-validation folds for the trust figures (0: leave one out)

    s.propose = ml_collections.ConfigDict()
    s.propose.model = ""  # "": the model with the best out-of-fold Spearman
    s.propose.kl = 0.0  # regularization towards the prior: target - kl * KL(w || prior)
    s.propose.samples = 20000  # candidate mixtures searched
    # Stay within the region the proxies covered: no further from the prior (in KL) than
    # the farthest proxy mixture. A surrogate's optimum outside it is an extrapolation.
    s.propose.within_observed = True

    s.confirm = ml_collections.ConfigDict()
    s.confirm.seeds = (0, 1)
    s.confirm.baselines = ("uniform", "examples")  # trained beside the proposal, with the same seeds
    s.confirm.overrides = ()  # for the confirmation runs, after `overrides` (e.g. more steps)
    s.lock()
    for collection in (s.space.grid, s.target.metrics):
        collection.unlock()
    return s


def load_sweep(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Load a sweep config file (same rules as run configs: variants, overrides with
    --config.a.b=value, a typo'd key named with the closest one), validated."""
    return load_config(spec, overrides, validator=validate_sweep)


def sweep_from_dict(values: dict, source: str) -> ml_collections.ConfigDict:
    """A sweep config saved in a manifest, on today's defaults (fields it predates keep
    their defaults), validated."""
    sweep = default_sweep_config()
    update_from_saved(sweep, values, ("space.grid", "target.metrics"), source, "sweep")
    validate_sweep(sweep, source)
    return sweep


def validate_sweep(s: ml_collections.ConfigDict, path: str, sources: dict | None = None,
                   check_files: bool = True) -> None:
    problems = []

    def check(ok: bool, key: str, expected: str):
        if not ok:
            where = (sources or {}).get(key, path)
            problems.append(f"{where}: sweep.{key} = {_lookup(s, key)!r}: expected {expected}")

    # Types first: the checks below compare values, which a None or a string would break.
    for key, expected in mistyped(s, default_sweep_config(), ("space.grid", "target.metrics")):
        check(False, key, expected)
    if problems:
        raise ConfigError("invalid sweep config:\n  " + "\n  ".join(problems))
    check(bool(s.base), "base", "a run config file, path.py[:variant]")
    check(len(s.seeds) > 0 and all(isinstance(x, int) for x in s.seeds), "seeds", "one or more integer seeds")
    check(s.space.kind in KINDS, "space.kind", " | ".join(KINDS))
    check(s.space.prior in PRIORS, "space.prior", " | ".join(PRIORS))
    check(s.space.points > 0, "space.points", "a positive integer")
    check(s.space.concentration > 0, "space.concentration", "a positive number")
    check(s.space.kind != "grid" or len(s.space.grid) > 0, "space.grid", "unit -> (weights...) for kind grid")
    c = s.constraints
    check(0 <= c.min_weight <= c.max_weight <= 1, "constraints.min_weight", "0 <= min_weight <= max_weight <= 1")
    check(c.max_epochs >= 0, "constraints.max_epochs", "a number >= 0 (0: no limit)")
    check(len(s.target.metrics) > 0, "target.metrics", "at least one {column: weight}")
    check(set(s.fit.models) <= set(MODELS) and len(s.fit.models) > 0, "fit.models", f"some of {MODELS}")
    check(s.propose.model in ("",) + MODELS, "propose.model", f"'' or one of {MODELS}")
    check(s.propose.kl >= 0, "propose.kl", "a number >= 0")
    check(set(s.confirm.baselines) <= set(PRIORS), "confirm.baselines", f"some of {PRIORS}")
    if problems:
        raise ConfigError("invalid sweep config:\n  " + "\n  ".join(problems))


def _lookup(node, key: str):
    for part in key.split("."):
        node = node[part]
    return node
