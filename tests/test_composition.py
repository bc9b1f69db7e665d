"""Composition with Pyro is correctness: every guide, handler and effect a user may combine with
CARV gives the right gradient, or a clear error.

Set-up (``tests/analytic.py``): a Gaussian teacher of ``N(m, s^2 I)`` data, upstream
``x_r = theta + xi_r d`` with ``xi_r ~ N(0, 1)`` in a ``views`` plate, and ``K`` teacher draws
per view, whose expected theta-gradient has the closed form ``c (theta + E[xi] d - m)``.

Statistical thresholds: z-tests at ``Z = 5`` standard errors per coordinate over
``N = 1000`` independent estimates. The file holds 2 coordinates x 14 such tests = 28; by a
Bonferroni bound the chance of any false alarm is below 28 * 5.7e-7 = 1.6e-5 for any seed. The
user guides are wider than the prior (scale 1.3 > 1 / sqrt(2)), so the importance weights have
finite variance and the normal approximation holds; a guide narrower than ``1 / sqrt(2)`` of the
prior's scale gives an unbiased estimator of infinite variance, which no z-test can check.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal, init_to_value

import carv_pyro as carv
from carv_pyro.infer.loss import log_weights

from .analytic import (
    DIRECTION,
    MEAN,
    STD,
    THETA0,
    expected_grad,
    grad_of,
    make_model,
    sds,
    sds_constant,
    z_scores,
)
from .seeds import seed

Z = 5.0
N = 1000
R, K = 3, 4
HIDE = ["sds.t", "sds.eps", "sds"]


def _zs(loss, model, guide, want, n=N, *args, **kwargs):
    grads = torch.stack([grad_of(loss, model, guide, *args, **kwargs) for _ in range(n)])
    return z_scores(grads, want)


def _upstream(kind: str, model):
    blocked = poutine.block(model, hide=HIDE)
    init = init_to_value(values={"xi": torch.full((R, 1), 0.4, dtype=torch.float64)})
    if kind == "AutoNormal":
        return AutoNormal(blocked, init_scale=1.3, init_loc_fn=init)
    return AutoDiagonalNormal(blocked, init_scale=1.3, init_loc_fn=init)


@pytest.mark.parametrize("kind", ["AutoNormal", "AutoDiagonalNormal"])
@pytest.mark.parametrize("via", ["loss", "estimator"])
def test_autoguides_over_upstream_latents_are_importance_proposals(kind, via):
    """Passed to the loss directly, or as the estimator guide's ``upstream``: unbiased."""
    objective = sds("sds")
    model = make_model(objective, R=R, K=K, inner="draws")
    upstream = _upstream(kind, model)
    if via == "loss":
        guide = upstream
    else:
        guide = carv.Estimator.preset("carv", K=K).guide(model, upstream=upstream, seed=seed(1))
    loss = carv.CARVLoss()
    assert (_zs(loss, model, guide, expected_grad(objective, None)).abs() <= Z).all()
    # the upstream guide's parameters get no gradient from the teacher term
    for name, p in pyro.get_param_store().named_parameters():
        if name != "theta":
            assert p.grad is None, name
    d = loss.diagnostics["sds"]
    if kind == "AutoNormal":  # per-view weights (AutoDiagonalNormal's are joint: one per step)
        assert d.min_weight < d.max_weight
    assert d.mean_weight != 1.0


def test_autoguide_parameters_do_not_move_under_svi():
    objective = sds("sds")
    model = make_model(objective, R=R, K=K, inner="draws")
    upstream = _upstream("AutoNormal", model)
    svi = SVI(model, upstream, pyro.optim.Adam({"lr": 0.05}), loss=carv.CARVLoss())
    svi.step()
    before = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    for _ in range(5):
        svi.step()
    after = dict(pyro.get_param_store().named_parameters())
    for name, value in before.items():
        if name == "theta":
            assert not torch.equal(value, after[name].detach())
        else:
            assert torch.equal(value, after[name].detach()), name


