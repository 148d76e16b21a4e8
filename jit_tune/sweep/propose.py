"""The mixture a surrogate predicts is best, within the sweep's bounds.

    maximize:  predicted(w) - kl * KL(w || prior)
    minimize:  predicted(w) + kl * KL(w || prior)
    over       {w : lower <= w <= upper, sum(w) = 1}

kl > 0 pulls the proposal towards the prior (OLMix-style regularization): a surrogate
fitted on a few dozen runs is least trustworthy far from where the runs were.

The search is a random one followed by a local polish: the prior, the unit vertices and
`samples` Dirichlet draws around the prior at several concentrations (plus uniform points
of the simplex) are projected onto the bounds and scored in batches; the best is polished
with SLSQP and kept if that helps (tree surrogates are piecewise constant, so the random
search does the work for them). Everything is deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
from scipy import optimize
from scipy.special import xlogy

CONCENTRATIONS = (0.5, 1.0, 4.0, 16.0)  # Dirichlet alpha = c * k * prior; 1: spread out, 16: near the prior
BATCH = 4096


class Surrogate(Protocol):  # what propose needs of a SurrogateFit
    def predict(self, W: np.ndarray) -> np.ndarray: ...
    def predict_std(self, W: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class Proposal:
    weights: np.ndarray  # [k], within the bounds, summing to 1
    predicted: float  # the surrogate's prediction of the target
    std: float  # the surrogate's predict_std at the weights
    kl: float  # KL(weights || prior), nats
    objective: float  # predicted -/+ kl * KL, in target units (what was maximized/minimized)

    def to_dict(self, units: list[str]) -> dict:
        return {"weights": {u: float(w) for u, w in zip(units, self.weights)}, "predicted": float(self.predicted),
                "std": float(self.std), "kl": float(self.kl), "objective": float(self.objective)}


def kl_divergence(w: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """KL(w || prior) in nats along the last axis; 0 * log(0 / p) = 0 (prior > 0)."""
    w = np.maximum(w, 0.0)  # SLSQP may step a hair outside its bounds
    return np.sum(xlogy(w, w) - xlogy(w, prior), axis=-1)


def project(w: np.ndarray, lower: np.ndarray, upper: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Euclidean projection of w (one [k] or many [m, k]) onto {lower <= w <= upper,
    sum(w) = 1}. The projection is clip(w - s, lower, upper) for the shift s that makes
    it sum to 1 (the KKT conditions); the sum falls as s grows, so bisection finds s."""
    w = np.asarray(w, float)
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    if lower.sum() > 1 + 1e-9 or upper.sum() < 1 - 1e-9 or (lower > upper).any():
        raise ValueError(f"no weights between {lower} and {upper} sum to 1")
    W = np.atleast_2d(w)
    lo = (W - upper).min(axis=1, keepdims=True)  # at this shift every weight is at its upper bound
    hi = (W - lower).max(axis=1, keepdims=True)  # and at this one at its lower bound
    for _ in range(iterations):  # 100 halvings: far below float precision for any start
        mid = (lo + hi) / 2
        too_big = np.clip(W - mid, lower, upper).sum(axis=1, keepdims=True) > 1
        lo, hi = np.where(too_big, mid, lo), np.where(too_big, hi, mid)
    out = np.clip(W - (lo + hi) / 2, lower, upper)
    return out.reshape(w.shape)


def candidates(prior: np.ndarray, lower: np.ndarray, upper: np.ndarray, samples: int,
               rng: np.random.Generator) -> np.ndarray:
    """[m, k] mixtures within the bounds: the prior, the vertices, and random draws."""
    k = len(prior)
    groups = [rng.dirichlet(np.maximum(c * k * prior, 1e-3), size=samples // (len(CONCENTRATIONS) + 1))
              for c in CONCENTRATIONS]
    groups.append(rng.dirichlet(np.ones(k), size=samples - sum(len(g) for g in groups)))  # uniform on the simplex
    return project(np.vstack([prior[None], np.eye(k), *groups]), lower, upper)


def propose(fit: Surrogate, prior: np.ndarray, lower: np.ndarray, upper: np.ndarray, kl: float = 0.0,
            maximize: bool = True, samples: int = 20000, seed: int = 0, max_kl: float | None = None) -> Proposal:
    """The mixture that maximizes (minimizes) the surrogate's prediction -(+) kl * KL(w ||
    prior) within the bounds, and with `max_kl`, no further than that from the prior: a
    surrogate is known only where it was fitted, and its optimum outside that region is
    an extrapolation (the sweep passes the farthest proxy's divergence)."""
    prior, lower, upper = (np.asarray(a, float) for a in (prior, lower, upper))
    if not (prior.shape == lower.shape == upper.shape) or prior.ndim != 1:
        raise ValueError(f"prior, lower and upper must be [units]; got {prior.shape}, {lower.shape}, {upper.shape}")
    if (prior <= 0).any() or abs(prior.sum() - 1) > 1e-6:
        raise ValueError(f"the prior must be positive and sum to 1; got {prior}")
    sign = 1.0 if maximize else -1.0

    def score(W: np.ndarray) -> np.ndarray:  # higher is better, whichever the direction
        return sign * np.asarray(fit.predict(W), float) - kl * kl_divergence(W, prior)

    pool = candidates(prior, lower, upper, samples, np.random.default_rng(seed))
    if max_kl is not None:
        pool = pool[kl_divergence(pool, prior) <= max_kl]  # the prior itself always stays
    scores = np.concatenate([score(pool[i:i + BATCH]) for i in range(0, len(pool), BATCH)])
    best = pool[int(np.argmax(scores))]

    constraints = [{"type": "eq", "fun": lambda w: w.sum() - 1.0}]
    if max_kl is not None:
        constraints.append({"type": "ineq", "fun": lambda w: max_kl - kl_divergence(np.clip(w, 1e-12, 1), prior)})
    polished = optimize.minimize(lambda w: -score(w[None])[0], best, method="SLSQP", bounds=list(zip(lower, upper)),
                                 constraints=constraints, options={"maxiter": 200, "ftol": 1e-12})
    polished_w = project(polished.x, lower, upper)  # undo SLSQP's tiny bound/sum violations
    inside = max_kl is None or kl_divergence(polished_w, prior) <= max_kl + 1e-9
    if np.all(np.isfinite(polished_w)) and inside and score(polished_w[None])[0] > score(best[None])[0]:
        best = polished_w

    predicted = float(fit.predict(best[None])[0])
    divergence = float(kl_divergence(best, prior))
    return Proposal(weights=best, predicted=predicted, std=float(fit.predict_std(best[None])[0]), kl=divergence,
                    objective=predicted - sign * kl * divergence)
