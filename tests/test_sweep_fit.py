"""Sweep surrogates (fit.py) and the proposal optimizer (propose.py): pure numpy, no JAX."""

import dataclasses
import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from jit_tune.sweep import config as sweep_config
from jit_tune.sweep.fit import MODELS, best_model, fit_surrogates, regret_at_1
from jit_tune.sweep.propose import kl_divergence, project, propose

# A Data Mixing Law over 4 units: a loss-like target (lower is better).
T_TRUE, C_TRUE, K_TRUE = np.array([1.5, -1.0, 0.5, -0.8]), 1.0, 0.5


def law(W: np.ndarray) -> np.ndarray:
    return C_TRUE + K_TRUE * np.exp(W @ T_TRUE)


@pytest.fixture(scope="module")
def law_data():
    rng = np.random.default_rng(0)
    W = rng.dirichlet(np.ones(4), size=24)
    return W, law(W) + rng.normal(0, 0.01, size=24)


@pytest.fixture(scope="module")
def law_fits(law_data):
    W, y = law_data
    return fit_surrogates(W, y, maximize=False)


def test_models_match_the_config():
    assert MODELS == sweep_config.MODELS == ("log_linear", "lightgbm", "linear")


def test_log_linear_recovers_the_law(law_data, law_fits):
    W, y = law_data
    fit = law_fits["log_linear"]
    assert fit.spearman > 0.9
    assert fit.regret == pytest.approx(regret_at_1(y, fit.oof, maximize=False))
    fresh = np.random.default_rng(1).dirichlet(np.ones(4), size=200)
    span = np.ptp(law(fresh))
    assert np.abs(fit.predict(W) - law(W)).max() < 0.03 * span
    assert np.abs(fit.predict(fresh) - law(fresh)).mean() < 0.02 * span
    # The surrogate's best mixture is the law's best one: all weight on the unit with the lowest t.
    assert np.argmin(fit.predict(np.eye(4))) == np.argmin(T_TRUE)


def test_every_model_gives_finite_figures(law_data, law_fits):
    W, _ = law_data
    assert best_model(law_fits) == "log_linear"
    for name, fit in law_fits.items():
        assert fit.name == name and fit.oof.shape == (24,) and np.isfinite(fit.oof).all()
        assert np.isfinite([fit.spearman, fit.rmse, fit.regret]).all() and fit.regret >= 0
        assert fit.predict(W[:5]).shape == (5,) and fit.predict(W[0]).shape == (1,)
        std = fit.predict_std(W[:5])
        assert std.shape == (5,) and np.isfinite(std).all() and (std >= 0).all()
        summary = fit.summary()
        assert summary == json.loads(json.dumps(summary))
        assert summary["n"] == 24 and summary["folds"] == 24 and summary["name"] == name


def test_regret_at_1():
    y = np.array([0.1, 0.5, 0.3, 0.9])
    assert regret_at_1(y, np.array([0, 1, 2, 3.0])) == 0.0  # ranks the best run first
    assert regret_at_1(y, np.array([0, 3, 2, 1.0])) == pytest.approx(0.4)  # picks 0.5, best is 0.9
    assert regret_at_1(y, np.array([3, 2, 1, 0.0]), maximize=False) == pytest.approx(0.8)  # picks 0.9, best 0.1
    assert regret_at_1(y, y, maximize=False) == 0.0


def test_leave_one_out_predicts_each_run_without_it():
    rng = np.random.default_rng(2)
    W = rng.dirichlet(np.ones(3), size=10)
    y = W @ np.array([1.0, 2.0, 3.0])
    y[0] = 100.0  # an outlier: any model that saw it is pulled far towards it
    fit = fit_surrogates(W, y, models=["linear"])["linear"]
    assert fit.oof.shape == (10,) and fit.folds == 10 and len(fit.fold_models) == 10
    for i in range(10):
        others = np.arange(10) != i
        alone = Ridge(alpha=1e-3).fit(W[others], y[others]).predict(W[i:i + 1])[0]
        assert fit.oof[i] == pytest.approx(alone)
    assert abs(fit.oof[0] - W[0] @ [1.0, 2.0, 3.0]) < 1.0  # never saw the outlier
    assert fit.predict(W[0])[0] > fit.oof[0] + 10  # the full-data model did


def test_kfold_and_errors(law_data):
    W, y = law_data
    fits = fit_surrogates(W, y, models=["linear", "lightgbm"], folds=4, seed=3)
    assert set(fits) == {"linear", "lightgbm"}
    assert fits["linear"].folds == 4 and fits["linear"].oof.shape == (24,) and len(fits["linear"].fold_models) == 4
    again = fit_surrogates(W, y, models=["lightgbm"], folds=4, seed=3)["lightgbm"]
    np.testing.assert_array_equal(again.oof, fits["lightgbm"].oof)  # deterministic
    with pytest.raises(ValueError, match="only 3 runs.*at least 4"):
        fit_surrogates(W[:3], y[:3])
    bad = y.copy()
    bad[[1, 5]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match="2 of 24 runs have a non-finite target"):
        fit_surrogates(W, bad)
    with pytest.raises(ValueError, match="unknown surrogates"):
        fit_surrogates(W, y, models=["gp"])