def test_upstream_weights_use_the_full_guide_density_auxiliary_sites_included():
    """Exact: the log-weight of every draw of view r is log N(xi_r; 0, 1) - log q(xi_r)."""
    objective = sds("sds")
    model = make_model(objective, R=R, K=K, inner="draws")
    upstream = _upstream("AutoNormal", model)
    guide = carv.Estimator(K=K).guide(upstream=upstream, seed=seed(2))
    model_trace, guide_trace = guide.run(model)
    record = model_trace.nodes["sds"]["infer"]["carv_term"]
    log_w = log_weights([record], model_trace, guide_trace)["sds"]
    xi = model_trace.nodes["xi"]["value"]  # (R, 1)
    loc = pyro.param("AutoNormal.locs.xi").detach()
    scale = pyro.param("AutoNormal.scales.xi").detach()
    want = dist.Normal(0.0, 1.0).log_prob(xi) - dist.Normal(loc, scale).log_prob(xi)
    torch.testing.assert_close(log_w, want.expand(R, K).to(torch.float64))


def test_autodelta_is_refused_with_a_clear_error():
    objective = sds("sds")
    model = make_model(objective, R=R, K=K)
    guide = AutoDelta(poutine.block(model, hide=HIDE))
    with pytest.raises(ValueError, match="point masses.*AutoDelta"):
        grad_of(carv.CARVLoss(), model, guide)


def test_effect_based_upstream_guides_are_refused():
    from pyro.infer.autoguide import AutoNormalMessenger

    model = make_model(sds("sds"), R=R, K=K)
    with pytest.raises(ValueError, match="effect-based"):
        carv.TimestepGuide(upstream=AutoNormalMessenger(model))


def test_upstream_guide_that_samples_a_teacher_site_is_refused():
    model = make_model(sds("sds"), R=R, K=K)
    with pytest.raises(ValueError, match="teacher site 'sds.eps'"):
        grad_of(carv.CARVLoss(), model, AutoNormal(poutine.block(model, hide=["sds.t", "sds"])))


@pytest.mark.parametrize("joint", [False, True])
def test_hand_written_guides_per_view_and_joint(joint):
    """A shifted, wider proposal for xi, per view inside the plate or jointly outside it."""
    objective = sds("uniform")
    model = make_model(objective, R=R, K=K)
    loc = torch.tensor(0.5, dtype=torch.float64)

    def guide():
        if joint:  # one site outside the plate: the weight of all views is the joint one
            pyro.sample("xi", dist.Normal(loc, 1.3).expand([R, 1]).to_event(2))
        else:
            with pyro.plate("views", R, dim=-2):
                pyro.sample("xi", dist.Normal(loc, 1.3))

    loss = carv.CARVLoss()
    assert (_zs(loss, model, guide, expected_grad(objective, None)).abs() <= Z).all()


@pytest.mark.parametrize("scale", [2.0, 0.25])
def test_poutine_scale_multiplies_the_term(scale):
    objective = sds("sds")
    model = poutine.scale(make_model(objective, R=R, K=K), scale)
    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(seed=seed(3))
    want = scale * expected_grad(objective, None)
    assert (_zs(carv.CARVLoss(), model, guide, want).abs() <= Z).all()


def test_poutine_scale_inside_the_model_scales_the_loss_value_too():
    objective = sds("sds")
    xi = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    plain, scaled = (
        make_model(objective, R, K, xi),
        poutine.scale(make_model(objective, R, K, xi), 3.0),
    )
    guide = carv.Estimator(stratify="per_outer").guide(seed=seed(4))
    state = guide.get_state()
    a = carv.CARVLoss().loss(plain, guide)
    guide.set_state(state)
    b = carv.CARVLoss().loss(scaled, guide)
    assert b == pytest.approx(3.0 * a, rel=1e-12)


def test_poutine_mask_zeroes_masked_views_and_keeps_the_average_over_all_draws():
    objective = sds("sds")
    xi = torch.tensor([0.7, -1.1, 0.4], dtype=torch.float64)
    base = make_model(objective, R, K, xi)
    keep = torch.tensor([[True], [False], [True]])

    def masked():
        with poutine.mask(mask=keep):
            base()

    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(seed=seed(5))
    c = sds_constant(objective)
    x = THETA0 + xi.reshape(R, 1) * DIRECTION
    want = c * ((x - MEAN) * keep.to(x.dtype)).sum(0) / R  # a mean of zeros and values
    assert (_zs(carv.CARVLoss(), masked, guide, want).abs() <= Z).all()
    with poutine.mask(mask=False):
        g = grad_of(carv.CARVLoss(), base, guide)
    assert torch.equal(g, torch.zeros_like(g))


