"""Accounting: V_b, V_w, costs, K*, ECM, the online accountant and the adaptive proposal.

Statistical thresholds: component estimates are compared with their closed forms at ``Z = 5``
of their own standard errors (about 20 such comparisons in the file: a Bonferroni bound of
1.2e-5 per seed); variance traces over ``n`` repeats have a relative standard deviation of at most
``sqrt(2 / (n - 1))``, and are compared at 5 of those.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import threading

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.accounting import (
    Accountant,
    VarianceComponents,
    effective_compute_multiplier,
    fit_cost_curve,
    optimal_inner_size,
)
from carv_pyro.infer.loss import StepReport
from carv_pyro.infer.primitives import DrawsSizer
from carv_pyro.measure import measure
from carv_pyro.proposals import WeightedProposal
from carv_pyro.timing import Stopwatch

from .analytic import (
    DIRECTION,
    THETA0,
    T,
    closed_form_components,
    grad_of,
    make_model,
    sds,
    sds_constant,
)
from .seeds import seed

Z = 5.0


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
    guide = carv.TimestepGuide(model, proposal=proposal, seed=seed(1))
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


def test_measure_leaves_the_adaptive_proposal_alone():
    objective = sds("sds")
    model = make_model(objective, R=2, K=4)
    guide = carv.TimestepGuide(model, proposal="adaptive", seed=seed(2))
    grad_of(carv.CARVLoss(), model, guide)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items() if "adaptive" in k}
    measure(model, guide, n_repeats=5, candidate_ks=None)
    after = {k: v.detach() for k, v in pyro.get_param_store().items() if "adaptive" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_measure_with_one_upstream_sample_per_step():
    """R = 1: V_b comes from the step-to-step spread of the estimates.

    The spread's trace over 400 repeats has a relative standard error of at most
    sqrt(2 / 399) = 7% of V_b + V_w / K = 0.0085, i.e. 0.0006 or 12% of V_b; the tolerance, 60%,
    is 5 of those.
    """
    objective = sds("sds")
    model = make_model(objective, R=1, K=8)
    pyro.param("theta", THETA0.clone())
    guide = carv.TimestepGuide(model, seed=seed(3))
    report = measure(model, guide, n_repeats=400, costs=(1.0, 0.1))
    v_b, v_w = closed_form_components(objective)
    se_w, _ = report.stderr
    assert abs(report.v_within - v_w) <= Z * se_w
    assert report.v_between == pytest.approx(v_b, rel=0.6)
    assert report.teacher_seconds == {}  # declared costs: nothing timed


@pytest.mark.parametrize("R,K", [(1, 1), (2, 8), (4, 2), (3, 16)])
def test_variance_formula_predicts_the_estimator(R, K):
    """tr Cov of the real estimator matches (V_b + V_w / K) / R from the closed forms.

    With n = 600 repeats the trace estimate has a relative standard deviation of at most
    sqrt(2 / 599) = 5.8%; the tolerance, 29%, is 5 of those.
    """
    objective = sds("sds")
    v_b, v_w = closed_form_components(objective)
    model = make_model(objective, R, K)
    loss = carv.CARVLoss()
    guide = carv.TimestepGuide(model, seed=seed(4))
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(600)])
    empirical = float(grads.var(0).sum())
    predicted = (v_b + v_w / K) / R
    assert empirical == pytest.approx(predicted, rel=0.29)


def test_online_accountant_adapts_k_to_its_pooled_estimates_under_declared_costs():
    """K follows the rule from the pooled estimates, which sit at the closed forms; K* = 8.

    The choice itself is deterministic given the pooled V_b, V_w: the argmin of
    (V_b + V_w / K) cost(K) within the bounded step. The pooled estimates are checked against
    the closed forms at 5 of their standard errors.
    """
    objective = sds("sds")
    v_b, v_w = closed_form_components(objective)
    target = 8
    c_inner = 1.0
    c_outer = target**2 * c_inner * v_b / v_w  # K* = sqrt(c_o / c_i * V_w / V_b) = 8
    model = make_model(objective, R=4, K=2, inner="draws")
    acc = Accountant(
        adapt=True, every=1, backoff=1.0, window=60, k_range=(1, 32), costs=(c_outer, c_inner)
    )  # backoff 1: every step measures, so the last one applied the rule checked below
    loss = carv.CARVLoss(accountant=acc)
    guide = carv.TimestepGuide(model, seed=seed(5))
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=loss)
    ks = []
    for _ in range(80):
        svi.step()
        ks.append(acc.k)
    vc = acc.components
    se_w, se_b = vc.stderr()
    assert abs(vc.v_within - v_w) <= Z * se_w and abs(vc.mean_between - v_b) <= Z * se_b
    v_b_used = acc._robust_between(vc)
    k_prev = ks[-2]
    lo = max(1, math.ceil(k_prev / acc.max_change))
    hi = min(32, math.floor(k_prev * acc.max_change))

    def work(k):
        return (v_b_used + vc.v_within / k) * (c_outer + k)

    best = min(range(lo, hi + 1), key=work)
    if work(best) > (1.0 - acc.tolerance) * work(k_prev):  # no real gain: K holds
        best = k_prev
    assert acc.k == best
    assert 4 <= acc.k <= 16  # K* = 8, within the spread the pooled estimates allow
    assert loss.last_records[0].n_inner == acc.k  # the plate really was resized
    assert all(
        b <= 2 * a and a <= 2 * b for a, b in zip(ks[:-1], ks[1:]) if a and b
    )  # bounded steps
    assert math.isfinite(acc.predicted_ecm) and acc.predicted_ecm >= 1.0
    logged = loss.summary()
    assert logged["K"] == acc.k and logged["sds/K"] == acc.k and "ecm_predicted" in logged
    assert acc.report().k_star == pytest.approx(acc.k_star)


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
    assert set(acc.step_costs) == {4}


def test_measured_steps_give_the_same_gradient_as_plain_steps():
    """The contrast backward accumulates exactly the plain gradient."""
    objective = sds("sds")
    model = make_model(objective, R=3, K=4, xi=torch.tensor([0.2, -0.3, 1.0], dtype=torch.float64))
    g_plain = grad_of(carv.CARVLoss(), model, carv.TimestepGuide(proposal="weighted", seed=seed(6)))
    g_measured = grad_of(
        carv.CARVLoss(accountant=Accountant(every=1)),
        model,
        carv.TimestepGuide(proposal="weighted", seed=seed(6)),
    )
    torch.testing.assert_close(g_measured, g_plain)


class _Recording(Accountant):
    def observe(self, report):
        self.reports = getattr(self, "reports", []) + [report]
        super().observe(report)


@pytest.mark.parametrize("R,K", [(3, 4), (1, 2), (2, 1)])
def test_batched_contrast_backward_equals_one_backward_per_contrast(monkeypatch, R, K):
    """The measuring step's one batched backward (vmapped cotangents) gives the contrasts and the
    gradient of one backward per contrast, including degenerate halves (R = 1, K = 1); an op
    without a batching rule falls back to the loop."""
    from carv_pyro.infer import loss as loss_module

    # the batched pass is used on GPUs only (it is slower on a CPU): test it here all the same
    monkeypatch.setattr(loss_module, "BATCHED_BACKWARD_DEVICES", frozenset({"cpu", "cuda"}))
    objective = sds("sds")
    xi = torch.linspace(-0.5, 1.0, R, dtype=torch.float64)
    model = make_model(objective, R=R, K=K, xi=xi)
    used = []
    batched = loss_module._batched_contrasts

    def spy(*args):
        out = batched(*args)
        used.append(out is not None)
        return out

    def measured(fn):
        monkeypatch.setattr(loss_module, "_batched_contrasts", fn)
        acc = _Recording(every=1)
        g = grad_of(carv.CARVLoss(accountant=acc), model, carv.TimestepGuide(seed=seed(8)))
        return g, acc.reports[-1].contrasts

    g_batched, q_batched = measured(spy)
    assert used == [True]
    g_looped, q_looped = measured(lambda *args: None)
    torch.testing.assert_close(g_batched, g_looped, rtol=1e-12, atol=0)
    torch.testing.assert_close(q_batched, q_looped, rtol=1e-12, atol=0)

    def no_rule(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for aten::fake")

    real_grad = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd,
        "grad",
        lambda *a, **k: no_rule() if k.get("is_grads_batched") else real_grad(*a, **k),
    )
    g_fallback, q_fallback = measured(batched)
    torch.testing.assert_close(g_fallback, g_looped, rtol=1e-12, atol=0)
    torch.testing.assert_close(q_fallback, q_looped, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("R,K", [(4, 6), (3, 5), (1, 4), (5, 1), (1, 1)])
def test_the_contrasts_are_the_documented_combinations_of_per_draw_gradients(
    monkeypatch, batched, R, K
):
    """Exact: with per-draw surrogates whose gradients are known in closed form, the two
    contrasts are the outer halves' difference and the mean inner halves' difference of
    `contrast_weights`, and the accumulated gradient is the surrogate's (times ``scale``)."""
    from carv_pyro.infer import loss as loss_module
    from carv_pyro.layout import TermLayout

    if batched:
        monkeypatch.setattr(loss_module, "BATCHED_BACKWARD_DEVICES", frozenset({"cpu"}))
    g = torch.Generator().manual_seed(11)
    G = torch.randn(R, K, 5, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    other = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    # per-draw gradient G[r, k] + 0.2 theta; the rest of the surrogate adds its own leaf
    per_draw = G @ theta + 0.1 * (theta**2).sum()
    surrogate = per_draw.mean() + (other**2).sum() + 0.5 * (theta**3).sum()
    layout = TermLayout(torch.Size([R, K]), (), "noise", -1, True)
    contrasts, sizes = loss_module.contrast_backward(per_draw, layout, 0.25 * surrogate)
    grads = G + 0.2 * theta.detach()  # (R, K, 5)
    (a1, a2), (b1, b2) = sizes
    assert (a1, a2) == (R // 2, R - R // 2) and (b1, b2) == (K - K // 2, K // 2)
    rows, cols = (
        [torch.arange(R)[: R // 2], torch.arange(R)[R // 2 :]],
        [
            torch.arange(K)[0::2],
            torch.arange(K)[1::2],
        ],
    )
    want_outer = torch.zeros(5, dtype=torch.float64)
    if a1 and a2:
        want_outer = grads[rows[0]].mean((0, 1)) - grads[rows[1]].mean((0, 1))
    want_inner = torch.zeros(5, dtype=torch.float64)
    if b1 and b2:
        want_inner = (grads[:, cols[0]].mean(1) - grads[:, cols[1]].mean(1)).mean(0)
    leaves = {id(theta): 0, id(other): 1}
    assert contrasts.shape == (2, 8)
    # the leaves' order is the graph's: find theta's block by its size
    blocks = (
        (contrasts[:, :5], contrasts[:, 5:])
        if leaves and contrasts[:, 5:].abs().sum() == 0
        else (contrasts[:, 3:], contrasts[:, :3])
    )
    torch.testing.assert_close(blocks[0][0], want_outer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocks[0][1], want_inner, rtol=1e-12, atol=1e-12)
    assert blocks[1].abs().sum() == 0  # a leaf outside the term's graph has no contrast
    want_theta = 0.25 * (G.mean((0, 1)) + 0.2 * theta.detach() + 1.5 * theta.detach() ** 2)
    torch.testing.assert_close(theta.grad, want_theta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other.grad, 0.25 * 2 * other.detach(), rtol=1e-12, atol=1e-12)


def test_anova_estimates_are_unbiased_for_the_contrasts_law():
    """E|D|^2 and E|C|^2 as documented give back V_b and V_w on average (Gaussian per-draw
    gradients with known components, 4000 steps: each estimate's mean within 5 standard
    errors)."""
    from carv_pyro.accounting import anova_estimates
    from carv_pyro.infer.loss import contrast_weights

    R, K, P, v_b, v_w = 4, 6, 3, 0.3, 2.0
    outer, inner, sizes = contrast_weights(R, K)
    g = torch.Generator().manual_seed(5)
    ws, bs = [], []
    for _ in range(4000):
        xi = torch.randn(R, 1, P, generator=g, dtype=torch.float64) * math.sqrt(v_b / P)
        grads = (
            1.0 + xi + torch.randn(R, K, P, generator=g, dtype=torch.float64) * math.sqrt(v_w / P)
        )
        c = torch.stack(
            [(outer[..., None] * grads).sum((0, 1)), (inner[..., None] * grads).sum((0, 1))]
        )
        w, b = anova_estimates(c, sizes)
        ws.append(w)
        bs.append(b)
    for est, want in ((torch.tensor(ws), v_w), (torch.tensor(bs), v_b)):
        se = float(est.std()) / math.sqrt(len(est))
        assert abs(float(est.mean()) - want) <= Z * se, (float(est.mean()), want, se)


def test_draws_sizer_sets_the_reserved_plate_only():
    def model():
        with carv.draws(3, "noise", dim=-1) as idx, pyro.plate("other", 2, dim=-2) as jdx:
            return idx, jdx

    idx, jdx = model()
    assert idx.tolist() == [0, 1, 2] and jdx.tolist() == [0, 1]
    with DrawsSizer(5):
        idx, jdx = model()
    assert idx.tolist() == [0, 1, 2, 3, 4] and jdx.tolist() == [0, 1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k_range=(0, 4)), "k_range"),
        (dict(k_range=(8, 4)), "k_range"),
        (dict(k_range=5), "k_range"),
        (dict(every=0), "every"),
        (dict(window=-1), "window"),
        (dict(costs=(1.0, 0.0)), "c_inner"),
        (dict(costs=(1.0,)), "costs must be a pair"),
        (dict(costs="fast"), "costs must be a pair"),
        (dict(min_measurements=-3), "min_measurements"),
        (dict(backoff=0.5), "backoff"),
        (dict(every=10, max_every=5), "max_every"),
        (dict(history_size=0), "history_size"),
        (dict(tolerance=1.0), "tolerance"),
        (dict(max_change=0.5), "max_change"),
        (dict(adapt="yes"), "adapt"),
    ],
)
def test_accountant_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Accountant(**kwargs)


def test_accountant_plate_names_are_checked_against_the_model():
    objective = sds("sds")
    loss = carv.CARVLoss(accountant=Accountant(plate="noize"))
    with pytest.raises(ValueError, match="plate='noize'.*inner plate is 'noise'"):
        grad_of(loss, make_model(objective, 2, 4, inner="draws"), carv.TimestepGuide())
    loss = carv.CARVLoss(accountant=Accountant(adapt=True))
    with pytest.raises(ValueError, match="plain pyro.plate 'noise'.*carv_pyro.draws"):
        grad_of(loss, make_model(objective, 2, 4), carv.TimestepGuide())
    loss = carv.CARVLoss(accountant=Accountant(plate="noise", adapt=True))
    grad_of(loss, make_model(objective, 2, 4, inner="draws"), carv.TimestepGuide())


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
    guide = carv.TimestepGuide(model, proposal="adaptive", seed=seed(8))
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
    (key,) = [k for k in pyro.get_param_store().keys() if k.endswith(".sum_sq")]
    assert key.startswith("carv.adaptive.sds.")
    sums_before = pyro.get_param_store()[key].detach().clone()
    svi2 = SVI(model, fresh, pyro.optim.Adam({"lr": 0.5}), loss=carv.CARVLoss())
    svi2.step()
    assert not torch.equal(pyro.param("theta").detach(), theta_before)
    after = pyro.get_param_store()[key].detach()
    decay = fresh.proposal_for("sds", objective).decay
    assert (after >= decay * sums_before - 1e-12).all()  # only decayed and added to, never stepped


def test_accountant_at_k_one_keeps_measuring_within_variance():
    """With K* < 1 the accountant walks down to K = 1 but probes K = 2 on measuring steps."""
    objective = sds("sds")
    model = make_model(objective, R=4, K=4, inner="draws")
    acc = Accountant(adapt=True, every=2, window=10, costs=(1e-6, 1.0), min_measurements=1)
    loss = carv.CARVLoss(accountant=acc)
    guide = carv.TimestepGuide(model, seed=seed(7))
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=loss)
    sizes = []
    for _ in range(16):
        svi.step()
        sizes.append(loss.last_records[0].n_inner)
    assert acc.k == 1
    assert 1 in sizes and 2 in sizes  # plain steps at K = 1, measuring steps at K = 2
    stars = [h["k_star"] for h in acc.history if "k_star" in h]
    assert stars and all(math.isfinite(k) and k < 100 for k in stars)  # never the 1e6 of V_b ~ 0


