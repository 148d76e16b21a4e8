"""Surrogates of a sweep's target y (one number per finished run) as a function of the
mixture weights W [runs, units], each with out-of-fold trust figures.

  log_linear  the Data Mixing Law (Ye et al. 2024): y = c + k * exp(sum_j t_j w_j), fitted
              by least squares with a small L2 penalty on t (see LogLinear)
  lightgbm    gradient-boosted trees sized for tiny data (RegMix's surrogate)
  linear      ridge regression on the weights: the baseline the others must beat

Trust figures come from cross-validation (leave-one-out by default): every run's
out-of-fold prediction is made by a model that never saw that run. From them: Spearman's
rho (does the surrogate rank mixtures right?), RMSE, and regret@1 (how far, in target
units, the run the surrogate ranks first is from the best observed run). The fold models
are kept: the spread of their predictions is the uncertainty of a prediction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import lightgbm
import numpy as np
from scipy import optimize, stats
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, LeaveOneOut

from jit_tune.sweep.config import MODELS  # ("log_linear", "lightgbm", "linear"): one list for config and fit

MIN_RUNS = 4


class LogLinear:
    """y = c + k * exp(sum_j t_j w_j), the Data Mixing Law of Ye et al. (2024).

    Fitted by scipy.optimize.least_squares on residuals scaled by y's spread, plus the
    extra residuals sqrt(l2) * t: an L2 penalty that keeps 16-30 points from chasing noise
    with large exponents. Because the weights sum to 1, adding a constant to every t_j is
    the same as scaling k, so the penalty also picks the representative with sum(t) = 0
    (k absorbs the common part). Four starts (either sign of k; t from a regression of
    log|y - c| on w, or t = 0) are tried briefly and the cheapest is run to convergence.
    """

    def __init__(self, l2: float = 1e-3):
        self.l2 = l2

    @staticmethod
    def _curve(p: np.ndarray, W: np.ndarray) -> np.ndarray:
        # Clipped exponent: a wild trial step must not overflow to inf/nan mid-optimization.
        return p[0] + p[1] * np.exp(np.clip(W @ p[2:], -50.0, 50.0))

    def fit(self, W: np.ndarray, y: np.ndarray) -> "LogLinear":
        span = float(np.ptp(y)) or max(abs(float(np.mean(y))), 1.0)
        # Mean-square data term in units of y's spread: the penalty then weighs the same
        # whatever the target's scale or the number of runs.
        denominator = (float(np.std(y)) or span) * math.sqrt(len(y))
        sqrt_l2 = math.sqrt(self.l2)

        def residuals(p: np.ndarray) -> np.ndarray:
            return np.concatenate([(self._curve(p, W) - y) / denominator, sqrt_l2 * p[2:]])

        def jacobian(p: np.ndarray) -> np.ndarray:  # analytic: 5-10x fewer curve evaluations
            e = np.exp(np.clip(W @ p[2:], -50.0, 50.0))
            data = np.column_stack([np.ones(len(y)), e, p[1] * e[:, None] * W]) / denominator
            penalty = np.hstack([np.zeros((len(p) - 2, 2)), sqrt_l2 * np.eye(len(p) - 2)])
            return np.vstack([data, penalty])

        def solve(start: np.ndarray, evaluations: int) -> optimize.OptimizeResult:
            return optimize.least_squares(residuals, start, jac=jacobian, method="trf", max_nfev=evaluations)

        # A short run from every start, then the cheapest one run to convergence: a start
        # with the wrong sign of k drifts towards the linear limit (|c|, |k| -> inf, t -> 0)
        # without ever converging, and would otherwise spend the whole budget.
        best = min((solve(start, 30) for start in self._starts(W, y, span)), key=lambda r: r.cost)
        best = min(best, solve(best.x, 1000), key=lambda r: r.cost)
        self.params_ = best.x
        self.c_, self.k_, self.t_ = float(best.x[0]), float(best.x[1]), best.x[2:].copy()
        return self

    @staticmethod
    def _starts(W: np.ndarray, y: np.ndarray, span: float) -> list[np.ndarray]:
        starts = []
        for sign in (1.0, -1.0):  # y rising with the exponent (k > 0, c below the data) or falling
            c = y.min() - 0.1 * span if sign > 0 else y.max() + 0.1 * span
            # Then log(sign * (y - c)) = log|k| + t.w is linear in w: least squares gives t,
            # and centring t moves its mean into log|k| (the weights sum to 1).
            t = np.linalg.lstsq(W, np.log(sign * (y - c)), rcond=None)[0]
            starts.append(np.concatenate([[c, sign * math.exp(t.mean())], t - t.mean()]))
            # And the plain start: c a span outside the data, t = 0 (a flat curve at y's mean).
            starts.append(np.concatenate([[y.mean() - sign * span, sign * span], np.zeros(W.shape[1])]))
        return starts

    def predict(self, W: np.ndarray) -> np.ndarray:
        return self._curve(self.params_, np.asarray(W, float))


def make_model(name: str, seed: int = 0) -> Any:
    """A fresh, unfitted surrogate with .fit(W, y) and .predict(W)."""
    if name == "log_linear":
        return LogLinear()
    if name == "lightgbm":
        # Sized for 16-100 points: shallow trees, leaves of 2, no bagging (it only adds noise
        # at this size), single-threaded and seeded so every fit is reproducible.
        return lightgbm.LGBMRegressor(
            n_estimators=300, learning_rate=0.05, num_leaves=4, min_child_samples=2, min_data_in_bin=1,
            subsample=1.0, colsample_bytree=1.0, deterministic=True, force_row_wise=True,
            random_state=seed, n_jobs=1, verbose=-1)
    if name == "linear":
        return Ridge(alpha=1e-3)
    raise ValueError(f"unknown surrogate {name!r}; expected one of {MODELS}")


@dataclasses.dataclass
class SurrogateFit:
    name: str
    oof: np.ndarray  # out-of-fold prediction of every run, in run order
    spearman: float  # of oof vs y; nan when either is constant
    rmse: float  # of oof vs y
    regret: float  # regret@1, in target units (>= 0)
    folds: int  # cross-validation folds (n for leave-one-out)
    model: Any = dataclasses.field(repr=False)  # fitted on every run: what predict() uses
    fold_models: list = dataclasses.field(repr=False)

    @property
    def n(self) -> int:
        return len(self.oof)

    def predict(self, W: np.ndarray) -> np.ndarray:
        """Predictions [m] for mixtures W [m, k] (or one mixture [k])."""
        return np.asarray(self.model.predict(np.atleast_2d(np.asarray(W, float))), float)

    def predict_std(self, W: np.ndarray) -> np.ndarray:
        """The spread (standard deviation) of the fold models' predictions [m]: how much a
        prediction moves when a fold of the runs is left out (a jackknife-style spread,
        uncalibrated: it ranks the uncertainty of points, it is not a confidence interval)."""
        W = np.atleast_2d(np.asarray(W, float))
        return np.std([m.predict(W) for m in self.fold_models], axis=0)

    def summary(self) -> dict:
        def num(x: float) -> float | None:  # JSON has no nan
            return None if not math.isfinite(x) else float(x)
        return {"name": self.name, "spearman": num(self.spearman), "rmse": num(self.rmse),
                "regret": num(self.regret), "n": self.n, "folds": self.folds}


def regret_at_1(y: np.ndarray, scores: np.ndarray, maximize: bool = True) -> float:
    """|best observed y - y of the run that `scores` rank first|: 0 when the surrogate's
    top run is the best run, else the target lost by trusting it."""
    y, scores = np.asarray(y, float), np.asarray(scores, float)
    pick = int(np.argmax(scores) if maximize else np.argmin(scores))
    best = y.max() if maximize else y.min()
    return float(abs(best - y[pick]))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # undefined, and scipy would warn
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def fit_surrogates(W: np.ndarray, y: np.ndarray, models: Sequence[str] = MODELS, folds: int = 0,
                   maximize: bool = True, seed: int = 0) -> dict[str, SurrogateFit]:
    """Fit each of `models` on (W, y) with out-of-fold trust figures. folds=0: leave one
    out; otherwise shuffled KFold(folds) seeded with `seed`."""
    W, y = np.asarray(W, float), np.asarray(y, float)
    if W.ndim != 2 or y.ndim != 1 or len(W) != len(y):
        raise ValueError(f"expected weights [runs, units] and one target per run; got {W.shape} and {y.shape}")
    bad = int((~np.isfinite(y)).sum())
    if bad:
        raise ValueError(f"{bad} of {len(y)} runs have a non-finite target; drop unfinished or failed runs first")
    if not np.isfinite(W).all():
        raise ValueError("the mixture weights have non-finite values")
    if len(y) < MIN_RUNS:
        raise ValueError(f"only {len(y)} runs: fitting a surrogate needs at least {MIN_RUNS} finished runs")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown surrogates {unknown}; expected some of {MODELS}")
    if folds < 0 or folds == 1 or folds > len(y):
        raise ValueError(f"folds = {folds}: expected 0 (leave one out) or 2..{len(y)} (the number of runs)")
    splitter = LeaveOneOut() if folds == 0 else KFold(folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(W))

    fits = {}
    for name in models:
        oof, fold_models = np.empty(len(y)), []
        for train, test in splits:
            model = make_model(name, seed).fit(W[train], y[train])
            oof[test] = model.predict(W[test])
            fold_models.append(model)
        model = make_model(name, seed).fit(W, y)
        fits[name] = SurrogateFit(
            name=name, oof=oof, spearman=_spearman(oof, y), rmse=float(np.sqrt(np.mean((oof - y) ** 2))),
            regret=regret_at_1(y, oof, maximize), folds=len(splits), model=model, fold_models=fold_models)
    return fits


def best_model(fits: dict[str, SurrogateFit]) -> str:
    """The surrogate with the highest out-of-fold Spearman (nan counts as lowest); ties go
    to the lower RMSE."""
    def key(name: str) -> tuple[float, float]:
        rho = fits[name].spearman
        return (rho if math.isfinite(rho) else -math.inf, -fits[name].rmse)
    return max(fits, key=key)