def test_masked_draws_with_nan_teacher_output_are_not_an_error():
    objective = sds("sds")
    xi = torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)
    base = make_model(objective, R, K, xi)

    def masked():
        with poutine.mask(mask=torch.tensor([[True], [False], [True]])):
            base()

    g = grad_of(carv.CARVLoss(), masked, carv.TimestepGuide())
    assert torch.isfinite(g).all()
    with pytest.raises(carv.NonFiniteTeacherError, match="'sds'"):
        grad_of(carv.CARVLoss(), base, carv.TimestepGuide())


def test_poutine_condition_on_t_and_eps_evaluates_the_term_there():
    """Conditioning fixes the design: the value and gradient at those draws, no -log p(t)."""
    objective = sds("sds")
    t0 = 25
    data = {
        "sds.t": torch.full((R, K), t0),
        "sds.eps": torch.zeros(R, K, 2, dtype=torch.float64),
    }
    xi = torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64)
    model = poutine.condition(make_model(objective, R, K, xi), data=data)
    f64 = torch.empty((), dtype=torch.float64)
    a = objective.schedule.alpha(torch.tensor(t0), like=f64)
    s = objective.schedule.sigma(torch.tensor(t0), like=f64)
    w = objective.weight(torch.tensor(t0))
    x = THETA0 + xi.reshape(R, 1) * DIRECTION  # (R, D)
    h = w * a * s * (x - MEAN) / (a * a * STD**2 + s * s)  # eps_hat(alpha x, t0) - 0
    for guide in (carv.TimestepGuide(), carv.Estimator.preset("carv", K=None).guide()):
        loss = carv.CARVLoss()
        value = loss.loss_and_grads(model, guide)
        theta = pyro.param("theta").unconstrained()
        torch.testing.assert_close(theta.grad, h.mean(0))
        assert value == pytest.approx(float(0.5 * (h * h).sum(-1).mean()), rel=1e-10)
        theta.grad = None


@pytest.mark.parametrize("outer", [None, "lattice"])
def test_poutine_replay_of_a_guide_trace_reproduces_its_estimate(outer):
    """Replay keeps the guide's draws and their importance weights: replaying one step's model
    trace under a fresh guide with other seeds gives that step's gradient, bit for bit (the
    weights are those of the proposal, not one; a replay that dropped them would differ)."""
    objective = sds("sds")
    model = make_model(objective, R, K)
    est = carv.Estimator.preset("carv", K=None, outer=outer)
    pyro.param("theta", THETA0.clone())
    torch.manual_seed(seed(12))  # outer=None draws xi from the prior, by torch's generator
    model_trace, _ = est.guide(seed=seed(13)).run(model)
    torch.manual_seed(seed(12))
    step = grad_of(carv.CARVLoss(), model, est.guide(seed=seed(13)))
    replayed = poutine.replay(model, trace=model_trace)
    again = grad_of(carv.CARVLoss(), replayed, est.guide(seed=seed(14)))
    torch.testing.assert_close(again, step, rtol=0, atol=0)
    other = grad_of(carv.CARVLoss(), model, est.guide(seed=seed(14)))
    assert not torch.equal(other, step)
    # the same draws with weight one, as condition evaluates them, give another gradient
    data = {n: model_trace.nodes[n]["value"] for n in ("xi", "sds.t", "sds.eps")}
    fixed = grad_of(carv.CARVLoss(), poutine.condition(model, data=data), est.guide())
    assert not torch.allclose(fixed, step)


def test_condition_with_a_wrong_shape_is_a_clear_error():
    model = poutine.condition(make_model(sds("sds"), R, K), data={"sds.t": torch.tensor(3)})
    with pytest.raises(ValueError, match="site 'sds.t' has shape"):
        grad_of(carv.CARVLoss(), model, carv.TimestepGuide())


def _objective_on(T: int, t_range=(0.1, 0.9)):
    from carv_pyro.schedules import DiscreteSchedule
    from carv_pyro.teachers import GaussianTeacher

    schedule = DiscreteSchedule.linear(T, 1e-3, 0.2 * 60 / T)
    return carv.SDS(GaussianTeacher(MEAN.clone(), STD, schedule), t_range=t_range)