class _Record:
    """The fields of a TermRecord the accountant reads."""

    def __init__(self, R: int, K: int, reserved: bool = True):
        from pyro.poutine.indep_messenger import CondIndepStackFrame

        from carv_pyro.layout import TermLayout

        frames = (CondIndepStackFrame("views", -2, R, 0), CondIndepStackFrame("noise", -1, K, 0))
        self.layout = TermLayout.from_frames(
            "sds", frames, "noise" if reserved else None, torch.Size([R, 1])
        )
        self.name = "sds"
        self.n_outer, self.n_inner = R, K


def test_measuring_steps_do_not_count_as_step_costs():
    """A measuring step runs three backward passes through the upstream; its time is not a step's."""
    record = _Record(2, 4)
    q = torch.zeros(2, 3, dtype=torch.float64)
    sizes = ((1, 1), (2, 2))
    acc = Accountant()
    acc.observe(StepReport(record, 4.0, 0.2, q, sizes))  # nothing else known yet: kept
    assert acc.cost_estimates() == pytest.approx((1.9, 0.025))
    acc.observe(StepReport(record, 1.0, 0.2))  # a plain step
    acc.observe(StepReport(record, 1.0, 0.2))
    acc.observe(StepReport(record, 4.0, 0.2, q, sizes))  # now ignored
    assert acc.cost_estimates() == pytest.approx((0.4, 0.025))
    assert acc.step_costs == {4: 1.0}