def test_best_model_breaks_ties_by_rmse(law_fits):
    a, b = law_fits["linear"], law_fits["lightgbm"]
    fits = {"a": dataclasses.replace(a, spearman=0.8, rmse=0.2), "b": dataclasses.replace(b, spearman=0.8, rmse=0.1),
            "c": dataclasses.replace(b, spearman=float("nan"), rmse=0.0)}
    assert best_model(fits) == "b"


# --- propose ---

class Quadratic:
    """A stand-in surrogate: -|w - peak|^2 (maximum at peak), or its negation."""

    def __init__(self, peak, sign=1.0):
        self.peak, self.sign = np.asarray(peak), sign

    def predict(self, W):
        return -self.sign * np.sum((np.atleast_2d(W) - self.peak) ** 2, axis=-1)

    def predict_std(self, W):
        return np.full(len(np.atleast_2d(W)), 0.01)


PEAK = np.array([0.1, 0.2, 0.3, 0.4])
UNIFORM = np.full(4, 0.25)
OPEN = (np.zeros(4), np.ones(4))


def test_project_lands_in_the_box_and_is_idempotent():
    rng = np.random.default_rng(4)
    lower, upper = np.array([0.05, 0.0, 0.1, 0.0]), np.array([0.5, 0.3, 0.6, 0.4])
    points = np.vstack([rng.normal(0, 1, (200, 4)), rng.dirichlet(np.ones(4), 50), np.eye(4)])
    projected = project(points, lower, upper)
    assert projected.shape == points.shape
    assert (projected >= lower - 1e-12).all() and (projected <= upper + 1e-12).all()
    np.testing.assert_allclose(projected.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(project(projected, lower, upper), projected, atol=1e-12)
    np.testing.assert_allclose(project(PEAK, *OPEN), PEAK, atol=1e-12)  # already feasible: unchanged
    # The Euclidean projection: no feasible point is closer (checked against many).
    feasible = project(rng.dirichlet(np.ones(4), 2000), lower, upper)
    for p, q in zip(points[:20], projected[:20]):
        assert np.linalg.norm(p - q) <= np.linalg.norm(feasible - p, axis=1).min() + 1e-9
    with pytest.raises(ValueError, match="sum to 1"):
        project(PEAK, np.full(4, 0.3), np.ones(4))


def test_propose_finds_the_optimum():
    proposal = propose(Quadratic(PEAK), UNIFORM, *OPEN, samples=5000)
    np.testing.assert_allclose(proposal.weights, PEAK, atol=1e-4)
    assert proposal.predicted == pytest.approx(0.0, abs=1e-7)
    assert proposal.std == pytest.approx(0.01) and proposal.objective == pytest.approx(proposal.predicted)
    assert proposal.kl == pytest.approx(kl_divergence(PEAK, UNIFORM), abs=1e-3)
    again = propose(Quadratic(PEAK), UNIFORM, *OPEN, samples=5000)
    np.testing.assert_array_equal(again.weights, proposal.weights)  # deterministic
    assert set(proposal.to_dict(list("abcd"))) == {"weights", "predicted", "std", "kl", "objective"}
    assert list(proposal.to_dict(list("abcd"))["weights"]) == list("abcd")


def test_propose_minimizes():
    proposal = propose(Quadratic(PEAK, sign=-1.0), UNIFORM, *OPEN, maximize=False, samples=5000)
    np.testing.assert_allclose(proposal.weights, PEAK, atol=1e-4)


def test_propose_respects_bounds_that_cut_the_optimum():
    lower, upper = np.array([0.15, 0.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.3])
    proposal = propose(Quadratic(PEAK), UNIFORM, lower, upper, samples=5000)
    w = proposal.weights
    assert (w >= lower - 1e-9).all() and (w <= upper + 1e-9).all() and w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(0.15, abs=1e-6) and w[3] == pytest.approx(0.3, abs=1e-6)
    # For a distance objective the constrained optimum is the projection of the peak.
    np.testing.assert_allclose(w, project(PEAK, lower, upper), atol=1e-4)


def test_kl_pulls_towards_the_prior():
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    peak = np.array([0.05, 0.15, 0.3, 0.5])
    divergences = [propose(Quadratic(peak), prior, *OPEN, kl=kl, samples=5000).kl for kl in (0.0, 0.1, 1.0)]
    assert divergences[0] > divergences[1] > divergences[2] > 0
    strong = propose(Quadratic(peak), prior, *OPEN, kl=1e6, samples=5000)
    np.testing.assert_allclose(strong.weights, prior, atol=1e-6)
    assert strong.kl == pytest.approx(0.0, abs=1e-9)


def test_propose_on_a_fitted_surrogate(law_fits):
    # The law is lowest with all weight on the unit with the smallest exponent; bound it at 0.6.
    lower, upper = np.zeros(4), np.array([0.6, 0.6, 0.6, 0.6])
    proposal = propose(law_fits["log_linear"], UNIFORM, lower, upper, maximize=False, samples=4000)
    assert proposal.weights[1] == pytest.approx(0.6, abs=1e-3)
    assert proposal.predicted < law_fits["log_linear"].predict(UNIFORM)[0]
    assert proposal.std >= 0 and np.isfinite(proposal.std)