def _expected(objective):
    t = torch.arange(objective.schedule.num_timesteps)
    f64 = torch.empty((), dtype=torch.float64)
    a, s = objective.schedule.alpha(t, like=f64), objective.schedule.sigma(t, like=f64)
    c = float(
        (objective.prior.probs() * objective.weight(t) * a * s / (a * a * STD**2 + s * s)).sum()
    )
    return c * (THETA0 - MEAN)


def test_one_guide_reused_across_objectives_and_models():
    """A guide reused for a wider t_range and for a teacher with another T builds a proposal for
    each objective (a stale one would be zero on part of the new prior's support)."""
    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(seed=seed(6))
    loss = carv.CARVLoss()
    for objective in (_objective_on(60), _objective_on(60, (0.02, 0.98)), _objective_on(200)):
        model = make_model(objective, R=R, K=K)
        assert (_zs(loss, model, guide, _expected(objective)).abs() <= Z).all()
        q = guide.proposal_for("sds", objective)
        assert q.num_timesteps == objective.schedule.num_timesteps


def test_svi_with_a_guide_built_for_another_model_runs_the_svi_model():
    objective = sds("sds")
    model_a = make_model(objective, R=R, K=K, xi=torch.zeros(R, dtype=torch.float64))
    model_b = make_model(objective, R=2, K=2, xi=torch.ones(2, dtype=torch.float64))
    guide = carv.Estimator().guide(model_a, seed=seed(7))
    loss = carv.CARVLoss()
    grad_of(loss, model_b, guide)
    assert loss.last_records[0].batch_shape == (2, 2)


@pytest.mark.parametrize("vectorize", [False, True])
def test_particles(vectorize):
    objective = sds("sds")
    model = make_model(objective, R=R, K=K)
    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(seed=seed(8))
    loss = carv.CARVLoss(num_particles=3, vectorize_particles=vectorize)
    assert (_zs(loss, model, guide, expected_grad(objective, None), n=600).abs() <= Z).all()
    if vectorize:
        assert loss.last_records[0].batch_shape == (3, R, K)


def test_subsampled_outer_plate_averages_over_the_full_plate():
    """A plate of 10 data views subsampled 3 at a time: the average estimates all 10's."""
    objective = sds("sds")
    data = torch.linspace(-1.0, 2.0, 10, dtype=torch.float64)

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 10, subsample_size=3, dim=-2) as idx:
            x = theta + data[idx].reshape(3, 1, 1) * DIRECTION
            with carv.draws(K, dim=-1):
                carv.teacher_term("sds", objective, x)

    guide = carv.Estimator(stratify="per_outer").guide(seed=seed(9))
    want = expected_grad(objective, data)
    assert (_zs(carv.CARVLoss(), model, guide, want).abs() <= Z).all()


def test_proposed_site_with_a_parameter_dependent_prior_is_refused():
    objective = sds("sds")

    def model():
        theta = pyro.param("theta", THETA0.clone())
        mu = pyro.param("mu", torch.tensor(0.0, dtype=torch.float64))
        with pyro.plate("views", R, dim=-2):
            xi = pyro.sample("xi", dist.Normal(mu, 1.0))
            with pyro.plate("noise", K, dim=-1):
                carv.teacher_term("sds", objective, theta + xi.unsqueeze(-1) * DIRECTION)

    def guide():
        with pyro.plate("views", R, dim=-2):
            pyro.sample("xi", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.3))

    with pytest.raises(ValueError, match="'xi' is proposed by the guide but its prior depends"):
        grad_of(carv.CARVLoss(), model, guide)


def test_non_reparameterized_parameter_dependent_prior_site_is_refused():
    objective = sds("sds")

    def model():
        theta = pyro.param("theta", THETA0.clone())
        probs = pyro.param("probs", torch.tensor([0.5, 0.5], dtype=torch.float64))
        with pyro.plate("views", R, dim=-2):
            k = pyro.sample("k", dist.Categorical(probs))
            with pyro.plate("noise", K, dim=-1):
                x = theta + k.unsqueeze(-1).to(theta.dtype) * DIRECTION
                carv.teacher_term("sds", objective, x)

    with pytest.raises(ValueError, match="'k' is not reparameterizable"):
        grad_of(carv.CARVLoss(), model, carv.TimestepGuide())