def test_a_non_positive_v_between_estimate_is_a_small_measurement_not_infinity():
    """One noisy V_b <= 0 must not send K to the top of k_range (the old behaviour)."""
    acc = Accountant(adapt=True, every=1, k_range=(1, 64), costs=(1.0, 1.0), min_measurements=1)
    acc.k, acc.last_R, acc.last_K = 8, 4, 8
    acc.observe_measurement(1.0, -0.05)
    assert acc.k <= 16  # bounded: at most a doubling per update
    for v_b in (0.02, 0.03, -0.01, 0.025):
        acc.observe_measurement(1.0, v_b)
    # pooled V_b ~ 0.003 floored at its standard error: K* = sqrt(V_w / V_b), not 64
    assert acc.k < 64


def test_the_cost_curve_learned_from_measured_steps_decides_k():
    """A launch-bound GPU (a step costs the same at every K) makes larger K free; linear costs
    give back Cochran's K*."""
    assert fit_cost_curve({1: 2.0, 4: 2.0, 16: 2.0}) == pytest.approx((2.0, 0.0))
    assert fit_cost_curve({1: 3.0, 3: 7.0}) == pytest.approx((1.0, 2.0))
    assert fit_cost_curve({1: 3.0, 3: 1.0})[1] == 0.0  # never a negative slope
    for flat, want_k in ((True, 16), (False, 4)):
        acc = Accountant(adapt=True, k_range=(1, 64), min_measurements=1, max_change=2.0)
        record = _Record(4, 8)
        for K in (4, 8):
            record.n_inner = K
            step = 1.0 if flat else 1.0 + K  # linear: Cochran K* = sqrt(1 / 1 * 16) = 4
            acc.observe(StepReport(record, step, step - 0.9))
        acc.k, acc.last_K = 8, 8
        acc.observe_measurement(1.0, 1.0 / 16)  # V_w / V_b = 16
        assert acc.k == want_k, (flat, acc.k, acc.step_costs)
        # the record beside the choice predicts its ECM by the same cost model: where K is free
        # (flat) the K = 16 choice is (1/16 + 1) / (1/16 + 1/16) = 8.5x better than K = 1 at
        # the same cost; the linear per-draw model read off these timings called it dearer
        entry = acc.history[-1]
        v_b, v_w = 1.0 / 16, 1.0
        want = (v_b + v_w) * acc.cost_of(1) / ((v_b + v_w / want_k) * acc.cost_of(want_k))
        assert entry["ecm_predicted"] == pytest.approx(want) and entry["ecm_predicted"] > 1.0
        if flat:
            assert want == pytest.approx(8.5)


