"""Control variates: exactly unbiased (closed form, Gaussian teacher), and the variance drop.

With a fitted coefficient held fixed (`TimestepGuide.frozen`), the estimate is a polynomial in
``eps`` of low degree (the Gaussian teacher's residual is affine in ``eps``, the ``eps`` control
variate linear, the Stein term of `gaussian_baseline` cubic), so its expectation over ``eps`` is
exact by Gauss-Hermite quadrature (3 nodes a coordinate: exact to degree 5) or, for an affine
integrand, by antithetic pairs; over ``t`` it is piecewise constant in the timestep's uniform
(midpoints between the proposal's CDF breakpoints). Together: the exact expectation, compared
with the closed form ``c (x - m)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import carv_pyro as carv
from carv_pyro.infer.control_variates import (
    ControlVariateFit,
    SteinControlVariate,
    clean_gain,
    gaussian_baseline,
)
from carv_pyro.infer.samplers import AbstractNoiseSampler, RandomSource
from carv_pyro.objectives import eps_control_variate

from .analytic import MEAN, STD, T, expected_grad, grad_of, make_model, sds
from .seeds import seed

#: z-test threshold in standard errors (Bonferroni over the coordinates: a correct estimator
#: fails with probability below 1e-4 for any seed)
Z = 4.5
XI = torch.tensor([0.3, -0.5], dtype=torch.float64)


class FixedU(RandomSource):
    """Every timestep uniform is ``u``."""

    u = 0.5

    def uniform(self, shape, device="cpu"):
        return torch.full(shape, self.u, dtype=torch.float64)


class Nodes(AbstractNoiseSampler):
    """``eps`` fixed to ``value`` for every draw."""

    value = torch.zeros(2, dtype=torch.float64)

    def sample(self, layout, event_shape, dtype, device, source):
        return self.value.to(dtype).expand(tuple(layout.batch_shape) + tuple(event_shape)).clone()


def _t_intervals(guide, objective):
    q = guide.proposal_for("sds", objective)
    cdf = q._cdf_table(q.probs())
    pts = sorted({0.0, 1.0, *[float(v) for v in cdf if 0.0 < float(v) < 1.0]})
    return [(0.5 * (a + b), b - a) for a, b in zip(pts[:-1], pts[1:]) if b - a > 1e-15]


def _fit(objective, R, K, n_steps=30):
    """A `ControlVariateFit` trained on ``n_steps`` random steps of the model."""
    fit = ControlVariateFit(n_bins=8)
    model = make_model(objective, R, K, XI[:R])
    guide = carv.TimestepGuide(model, proposal="weighted", control_variates=fit, seed=seed(5))
    loss = carv.CARVLoss()
    for _ in range(n_steps):
        grad_of(loss, model, guide)
    assert fit.coefficients(objective).abs().sum() > 0
    return fit


def _stein_objective():
    objective = sds("sds")
    objective.control_variates += (
        SteinControlVariate(gaussian_baseline(float(MEAN.mean()), STD)),
        SteinControlVariate(clean_gain(1), diagonal=True),
    )
    return objective


@pytest.mark.parametrize("which", ["eps", "stein"])
def test_fitted_control_variates_are_exactly_unbiased(which):
    objective = sds("sds") if which == "eps" else _stein_objective()
    fit = _fit(objective, 1, 2)
    model = make_model(objective, 1, 1, XI[:1])
    noise = Nodes()
    source = FixedU()
    guide = carv.TimestepGuide(
        model, proposal="weighted", noise=noise, source=source, control_variates=fit
    )
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)  # probabilists': N(0, 1)
    weights = weights / math.sqrt(2 * math.pi)
    loss = carv.CARVLoss()
    total = torch.zeros(2, dtype=torch.float64)
    with guide.frozen():
        for i in range(3):
            for j in range(3):
                noise.value = torch.tensor([nodes[i], nodes[j]], dtype=torch.float64)
                for u, du in _t_intervals(guide, objective):
                    source.u = u
                    total += weights[i] * weights[j] * du * grad_of(loss, model, guide)
    torch.testing.assert_close(total, expected_grad(objective, XI[:1]), rtol=1e-9, atol=1e-12)


def test_exact_machinery_detects_a_control_variate_with_a_mean():
    """``eps + 1`` is not zero-mean: the same quadrature shows the bias it brings."""
    objective = sds("sds")
    objective.control_variates = (lambda batch: batch.eps + 1.0,)
    fit = _fit(objective, 1, 2)
    model = make_model(objective, 1, 2, XI[:1])
    source = FixedU()
    guide = carv.TimestepGuide(
        model, proposal="weighted", noise="antithetic", source=source, control_variates=fit
    )
    total = torch.zeros(2, dtype=torch.float64)
    with guide.frozen():
        for u, du in _t_intervals(guide, objective):
            source.u = u
            total += du * grad_of(carv.CARVLoss(), model, guide)
    assert not torch.allclose(total, expected_grad(objective, XI[:1]), rtol=1e-3)


def test_eps_control_variate_exact_with_antithetic_pairs():
    """Antithetic pairs average an affine integrand exactly: any eps, the exact expectation."""
    objective = sds("sds")
    fit = _fit(objective, 2, 2)
    model = make_model(objective, 2, 2, XI)
    source = FixedU(seed=seed(7))
    guide = carv.TimestepGuide(
        model, proposal="weighted", noise="antithetic", source=source, control_variates=fit
    )
    total = torch.zeros(2, dtype=torch.float64)
    with guide.frozen():
        for u, du in _t_intervals(guide, objective):
            source.u = u
            total += du * grad_of(carv.CARVLoss(), model, guide)
    torch.testing.assert_close(total, expected_grad(objective, XI), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("which", ["eps", "stein"])
def test_online_fit_is_unbiased_z_test(which):
    """While the fit learns, each step uses coefficients of earlier steps only: unbiased."""
    objective = sds("sds") if which == "eps" else _stein_objective()
    model = make_model(objective, 2, 4, XI)
    est = carv.Estimator(K=4, proposal="weighted", stratify="per_outer", control_variates=True)
    guide = est.guide(model, seed=seed(9))
    loss = carv.CARVLoss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(300)])
    z = (grads.mean(0) - expected_grad(objective, XI)) / (grads.std(0) / math.sqrt(len(grads)))
    assert z.abs().max() < Z, z


def test_fit_finds_the_closed_form_coefficient_and_cuts_the_variance():
    """For the Gaussian teacher ``eps_hat - eps = sigma alpha (x - m) / V + (sigma^2 / V - 1)
    eps`` with ``V = alpha^2 s^2 + sigma^2``: the best coefficient on ``eps`` is
    ``sigma^2 / V - 1`` and it removes the noise's share of the within variance. Per bin the fit
    converges to that coefficient's average over the bin (weighted by the draws' ``||eps||^2``,
    nearly uniform: within 0.03 after 200 steps of 64 draws), and the variance falls more than
    10x (closed form: the noise is over 95% of the residual's variance here)."""
    objective = sds("sds")
    fit = ControlVariateFit(n_bins=8, decay=1.0)
    model = make_model(objective, 2, 32, XI)
    guide = carv.TimestepGuide(model, stratify="per_outer", control_variates=fit, seed=seed(2))
    plain = carv.TimestepGuide(model, stratify="per_outer", seed=seed(3))
    loss = carv.CARVLoss()
    g_cv = torch.stack([grad_of(loss, model, guide) for _ in range(200)])[100:]
    g_plain = torch.stack([grad_of(loss, model, plain) for _ in range(100)])
    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a, s = objective.schedule.alpha(t, like=f64), objective.schedule.sigma(t, like=f64)
    best = s * s / (a * a * STD**2 + s * s) - 1.0
    bins = fit._bin_index(objective, "cpu")
    p = objective.prior.probs()
    want = torch.stack([(p * best)[bins == b].sum() / p[bins == b].sum() for b in range(8)])
    torch.testing.assert_close(fit.coefficients(objective)[:, 0], want, atol=0.03, rtol=0)
    var = lambda g: float(((g - expected_grad(objective, XI)) ** 2).sum(1).mean())  # noqa: E731
    assert var(g_plain) / var(g_cv) > 10


def test_declared_but_not_applied_changes_nothing():
    """SDS declares eps; an estimator without control variates gives the plain gradient."""
    objective = sds("sds")
    assert objective.control_variates == (eps_control_variate,)
    model = make_model(objective, 2, 4, XI)
    a = grad_of(carv.CARVLoss(), model, carv.TimestepGuide(model, seed=seed(1)))
    objective.control_variates = ()
    b = grad_of(carv.CARVLoss(), model, carv.TimestepGuide(model, seed=seed(1)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_control_variate_inputs_are_checked():
    objective = sds("sds")
    with pytest.raises(TypeError, match="control_variates must be a sequence"):
        objective.control_variates = eps_control_variate
    with pytest.raises(TypeError, match="control_variates must hold callables"):
        objective.control_variates = (1.0,)
    loss_objective = carv.objectives.DenoisingLoss(objective.teacher)
    with pytest.raises(ValueError, match="residual objectives"):
        loss_objective.control_variates = (eps_control_variate,)
    with pytest.raises(TypeError, match="control_variates must be True or False"):
        carv.Estimator(K=2, control_variates="yes")
    with pytest.raises(TypeError, match="control_variates must be True, False"):
        carv.TimestepGuide(control_variates=3)
    with pytest.raises(TypeError, match="baseline must be a callable"):
        SteinControlVariate(0.5)
    with pytest.raises(ValueError, match="decay"):
        ControlVariateFit(decay=0.0)
    bad = sds("sds")
    bad.control_variates = (SteinControlVariate(lambda x_t, batch: x_t),)  # not one per draw
    model = make_model(bad, 1, 2, XI[:1])
    guide = carv.TimestepGuide(model, control_variates=True, seed=seed(0))
    with pytest.raises(ValueError, match="expected"):
        grad_of(carv.CARVLoss(), model, guide)


def test_a_restored_guide_continues_the_fit_exactly():
    """`TimestepGuide.get_state` carries each term's fit: a guide restored from it (a fresh
    objective, as a resumed run builds) gives the same gradients as the one that kept going."""
    est = carv.Estimator(K=4, proposal="weighted", stratify="per_outer", control_variates=True)
    objective = sds("sds")
    model = make_model(objective, 2, 4, XI)
    guide = est.guide(model, seed=seed(11))
    loss = carv.CARVLoss()
    for _ in range(20):
        grad_of(loss, model, guide)
    state = guide.get_state()
    assert state["control_variates"]["sds"]["n"].sum() > 0
    going_on = [grad_of(loss, model, guide) for _ in range(5)]

    resumed_objective = sds("sds")
    resumed_model = make_model(resumed_objective, 2, 4, XI)
    resumed = est.guide(resumed_model, seed=seed(99))
    resumed.set_state(state)
    again = [grad_of(loss, resumed_model, resumed) for _ in range(5)]
    for a, b in zip(going_on, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the state is carried on: a second checkpoint of the resumed guide holds its fit
    assert resumed.get_state()["control_variates"]["sds"]["n"].sum() > 0


def test_a_restored_fit_must_match_the_objective():
    fit = ControlVariateFit(n_bins=8)
    objective = sds("sds")
    bad = {"G": torch.zeros(4, 1, 1), "v": torch.zeros(4, 1), "n": torch.zeros(4)}
    with pytest.raises(ValueError, match="8 bins.*1 control variates"):
        fit.restore(objective, bad)
