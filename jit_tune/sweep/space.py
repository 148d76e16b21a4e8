"""The mixtures a sweep tries: weights over its units (mixture entries: tasks or groups),
sampled deterministically from the sweep's seed.

  dirichlet      `points` samples of Dir(concentration * n * prior) (RegMix, OLMix)
  grid           every combination of the listed weights of the units in space.grid
  leave_one_out  the prior, and the prior without each unit in turn
  task_count     FLAN's ablation: for each count k in space.counts (default 1, 2, 4, ...),
                 `points` random sets of k units, weighted by the prior within the set

Constraints bound every unit's weight: min_weight and max_weight, and max_epochs caps a
unit's weight so that the planned steps read its records at most that many times over
(weight <= max_epochs * size / examples drawn). A mixture outside the bounds is
redrawn (dirichlet) or left out (the others), and the plan says how many were.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from ml_collections import ConfigDict

from jit_tune.config import ConfigError
from jit_tune.data.registry import TaskRegistry


def unit_sizes(run_config: ConfigDict, registry: TaskRegistry, units: list[str]) -> np.ndarray:
    """Training examples of each unit (a group's members summed; inf for generated tasks)."""
    def size(name: str) -> float:
        if name in registry.groups:
            return sum(size(t) for t in registry.groups[name])
        task = registry.tasks[name]
        return float("inf") if not hasattr(task, "size") else float(task.size("train"))
    return np.asarray([size(u) for u in units])


def prior_weights(kind: str, sizes: np.ndarray, cap: float) -> np.ndarray:
    """Uniform, or examples-proportional with a cap (SeqIO/FLAN's rule)."""
    if kind == "uniform":
        return np.full(len(sizes), 1 / len(sizes))
    capped = np.minimum(sizes, cap if cap > 0 else np.inf)
    if np.isinf(capped).any():
        raise ConfigError("sweep.space.prior = 'examples' with generated (unbounded) tasks: set sweep.space.cap")
    return capped / capped.sum()


def weight_bounds(sweep: ConfigDict, sizes: np.ndarray, examples_drawn: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds of each unit's weight."""
    c = sweep.constraints
    lower = np.full(len(sizes), c.min_weight)
    upper = np.full(len(sizes), c.max_weight)
    if c.max_epochs > 0:
        upper = np.minimum(upper, np.where(np.isinf(sizes), 1.0, c.max_epochs * sizes / max(examples_drawn, 1.0)))
    if lower.sum() > 1 + 1e-9 or upper.sum() < 1 - 1e-9 or (lower > upper).any():
        raise ConfigError(f"sweep.constraints: no mixture satisfies them (weights between {lower.round(4)} and "
                          f"{upper.round(4)} summing to 1)")
    return lower, upper


def _within(w: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> bool:
    return bool(np.all(w >= lower - 1e-9) and np.all(w <= upper + 1e-9))


def sample(sweep: ConfigDict, units: list[str], prior: np.ndarray, lower: np.ndarray,
           upper: np.ndarray) -> tuple[list[np.ndarray], int]:
    """The mixtures to try (weights over `units`, summing to 1), and how many candidates
    the constraints left out."""
    space, rng = sweep.space, np.random.default_rng(sweep.seed)
    n = len(units)
    if space.kind == "dirichlet":
        alpha, points, tries = space.concentration * n * prior, [], 0
        while len(points) < space.points:
            tries += 1
            if tries > 10_000 * space.points:
                raise ConfigError("sweep.constraints: Dirichlet samples almost never satisfy them; widen them")
            w = rng.dirichlet(np.maximum(alpha, 1e-3))
            if _within(w, lower, upper):
                points.append(w)
        return points, tries - len(points)
    if space.kind == "grid":
        unknown = sorted(set(space.grid) - set(units))
        if unknown:
            raise ConfigError(f"sweep.space.grid: {unknown} are not swept units; units: {units}")
        axes = [list(space.grid[u]) if u in space.grid else [prior[i]] for i, u in enumerate(units)]
        candidates = [np.asarray(c, float) for c in itertools.product(*axes) if sum(c) > 0]
    elif space.kind == "leave_one_out":
        candidates = [prior] + [np.where(np.arange(n) == i, 0.0, prior) for i in range(n)]
    else:  # task_count
        counts = list(space.counts) or [2**k for k in range(int(math.log2(n)) + 1)] + ([n] if n & (n - 1) else [])
        candidates = []
        for k in counts:
            for _ in range(space.points):
                chosen = rng.choice(n, size=min(k, n), replace=False)
                candidates.append(np.where(np.isin(np.arange(n), chosen), prior, 0.0))
    normalized = [c / c.sum() for c in candidates]
    kept = [w for w in normalized if _within(w, lower, upper)]
    unique = list({tuple(np.round(w, 12)): w for w in kept}.values())
    if not unique:
        raise ConfigError(f"sweep.space ({space.kind}): every candidate mixture breaks sweep.constraints")
    return unique, len(normalized) - len(kept)