def test_noisy_step_timings_are_not_read_as_a_cost_slope():
    """Plain steps at K = 1 and 2 whose timings differ by noise (1.0 s, 1.2 s) with a teacher
    whose call costs the same at every K: every K is predicted at the pooled rest of a step
    plus the flat teacher (1.1 s), not from a line through the two steps (1.6 s at K = 4) nor
    from each K's own steps (which would call K = 2 dearer than K = 1)."""
    acc = Accountant(adapt=True, k_range=(1, 64))
    record = _Record(4, 1)
    for K, step in ((1, 1.0), (2, 1.2)):
        record.n_inner = K
        for _ in range(3):
            acc.observe(StepReport(record, step, 0.5))
    for K in (1, 2, 4):
        assert acc.cost_of(K) == pytest.approx(1.1)
    # a teacher whose cost grows linearly: the rest of the step plus the teacher's curve
    acc = Accountant(adapt=True, k_range=(1, 64))
    for K in (1, 2):
        record.n_inner = K
        acc.observe(StepReport(record, 1.0 + 0.5 * K, 0.5 * K))
    assert acc.cost_of(8) == pytest.approx(1.0 + 0.5 * 8)


def test_slow_early_steps_do_not_make_a_larger_k_look_cheaper():
    """The CPU race's confound: the first steps of a run are slow (1.5 s of rest) and run at
    K = 1, later ones at K = 2 are fast (1.0 s of rest); the teacher's call is 0.1 s a draw.
    Whole-step medians per K said K = 2 (1.8 s) was cheaper than K = 1 (2.1 s); the model
    takes the recent rest of a step for every K, so K = 2 costs its extra teacher call more
    than K = 1, and with V_w = V_b / 10 (K = 2 barely pays) the accountant goes back to K = 1."""
    acc = Accountant(adapt=True, k_range=(1, 64), min_measurements=1, window=8)
    record = _Record(4, 1)
    for _ in range(8):
        acc.observe(StepReport(record, 1.5 + 0.4, 0.4))  # early: slow, K = 1
    record.n_inner = 2
    for _ in range(8):
        acc.observe(StepReport(record, 1.0 + 0.8, 0.8))  # later: fast, K = 2
    assert acc.step_costs == pytest.approx({1: 1.9, 2: 1.8})  # what the old rule compared
    assert acc.cost_of(1) == pytest.approx(1.4) and acc.cost_of(2) == pytest.approx(1.8)
    acc.k, acc.last_K = 2, 2
    acc.observe_measurement(0.1, 1.0)  # V_w = 0.1, V_b = 1: Var(2) / Var(1) = 1.05 / 1.1
    assert acc.k == 1, acc.history[-1]


