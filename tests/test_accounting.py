"""Accounting: V_b, V_w, costs, K*, ECM, the online accountant and the adaptive proposal."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.accounting import (
    Accountant,
    PlateResizer,
    VarianceComponents,
    effective_compute_multiplier,
    measure,
    optimal_inner_size,
)
from carv_pyro.proposals import WeightedProposal

from .analytic import (
    THETA0,
    T,
    closed_form_components,
    grad_of,
    make_model,
    sds,
)

# Tolerances in standard errors; the seeds are fixed so outcomes are deterministic.
Z = 4.5


def test_formulas():
    assert optimal_inner_size(8.0, 0.5, 1.0, 4.0) == pytest.approx(8.0)
    assert optimal_inner_size(1.0, 1.0, 0.0, 1.0) == math.inf
    assert optimal_inner_size(1.0, 1.0, 1.0, 0.0) == 0.0
    v_b, v_w, c_o, c_i = 0.3, 2.0, 5.0, 0.2
    for K in (1, 2, 7, 32):
        want = (v_b + v_w) * (c_o + c_i) / ((v_b + v_w / K) * (c_o + K * c_i))
        assert effective_compute_multiplier(K, c_o, c_i, v_b, v_w) == pytest.approx(want)
    assert effective_compute_multiplier(1, c_o, c_i, v_b, v_w) == pytest.approx(1.0)
    k_star = optimal_inner_size(c_o, c_i, v_b, v_w)
    ks = torch.linspace(1, 60, 2000).tolist()
    best = max(ks, key=lambda k: effective_compute_multiplier(k, c_o, c_i, v_b, v_w))
    assert best == pytest.approx(k_star, rel=0.01)
    with pytest.raises(ValueError, match="c_outer"):
        optimal_inner_size(-1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="K must"):
        effective_compute_multiplier(0, 1.0, 1.0, 1.0, 1.0)


@given(
    xs=st.lists(st.tuples(st.floats(0, 10), st.floats(-5, 5)), min_size=0, max_size=30),
    split=st.integers(0, 30),
)
def test_variance_components_merge_equals_one_stream(xs, split):
    a, b, both = VarianceComponents(), VarianceComponents(), VarianceComponents()
    for i, (w, bt) in enumerate(xs):
        (a if i < split else b).update(w, bt)
        both.update(w, bt)
    merged = a.merge(b)
    for got, want in zip(merged.state(), both.state()):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert VarianceComponents.from_state(both.state()).state() == both.state()


@pytest.mark.parametrize("proposal", ["prior", "weighted"])
def test_measure_agrees_with_closed_forms(proposal):
    objective = sds("sds")
    model = make_model(objective, R=4, K=6)
    pyro.param("theta", THETA0.clone())
    guide = carv.TimestepGuide(model, proposal=proposal)
    report = measure(model, guide, n_repeats=300, candidate_ks=(1, 2, 4))
    q = None
    if proposal == "weighted":
        q = WeightedProposal(objective.prior, objective.schedule, objective.weight).probs()
    v_b, v_w = closed_form_components(objective, q)
    se_w, se_b = report.stderr
    assert abs(report.v_within - v_w) <= Z * se_w, (report.v_within, v_w, se_w)
    assert abs(report.v_between - v_b) <= Z * se_b, (report.v_between, v_b, se_b)
    assert report.c_outer > 0 and report.c_inner > 0
    assert set(report.teacher_seconds) == {1, 2, 4}
    # the parameters and their gradients are untouched
    assert torch.equal(pyro.param("theta").detach(), THETA0)
    assert pyro.param("theta").unconstrained().grad is None


def test_measure_with_one_upstream_sample_per_step():
    """R = 1: V_b comes from the step-to-step spread of the estimates.

    The spread's trace has a relative standard error of about sqrt(2 / (2 * 300)) = 6% of
    V_b + V_w / K = 0.0085, i.e. 0.0005 or 10% of V_b; 35% is 3.5 of those.
    """
    objective = sds("sds")
    model = make_model(objective, R=1, K=8)
    pyro.param("theta", THETA0.clone())
    report = measure(model, carv.TimestepGuide(model), n_repeats=300, costs=(1.0, 0.1))
    v_b, v_w = closed_form_components(objective)
    se_w, _ = report.stderr
    assert abs(report.v_within - v_w) <= Z * se_w
    assert report.v_between == pytest.approx(v_b, rel=0.35)
    assert report.teacher_seconds == {}  # declared costs: nothing timed


@pytest.mark.parametrize("R,K", [(1, 1), (2, 8), (4, 2), (3, 16)])
def test_variance_formula_predicts_the_estimator(R, K):
    """tr Cov of the real estimator matches (V_b + V_w / K) / R from the closed forms.

    With n = 400 repeats and 2 coordinates, the trace estimate has a relative standard
    deviation of about sqrt(2 / n) = 7%; 25% is 3.5 of those.
    """
    objective = sds("sds")
    v_b, v_w = closed_form_components(objective)
    model = make_model(objective, R, K)
    loss = carv.CARVLoss()
    guide = carv.TimestepGuide(model)
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(400)])
    empirical = float(grads.var(0).sum())
    predicted = (v_b + v_w / K) / R
    assert empirical == pytest.approx(predicted, rel=0.25)


def test_online_accountant_converges_to_k_star_under_declared_costs():
    objective = sds("sds")
    v_b, v_w = closed_form_components(objective)
    target = 8
    c_inner = 1.0
    c_outer = target**2 * c_inner * v_b / v_w  # K* = sqrt(c_o / c_i * V_w / V_b) = 8
    model = make_model(objective, R=4, K=2)
    acc = Accountant(adapt=True, every=1, window=60, k_range=(1, 32), costs=(c_outer, c_inner))
    loss = carv.CARVLoss(accountant=acc)
    svi = SVI(model, carv.TimestepGuide(model), pyro.optim.SGD({"lr": 0.0}), loss=loss)
    for _ in range(80):
        svi.step()
    assert acc.plate == "noise"
    assert abs(acc.k - target) <= 2, acc.history[-1]
    assert loss.last_records[0].n_inner == acc.k  # the plate really was resized
    assert math.isfinite(acc.predicted_ecm) and acc.predicted_ecm >= 1.0
    assert "k_star" in acc.history[-1]
    logged = loss.summary()
    assert logged["K"] == acc.k and logged["sds/K"] == acc.k and "ecm_predicted" in logged
    report = acc.report()
    assert report.k_star == pytest.approx(acc.k_star)


def test_accountant_without_adaptation_leaves_k_and_measures_costs():
    objective = sds("sds")
    model = make_model(objective, R=2, K=4)
    acc = Accountant(every=3)
    loss = carv.CARVLoss(accountant=acc)
    svi = SVI(model, carv.TimestepGuide(model), pyro.optim.Adam({"lr": 1e-3}), loss=loss)
    for _ in range(7):
        svi.step()
    assert acc.k is None and len(acc.history) == 3
    c_outer, c_inner = acc.cost_estimates()
    assert c_outer > 0 and c_inner > 0


def test_measured_steps_give_the_same_gradient_as_plain_steps():
    """The quadrant backward accumulates exactly the plain gradient."""
    objective = sds("sds")
    model = make_model(objective, R=3, K=4)
    guide = carv.TimestepGuide(model, proposal="weighted")
    pyro.set_rng_seed(7)
    g_plain = grad_of(carv.CARVLoss(), model, guide)
    pyro.set_rng_seed(7)
    g_measured = grad_of(carv.CARVLoss(accountant=Accountant(every=1)), model, guide)
    torch.testing.assert_close(g_measured, g_plain)


def test_plate_resizer_keeps_models_plain():
    def model():
        with pyro.plate("noise", 3, dim=-1) as idx:
            return idx

    assert model().tolist() == [0, 1, 2]
    with PlateResizer({"noise": 5}):
        assert model().tolist() == [0, 1, 2, 3, 4]


def test_accountant_bad_options():
    with pytest.raises(ValueError, match="k_range"):
        Accountant(k_range=(0, 4))
    with pytest.raises(ValueError, match="every"):
        Accountant(every=0)
    with pytest.raises(ValueError, match="c_inner"):
        Accountant(costs=(1.0, 0.0))


def test_report_table_and_plot(tmp_path):
    objective = sds("sds")
    model = make_model(objective, R=2, K=4)
    pyro.param("theta", THETA0.clone())
    report = measure(model, carv.TimestepGuide(model), n_repeats=20, candidate_ks=(1, 2, 4, 8))
    text = str(report)
    assert "K*" in text and "ECM" in text
    assert report.best_k() in (1, 2, 4, 8)
    path = report.plot(str(tmp_path / "var_cost.png"))
    assert (tmp_path / "var_cost.png").stat().st_size > 1000
    assert path.endswith(".png")


# -- adaptive proposal ------------------------------------------------------------------------


def _q_star_binned(objective, proposal) -> torch.Tensor:
    """The binned q* with the exact conditional second moment E[||h||^2 | t] at THETA0."""
    from .analytic import DIRECTION, MEAN, STD, D

    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a = objective.schedule.alpha(t, like=f64)
    s = objective.schedule.sigma(t, like=f64)
    w = objective.weight(t)
    den = a * a * STD**2 + s * s
    A, B = w * s * a / den, w * (s * s / den - 1)
    ex2 = ((THETA0 - MEAN) ** 2).sum() + (DIRECTION**2).sum()
    m2_t = A * A * ex2 + B * B * D
    p = objective.prior.probs()
    # per-bin average of the second moment under p, as the histogram learns it
    num = torch.zeros(proposal.n_bins, dtype=torch.float64).index_add_(
        0, proposal.bin_index, p * m2_t
    )
    den_b = torch.zeros(proposal.n_bins, dtype=torch.float64).index_add_(0, proposal.bin_index, p)
    m2_bin = num / den_b
    q = p * m2_bin.sqrt()[proposal.bin_index]
    return q / q.sum()


def test_adaptive_proposal_approaches_q_star():
    objective = sds("sds")
    model = make_model(objective, R=4, K=8)
    guide = carv.TimestepGuide(model, proposal="adaptive")
    loss = carv.CARVLoss()
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=loss)
    for _ in range(300):
        svi.step()
    q = guide.proposal_for("sds", objective)
    learned = (q.probs() - q.defensive * objective.prior.probs()) / (1 - q.defensive)
    tv = 0.5 * float((learned - _q_star_binned(objective, q)).abs().sum())
    assert tv < 0.05, tv
    # weights stay bounded by the defensive mixture
    assert loss.diagnostics["sds"].max_weight <= 1.0 / q.defensive + 1e-9


def test_adaptive_proposal_is_exactly_unbiased_at_every_state():
    from .test_unbiased_exact import exact_expectation

    objective = sds("sds")
    model = make_model(objective, R=2, K=3)
    guide = carv.TimestepGuide(model, proposal="adaptive")
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=carv.CARVLoss())
    for _ in range(30):
        svi.step()
    q = guide.proposal_for("sds", objective)
    q.learning = False
    xi = torch.tensor([0.4, -1.1], dtype=torch.float64)
    from .analytic import expected_grad

    for stratify in (None, "per_outer", "global"):
        got = exact_expectation(objective, q, stratify, 2, 3, xi)
        torch.testing.assert_close(got, expected_grad(objective, xi), rtol=1e-9, atol=1e-12)


def test_adaptive_state_round_trips_through_the_param_store(tmp_path):
    objective = sds("sds")
    model = make_model(objective, R=2, K=4)
    guide = carv.TimestepGuide(model, proposal="adaptive")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=carv.CARVLoss())
    for _ in range(10):
        svi.step()
    before = guide.proposal_for("sds", objective).probs().clone()
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    fresh = carv.TimestepGuide(model, proposal="adaptive")
    assert not torch.equal(fresh.proposal_for("sds", objective).probs(), before)
    pyro.get_param_store().load(tmp_path / "store.pt")
    assert torch.equal(fresh.proposal_for("sds", objective).probs(), before)
    # and the adaptive state is not optimized by SVI
    theta_before = pyro.param("theta").detach().clone()
    sums_before = pyro.get_param_store()["carv.adaptive.sds.sum_sq"].detach().clone()
    svi2 = SVI(model, fresh, pyro.optim.Adam({"lr": 0.5}), loss=carv.CARVLoss())
    svi2.step()
    assert not torch.equal(pyro.param("theta").detach(), theta_before)
    after = pyro.get_param_store()["carv.adaptive.sds.sum_sq"].detach()
    decay = fresh.proposal_for("sds", objective).decay
    assert (after >= decay * sums_before - 1e-12).all()  # only decayed and added to, never stepped


def test_accountant_at_k_one_keeps_measuring_within_variance():
    """With K* < 1 the accountant picks K = 1 but probes K = 2 on measuring steps."""
    objective = sds("sds")
    model = make_model(objective, R=4, K=4)
    acc = Accountant(adapt=True, every=2, window=10, costs=(1e-6, 1.0), min_measurements=1)
    loss = carv.CARVLoss(accountant=acc)
    svi = SVI(model, carv.TimestepGuide(model), pyro.optim.SGD({"lr": 0.0}), loss=loss)
    sizes = []
    for _ in range(12):
        svi.step()
        sizes.append(loss.last_records[0].n_inner)
    assert acc.k == 1
    assert 1 in sizes and 2 in sizes  # plain steps at K = 1, measuring steps at K = 2
    assert all(math.isfinite(h["k_star"]) for h in acc.history)


def test_measuring_steps_do_not_count_as_step_costs():
    """A measuring step runs four backward passes through the upstream; its time is not a step's."""
    from types import SimpleNamespace

    record = SimpleNamespace(n_outer=2, n_inner=4, t=torch.zeros(2, 4))
    acc = Accountant()
    acc.observe_step(record, 4.0, 0.2, measured=True)  # nothing else known yet: kept
    assert acc.cost_estimates() == pytest.approx((1.9, 0.025))
    acc.observe_step(record, 1.0, 0.2)  # a plain step
    acc.observe_step(record, 1.0, 0.2)
    acc.observe_step(record, 4.0, 0.2, measured=True)  # now ignored
    assert acc.cost_estimates() == pytest.approx((0.4, 0.025))