def test_a_settled_choice_is_measured_less_often_and_a_change_resets_the_cadence():
    """Backoff: each measurement that keeps K doubles the interval (up to max_every); a change of
    K brings the cadence back to every."""
    acc = Accountant(
        adapt=True, every=2, costs=(1.0, 1.0), min_measurements=1, backoff=2.0, max_every=8
    )
    acc.last_R, acc.last_K = 4, 4
    measured, ks = [], []
    for _ in range(40):
        if acc.wants_components():
            measured.append(acc.step)
            # V_w / V_b = 4 with equal costs: K* = 2 until step 30, then V_w / V_b = 64: K grows
            acc.observe_measurement(4.0 if acc.step < 30 else 64.0, 1.0)
            ks.append(acc.k)
        acc.end_step()
    assert measured[:6] == [0, 2, 6, 14, 22, 30]  # K set at 0; kept at 2, 6, 14, 22
    assert ks[:5] == [2, 2, 2, 2, 2] and ks[5] == 4  # at 30 the variances change: K = 4
    assert measured[6] == 32  # and the next measurement comes `every` steps later


def _overhead_run(max_overhead, steps=120, measuring_s=3.0, plain_s=1.0, adapt=False):
    """Drive an accountant with timed steps: a plain step takes ``plain_s``, a measuring one
    ``measuring_s`` (the teacher 0.1 s of either, whatever K); returns it and the measured
    steps."""
    acc = Accountant(
        adapt=adapt, every=2, max_every=64, min_measurements=1, max_overhead=max_overhead
    )
    measured = []
    for _ in range(steps):
        record = _Record(4, acc.inner_size() or 2)
        q, sizes = None, None
        if acc.wants_components():
            measured.append(acc.step)
            q = torch.stack([torch.full((3,), 0.3), torch.full((3,), 0.2)]).double()
            sizes = ((2, 2), (record.n_inner // 2, record.n_inner - record.n_inner // 2))
        acc.observe(StepReport(record, measuring_s if q is not None else plain_s, 0.1, q, sizes))
        acc.end_step()
    return acc, measured


def test_max_overhead_spaces_the_measuring_steps_by_their_measured_price():
    """A measuring step that costs 3 plain steps adds 2 plain steps' time: at max_overhead 0.1
    the next comes after 20 plain steps (the cadence alone: every 2), so each measuring step's
    extra time is a tenth of the plain steps' after it."""
    acc, measured = _overhead_run(0.1)
    # the first measurement has no plain step to compare with: the cadence's 2 steps
    assert measured == [0, 2] + list(range(23, 120, 21)), measured
    assert [h.get("measuring_extra") for h in acc.history] == [None] + [pytest.approx(2.0)] * 6
    for a, b in zip(measured[1:], measured[2:]):
        assert 2.0 <= 0.1 * 1.0 * (b - a - 1)  # extra seconds <= 0.1 x plain seconds after
    # without the bound: the cadence alone
    assert _overhead_run(None)[1] == list(range(0, 120, 2))
    # a measuring step as cheap as a plain one (one batched pass): the cadence alone
    assert _overhead_run(0.1, measuring_s=1.0)[1] == list(range(0, 120, 2))
    # max_every still bounds the interval
    assert _overhead_run(0.01)[1] == [0, 2, 66]  # (201 steps asked, 64 allowed)
    # an adapting accountant (whose plain steps follow its K; its first measurement on the
    # second step, after a plain one) keeps the same spacing from the start
    assert _overhead_run(0.1, adapt=True)[1] == list(range(1, 120, 21))


def test_max_overhead_is_checked_and_an_older_state_has_none():
    with pytest.raises(ValueError, match="max_overhead"):
        Accountant(max_overhead=0.0)
    with pytest.raises(ValueError, match="max_overhead"):
        Accountant(max_overhead=-1)
    acc, _ = _overhead_run(0.1, steps=5)
    state = acc.__getstate__()
    for name in ("max_overhead", "_measuring_times"):
        state.pop(name)
    old = Accountant.__new__(Accountant)
    old.__dict__.update(state)
    old.observe_measurement(1.0, 0.5)  # an older pickle: no bound, no error
    assert old._overhead_gap(old._overhead_ratio()) == 0
    # and it folds a measuring step's timing in (the deque it lacked is made)
    q = torch.zeros(2, 3, dtype=torch.float64)
    old.observe(StepReport(_Record(4, 2), 3.0, 0.1, q, ((2, 2), (1, 1))))
    assert list(old._measuring_times) == [3.0]


def test_the_auto_preset_bounds_its_measuring_overhead():
    from carv_pyro.infer.estimator import MEASURING_OVERHEAD

    acc = carv.Estimator.preset("auto").loss().accountant
    assert acc.adapt and acc.max_overhead == MEASURING_OVERHEAD == 0.1


def test_without_adapt_the_cadence_is_fixed_and_history_is_bounded():
    acc = Accountant(every=3, history_size=5)
    acc.last_R, acc.last_K = 2, 2
    measured = []
    for _ in range(30):
        if acc.wants_components():
            measured.append(acc.step)
            acc.observe_measurement(1.0, 1.0)
        acc.end_step()
    assert measured == list(range(0, 30, 3))
    assert len(acc.history) == 5 and acc.history[-1]["step"] == 27


def test_one_non_positive_v_between_gives_no_k_star():
    """A single measurement with V_b <= 0 has no standard error: K* is unknown, not 1e6."""
    acc = Accountant(costs=(1.0, 1.0))
    acc.last_R, acc.last_K = 2, 2
    acc.observe_measurement(1.0, -0.2)
    assert math.isnan(acc.k_star)
    acc.observe_measurement(1.0, 0.3)
    assert math.isfinite(acc.k_star) and acc.k_star < 100


def test_k_holds_where_var_times_cost_is_flat():
    """K* ~ sqrt(2) with equal costs: Var * cost at K = 1 and 2 tie, so noise in the measurements
    must not flip K (each flip also resets the measuring cadence); tolerance=0 flips."""
    flips = {}
    for tol in (0.05, 0.0):
        acc = Accountant(adapt=True, costs=(1.0, 1.0), min_measurements=1, tolerance=tol, window=1)
        acc.k, acc.last_R, acc.last_K = 1, 4, 1
        ks = []
        for v_w in (2.1, 1.9, 2.1, 1.9, 2.1, 1.9):
            acc.observe_measurement(v_w, 1.0)
            ks.append(acc.k)
        flips[tol] = sum(a != b for a, b in zip(ks, ks[1:]))
    assert flips[0.05] == 0 and flips[0.0] >= 3


def test_an_adapting_accountant_that_starts_at_k_one_measures_v_within():
    """auto started at K = 1 (the preset's start until session 10): its measuring steps must
    probe K = 2, or V_w is never measured and K never adapts (it once stayed at K = 1,
    measuring every 10 steps for nothing)."""
    objective = sds("sds")
    model = make_model(objective, R=4, K=1, inner="draws")
    est = carv.Estimator.from_spec("auto:K=1")
    loss = est.loss()
    loss.accountant.every = 2
    loss.accountant._interval = 2.0
    svi = SVI(model, est.guide(model, seed=seed(5)), pyro.optim.SGD({"lr": 0.0}), loss=loss)
    sizes = []
    for _ in range(12):
        svi.step()
        sizes.append(loss.last_records[0].n_inner)
    acc = loss.accountant
    assert 2 in sizes and sizes[0] == 1
    assert math.isfinite(acc.components.v_within) and acc.k is not None
    assert any("k_star" in h for h in acc.history)


def test_the_teachers_measured_cost_curve_lets_k_grow_where_the_teacher_batch_is_free():
    """Plain steps only at K = 1, but the measuring steps' teacher call at K = 2 costs the same
    (a launch-bound GPU): the predicted cost of K = 2 is that of K = 1, so K grows; with a
    teacher whose cost doubles, the prediction doubles the teacher's part."""
    for flat, want in ((True, 1.0), (False, 1.5)):
        acc = Accountant(adapt=True, k_range=(1, 64))
        record = _Record(4, 1)
        for _ in range(3):
            acc.observe(StepReport(record, 1.0, 0.5))  # plain steps at K = 1
        record.n_inner = 2
        q = torch.zeros(2, 3, dtype=torch.float64)
        acc.observe(StepReport(record, 3.0, 0.5 if flat else 1.0, q, ((2, 2), (1, 1))))
        assert acc.teacher_costs.keys() == {1, 2} and acc.step_costs.keys() == {1}
        assert acc.cost_of(2) == pytest.approx(want)


# -- lazy timings: a step never waits for the device to read its stopwatches -----------------


class _DeviceWatch(Stopwatch):
    """A stopped CUDA stopwatch, simulated: `ready` (``Event.query``) is False until the test
    says the device has passed it; `seconds` counts its reads (each one a synchronisation on a
    GPU when not ready)."""

    def __init__(self, seconds: float):
        self.cuda = True
        self._seconds = seconds
        self.done = False
        self.reads = 0
        self.early_reads = 0  # reads while not ready: where a GPU would have waited
        self._lock = threading.Lock()  # like a CUDA event: not picklable

    def ready(self) -> bool:
        return self.done

    def seconds(self) -> float:
        self.reads += 1
        self.early_reads += not self.done
        return self._seconds


def _drive(acc: Accountant, steps: int, lazy: bool, behind: int = 2, seed_: int = 0):
    """Run ``steps`` steps of the observer protocol with timings that depend on ``K``; with
    ``lazy`` the timings are `_DeviceWatch` objects that become ready ``behind`` steps later.
    Returns the ``K`` of every step and the watches."""
    g = torch.Generator().manual_seed(seed_)
    ks, watches = [], []
    for step in range(steps):
        K = acc.inner_size() or 1
        measured = acc.wants_components()
        record = _Record(4, K)
        step_s, teacher_s = 0.02 + 0.01 * K + 1e-3 * (step % 3), 0.005 + 0.004 * K
        if lazy:
            for w in watches[: max(len(watches) - 2 * behind, 0)]:
                w.done = True
            sw, tw = _DeviceWatch(step_s), _DeviceWatch(teacher_s)
            watches += [sw, tw]
            times = (sw, tw)
        else:
            times = (step_s, teacher_s)
        q = sizes = None
        if measured:
            # the contrasts of per-draw gradients with V_b = 1/16, V_w = 1 per coordinate, four
            # upstream samples in halves of two (see anova_estimates)
            b1, b2 = K // 2, K - K // 2
            v_b, v_w = 1 / 16, 1.0
            z = torch.randn(2, 3, generator=g, dtype=torch.float64)
            outer = z[0] * math.sqrt(v_b + v_w / K)  # E|D|^2 = (V_b + V_w / K)(1/2 + 1/2)
            inner = z[1] * math.sqrt(v_w * (1 / b1 + 1 / b2) / 4) if b1 else 0 * z[1]
            q = torch.stack([outer, inner])
            sizes = ((2, 2), (b1, b2))
        before = [w.early_reads for w in watches]
        acc.observe(StepReport(record, *times, q, sizes))
        if lazy and not measured:  # a plain step reads nothing that is not ready
            assert [w.early_reads for w in watches] == before + [0] * (len(watches) - len(before))
        acc.end_step()
        ks.append(K)
    return ks, watches


def _decisions(acc: Accountant) -> tuple:
    return (acc.k, list(acc.history), acc.step_costs, acc.teacher_costs, acc.cost_estimates())


@pytest.mark.parametrize("behind", [0, 2, 50])
def test_lazy_timings_give_the_eager_decisions_without_reading_early(behind):
    """Timings the device has not finished are kept, not read, on plain steps; a measuring step
    reads them (it synchronises anyway), so ``K``, the history and the costs are the eager ones."""
    kwargs = dict(adapt=True, every=2, k_range=(1, 32), min_measurements=1)
    eager, lazy = Accountant(**kwargs), Accountant(**kwargs)
    ks_eager, _ = _drive(eager, 60, lazy=False)
    ks_lazy, watches = _drive(lazy, 60, lazy=True, behind=behind)
    assert ks_lazy == ks_eager and len(set(ks_eager)) > 1  # K did move
    assert _decisions(lazy) == _decisions(eager)
    assert all(w.reads == 1 for w in watches)  # each read once


def test_lazy_timings_are_read_only_when_the_numbers_are_needed():
    acc = Accountant(every=1000)  # measures at step 0, then not for a long time
    _drive(acc, 1, lazy=False)
    watches = []
    record = _Record(4, 2)
    for _ in range(5):
        sw, tw = _DeviceWatch(0.1), _DeviceWatch(0.04)
        watches += [sw, tw]
        acc.observe(StepReport(record, sw, tw))
        acc.end_step()
    summary = acc.summary()  # for logging: never waits
    assert all(w.reads == 0 for w in watches) and len(acc._pending) == 5
    assert math.isfinite(summary["c_outer"])  # the measuring step's own costs
    assert acc.step_costs == {2: pytest.approx(0.1)}  # what a decision reads: waits for all
    assert all(w.reads == 1 for w in watches) and not acc._pending
    assert acc.cost_of(2) == pytest.approx(0.1)


def test_the_pending_timings_are_bounded():
    """A device far behind: past `_MAX_PENDING` timings the oldest is read (waited for)."""
    from carv_pyro.accounting import _MAX_PENDING

    acc = Accountant(every=1000)
    _drive(acc, 1, lazy=False)
    watches = []
    for _ in range(3 * _MAX_PENDING):
        sw, tw = _DeviceWatch(0.1), _DeviceWatch(0.04)
        watches += [sw, tw]
        acc.observe(StepReport(_Record(4, 2), sw, tw))
        acc.end_step()
        assert len(acc._pending) <= _MAX_PENDING
    assert all(w.reads == 1 for w in watches[: 2 * 2 * _MAX_PENDING])
    assert all(w.reads == 0 for w in watches[2 * 2 * _MAX_PENDING :])


def test_an_accountant_with_pending_timings_pickles_with_them_read():
    """Pickling (dream's checkpoint) and Lightning's plain-data state read the pending timings
    first: the copy holds no device events and equals the eager accountant."""
    kwargs = dict(adapt=True, every=2, k_range=(1, 32), min_measurements=1)
    eager, lazy = Accountant(**kwargs), Accountant(**kwargs)
    _drive(eager, 23, lazy=False)
    _drive(lazy, 23, lazy=True, behind=50)
    assert lazy._pending  # plain steps since the last measurement, not ready
    copy = pickle.loads(pickle.dumps(lazy))
    assert not lazy._pending and not copy._pending
    assert _decisions(copy) == _decisions(eager) == _decisions(lazy)
    # the resumed copy goes on exactly as the original does
    ks_a, _ = _drive(lazy, 15, lazy=False)
    ks_b, _ = _drive(copy, 15, lazy=False)
    assert ks_a == ks_b and _decisions(lazy) == _decisions(copy)


def test_lightning_plain_state_reads_pending_timings():
    pytest.importorskip("pytorch_lightning")
    from carv_pyro.integrations.lightning import _from_plain, _to_plain

    kwargs = dict(adapt=True, every=2, k_range=(1, 32), min_measurements=1)
    eager, lazy = Accountant(**kwargs), Accountant(**kwargs)
    _drive(eager, 23, lazy=False)
    _drive(lazy, 23, lazy=True, behind=50)
    restored = _from_plain(_to_plain(lazy))
    assert _decisions(restored) == _decisions(eager)


def test_an_accountant_restored_from_an_older_state_has_no_pending_timings():
    acc = Accountant(every=1000)
    del acc.__dict__["_pending"]  # a checkpoint written before timings were lazy
    _drive(acc, 3, lazy=False)
    assert acc.step_costs


def test_adaptive_proposal_rebuilds_its_tables_only_after_an_update():
    """``probs`` is the same tensor while the statistics are unchanged, so the inverse-CDF
    table is not rebuilt at every call (on a GPU every rebuild is device work)."""
    pyro.clear_param_store()
    model = make_model(sds(), R=2, K=4)
    guide = carv.TimestepGuide(model, proposal="adaptive", seed=seed(4))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=carv.CARVLoss())
    svi.step()
    q = guide._proposals["sds"][1]
    first = q.probs()
    assert q.probs() is first and q._tables()[0] is first
    svi.step()
    assert q.probs() is not first and not torch.equal(q.probs(), first)


def test_seconds_of_and_is_ready_read_stopwatches_seconds_and_none():
    from carv_pyro.timing import Stopwatch, is_ready, seconds_of

    watch = Stopwatch()
    assert not is_ready(watch)  # a CPU stopwatch is ready once stopped
    watch.stop()
    assert is_ready(watch) and seconds_of(watch) == watch.seconds() >= 0.0
    assert is_ready(0.25) and seconds_of(0.25) == 0.25
    assert is_ready(None) and seconds_of(None) == 0.0


def _cosine_model(objective, amplitude, views=8, two_plates=False):
    """``x = theta + a cos(2 pi u) d`` with ``u ~ U(0, 1)`` over the views: i.i.d.
    ``V_b = c^2 |d|^2 a^2 / 2``, and a lattice of 4 or 8 points cancels the cosine exactly."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with contextlib.ExitStack() as stack:
            if two_plates:
                stack.enter_context(pyro.plate("batch", 2, dim=-3))
            with pyro.plate("views", views, dim=-2):
                u = pyro.sample("u", dist.Uniform(torch.tensor(0.0, dtype=torch.float64), 1.0))
                x = theta + amplitude * torch.cos(2 * math.pi * u).unsqueeze(-1) * DIRECTION
                with carv.draws(4, "noise", dim=-1):
                    carv.teacher_term("sds", objective, x)

    return model


def _measured_v_between(model, outer, steps=60):
    acc = Accountant(every=1, window=steps)
    loss = carv.CARVLoss(accountant=acc)
    guide = carv.Estimator(outer=outer).guide(seed=seed(30))
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), loss=loss)
    for _ in range(steps):
        svi.step()
    return acc.components.mean_between, acc.components.stderr()[1], guide


@pytest.mark.parametrize("outer", [None, "lattice"])
def test_under_an_outer_design_the_accountant_measures_what_the_design_leaves(outer):
    """On a measuring step the guide draws the term's outer plate as two independent
    half-designs, so the outer contrast measures the ``V_b`` a design of ``R / 2`` leaves: 0
    under the lattice for a latent it cancels (a lattice of 4 cancels the cosine as one of 8
    does), the i.i.d. value without a design. Pooled over 60 measuring steps."""
    objective = sds("sds")
    c = sds_constant(objective)
    amplitude = 4.0  # V_b well above V_w / K, so 60 measurements resolve it
    vb_iid = c * c * float((DIRECTION**2).sum()) * amplitude**2 / 2
    vb, se, guide = _measured_v_between(_cosine_model(objective, amplitude), outer)
    if outer is None:
        assert abs(vb - vb_iid) < Z * se and se < 0.25 * vb_iid, (vb, vb_iid, se)
    else:
        assert guide.outer.halved == ["u"]
        assert abs(vb) < Z * se and se < 0.05 * vb_iid, (vb, vb_iid, se)


def test_a_term_with_two_outer_plates_is_measured_as_one_design():
    """Where the halves of a measuring step's contrast are not one plate's (two outer plates)
    the guide draws the design whole, and the accountant reads about the i.i.d. ``V_b`` (8/7
    of it under a lattice of 8: random halves of one set of points) as documented."""
    objective = sds("sds")
    c = sds_constant(objective)
    amplitude = 4.0
    vb_iid = c * c * float((DIRECTION**2).sum()) * amplitude**2 / 2
    vb, se, guide = _measured_v_between(
        _cosine_model(objective, amplitude, two_plates=True), "lattice"
    )
    assert guide.outer.halved == []
    assert vb > 0.3 * vb_iid and se < 0.25 * vb_iid, (vb, vb_iid, se)


@pytest.mark.parametrize("outer", ["lattice", "stratified", "sobol", "antithetic"])
def test_half_designs_keep_every_draw_s_prior_law_and_halves_independent(outer):
    """Each half of a measuring step's design is a design of its own (its draws have the
    prior's law: the Kolmogorov-Smirnov distance of the 4000 draws under 3 / sqrt(4000), which
    i.i.d. draws exceed with probability below 1e-7, and a design's negatively dependent draws
    less often), the two halves are drawn from independent seeds, and the lattice's halves are
    lattices."""
    from pyro.poutine.indep_messenger import CondIndepStackFrame

    from carv_pyro.infer.outer import OuterDesigner, outer_design
    from carv_pyro.infer.samplers import RandomSource

    designer = OuterDesigner(outer_design(outer), RandomSource(seed=seed(31)))
    prior = dist.Uniform(torch.zeros(8, 1, dtype=torch.float64), 1.0)
    frames = (CondIndepStackFrame("views", -2, 8, 0),)
    draws = []
    for _ in range(500):
        designer.begin(halves=True)
        u = designer.draw("u", prior, frames)
        assert designer.halved == ["u"]
        draws.append(u.reshape(8))
    u = torch.stack(draws)  # (500, 8)
    flat, _ = u.reshape(-1).sort()
    ecdf = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    assert float((ecdf - flat).abs().max()) < 3 / math.sqrt(flat.numel())
    if outer == "lattice":
        for half in (u[:, :4], u[:, 4:]):
            gaps = torch.diff(half.sort(dim=1).values, dim=1)
            torch.testing.assert_close(gaps, torch.full_like(gaps, 0.25))
        # the halves' shifts are independent: their offsets mod 1/4 are uncorrelated
        a, b = u[:, :4].min(1).values * 4, u[:, 4:].min(1).values * 4
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) < 5 / math.sqrt(500)
    # without halves the same designer draws one design of 8
    designer.begin()
    designer.draw("u", prior, frames)
    assert designer.halved == []
