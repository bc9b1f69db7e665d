"""Red team: silent bias in the adaptive and fitted parts of the estimator.

The parts that learn from the draws (control variates' online coefficients, the adaptive
timestep proposal, the accountant that sets ``K``) are unbiased only if what a draw is weighted
and corrected with is fixed before that draw is made. These tests check that, exactly where they
can, across the ways a step may run: particles (vectorized or not), a learning step from a fitted
state, a measuring step of the accountant (with scale, mask, importance weights, a second term
and an observed site), a probed ``K``, and resumed state.

Exact expectations: a step from a given state (fit and proposal restored before every node) is
enumerated over its draws: the timestep of each draw over the support of a narrow prior (four
timesteps), the uniform chosen at the midpoint of that timestep's CDF interval under the
proposal the guide holds *when it draws* (so the node's probability is the ``q`` that drew it),
and ``eps`` over a symmetric pair ``+-v`` (exact for the Gaussian teacher's SDS residual with the
``eps`` control variate, which is affine in ``eps`` once the coefficients are fixed). Under the
null (everything a draw uses fixed before it), every later particle's conditional expectation
given the earlier ones is the true gradient, so the enumeration is exact for any number of
particles; a coefficient fitted on the draw it corrects, or a weight with another ``q`` than the
one that drew, shows up as a difference far above rounding.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import carv_pyro as carv
from carv_pyro.infer.control_variates import ControlVariateFit
from carv_pyro.infer.samplers import AbstractNoiseSampler, RandomSource

from .analytic import DIRECTION, THETA0, expected_grad, grad_of, make_model, sds, z_scores
from .seeds import seed

#: a narrow prior: timesteps 30..33 of 60
NARROW = (0.5, 0.56)
XI1 = torch.tensor([0.4], dtype=torch.float64)
V = torch.tensor([0.9, -1.3], dtype=torch.float64)


def _model(objective, R, K, xi):
    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", R, dim=-2):
            x = theta + xi.reshape(R, 1, 1) * DIRECTION
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", objective, x)

    return model


class _Script(RandomSource):
    """Timestep uniforms by plan: each call takes the next list of target timesteps (one per
    draw) and returns the midpoint of each one's CDF interval under the proposal the guide holds
    at that moment, recording that proposal's probability of it."""

    def __init__(self):
        super().__init__(seed=0)
        self.plan: list[list[int]] = []
        self.drawn_with: list[float] = []
        self.guide = None
        self.objective = None

    def uniform(self, shape, device="cpu"):
        targets = self.plan.pop(0)
        assert len(targets) == math.prod(shape)
        q = self.guide.proposal_for("sds", self.objective).probs().to(torch.float64)
        cdf = torch.cat([q.new_zeros(1), q.cumsum(0)])
        u = []
        for t in targets:
            u.append(0.5 * float(cdf[t] + cdf[t + 1]))
            self.drawn_with.append(float(q[t]))
        return torch.tensor(u, dtype=torch.float64).reshape(shape)


class _ScriptNoise(AbstractNoiseSampler):
    """``eps`` by plan: each call takes the next list of signs, one per draw (``eps = s v``)."""

    def __init__(self):
        self.plan: list[list[float]] = []

    def sample(self, layout, event_shape, dtype, device, source):
        signs = torch.tensor(self.plan.pop(0), dtype=dtype)
        eps = signs[:, None] * V.to(dtype)
        return eps.reshape(tuple(layout.batch_shape) + tuple(event_shape))


def _adaptive_state() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in store.keys() if k.startswith("carv.adaptive.")}


def _restore_adaptive(state: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    with torch.no_grad():
        for k, v in state.items():
            store[k].copy_(v)


def _exact_step(objective, proposal, n_particles, vectorize, *, n_warm=12, reused=False):
    """``E`` of one learning step's gradient from a fitted state, by enumeration (see the
    module docstring); also returns the state's coefficients (to check that there was a fit).
    ``reused``: the guide warms up on this model and, in turn, on another (another objective
    with the same prior: the adaptive proposal's statistics are shared, the fits are not)."""
    model = _model(objective, 1, 1, XI1)
    fit = ControlVariateFit(n_bins=4, decay=0.9)
    warm = carv.TimestepGuide(model, proposal=proposal, control_variates=fit, seed=seed(3))
    models = [model]
    if reused:
        other = sds("uniform", t_range=NARROW)
        models.append(_model(other, 2, 3, torch.tensor([1.5, -0.7], dtype=torch.float64)))
    loss = carv.CARVLoss()
    for i in range(n_warm):
        grad_of(loss, models[i % len(models)], warm)
    fit_state = fit.state_of(objective)
    adaptive_state = _adaptive_state()
    gamma = fit.coefficients(objective)

    source, noise = _Script(), _ScriptNoise()
    guide = warm  # the same guide, drawing by plan from here on
    guide.source, guide.noise = source, noise
    source.guide, source.objective = guide, objective
    loss = carv.CARVLoss(
        num_particles=n_particles, vectorize_particles=vectorize, max_plate_nesting=3
    )
    support = torch.nonzero(objective.prior.probs() > 0).flatten().tolist()
    nodes = list(itertools.product(support, (1.0, -1.0)))
    total = torch.zeros(2, dtype=torch.float64)
    for combo in itertools.product(nodes, repeat=n_particles):
        fit.restore(objective, fit_state)
        _restore_adaptive(adaptive_state)
        guide._proposals = {}  # the proposal as built from the restored state
        source.drawn_with = []
        if vectorize:
            source.plan = [[t for t, _ in combo]]
            noise.plan = [[s for _, s in combo]]
        else:
            source.plan = [[t] for t, _ in combo]
            noise.plan = [[s] for _, s in combo]
        g = grad_of(loss, model, guide)
        assert not source.plan and not noise.plan
        prob = math.prod(q * 0.5 for q in source.drawn_with)
        total += prob * g
    return total, gamma


@pytest.mark.parametrize(
    "proposal,n_particles,vectorize",
    [
        ("weighted", 1, False),
        ("weighted", 2, False),
        ("adaptive", 2, False),
        ("adaptive", 2, True),
        ("adaptive", 2, "reused"),
    ],
)
def test_a_learning_step_from_a_fitted_state_is_exactly_unbiased(proposal, n_particles, vectorize):
    """One step that learns (coefficients committed, proposal updated after each particle) from a
    fitted control-variate state and a learned proposal: its exact expectation is the true
    gradient, whether the particles run one after another (the second one's coefficients and
    proposal then depend on the first one's draws) or vectorized, and when the guide also
    serves another model."""
    objective = sds("sds", t_range=NARROW)
    reused = vectorize == "reused"
    got, gamma = _exact_step(objective, proposal, n_particles, vectorize is True, reused=reused)
    assert gamma.abs().max() > 0.05  # a real fit, not zeros
    torch.testing.assert_close(got, expected_grad(objective, XI1), rtol=1e-9, atol=1e-12)


# -- particles and observed sites ----------------------------------------------------------


def _with_observed(objective):
    """A teacher term that gives ``theta`` no gradient, beside an observed site that does:
    ``-log N(0.3; sum(theta), 1)``, gradient ``sum(theta) - 0.3`` in every coordinate."""
    data = torch.tensor(0.3, dtype=torch.float64)

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2), carv.draws(3, "noise", dim=-1):
            carv.teacher_term("sds", objective, theta.detach().expand(2, 1, 2))
        pyro.sample("obs", dist.Normal(theta.sum(), 1.0), obs=data)

    nll = float(-dist.Normal(THETA0.sum(), 1.0).log_prob(data))
    return model, nll, float(THETA0.sum() - data)


@pytest.mark.parametrize("n_particles,vectorize", [(1, False), (3, False), (3, True)])
def test_an_observed_site_counts_once_whatever_the_particles(n_particles, vectorize):
    """Particles average independent estimates, so an observed site's ``-log p`` enters the loss
    and its gradient once. Vectorized particles run as a plate: the site's log-density then
    holds all of them, and it was summed over them (a gradient of 2.7 for 0.9 at 3 particles,
    and the loss 3x)."""
    model, nll, dnll = _with_observed(sds("sds"))
    loss = carv.CARVLoss(num_particles=n_particles, vectorize_particles=vectorize)
    g = grad_of(loss, model, carv.TimestepGuide(seed=seed(1)))
    torch.testing.assert_close(g, torch.full((2,), dnll, dtype=torch.float64))
    values = []  # each particle's teacher value (the rest of the loss is the observed site)
    loss.hooks.append(lambda lo, *_: values.append(lo.diagnostics["sds"].value))
    value = float(loss.loss(model, carv.TimestepGuide(seed=seed(2))))
    assert value - sum(values) / len(values) == pytest.approx(nll, rel=1e-12)


# -- the accountant's measuring step ---------------------------------------------------------

#: a weight the model uses that is not a Pyro param (a module not registered by pyro.module)
_LEAF_INIT = torch.tensor([0.2, -0.1], dtype=torch.float64)
_HIDE = ["sds.t", "sds.eps", "sds", "other.t", "other.eps", "other"]


def _composed_model(leaf):
    """Every effect a measuring step must weigh as a plain step does: a subsampled plate, a
    per-view ``poutine.scale``, a ``poutine.mask`` on draws, a prior-drawn upstream latent, a
    second teacher term, an observed site, and a leaf tensor that is not a Pyro param."""
    objective, other = sds("sds"), sds("uniform")
    scale = torch.tensor([[0.5], [2.0], [1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True]])

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 5, subsample_size=3, dim=-2):
            z = pyro.sample("xi", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
            x = theta + leaf + z.unsqueeze(-1) * DIRECTION
            with poutine.scale(scale=scale), poutine.mask(mask=mask):
                with carv.draws(4, "noise", dim=-1):
                    carv.teacher_term("sds", objective, x)
        with pyro.plate("b", 2, dim=-2), carv.draws(2, "n2", dim=-1):
            carv.teacher_term("other", other, theta.expand(2, 1, 2))
        pyro.sample("obs", dist.Normal(theta.sum(), 1.0), obs=torch.tensor(0.3).double())

    return model


@pytest.mark.parametrize("upstream", [False, True])
@pytest.mark.parametrize("n_particles,vectorize", [(1, False), (2, False), (2, True)])
def test_a_measuring_step_hands_on_the_plain_steps_gradient(upstream, n_particles, vectorize):
    """The quadrant backward of a measuring step accumulates, into every ``.grad`` a plain
    step fills, the plain step's gradient at the same draws: IS weights of an upstream guide,
    scale, mask, subsampling, other terms, observed sites and particles included. A leaf tensor
    that is not a Pyro param got no gradient at all on measuring steps (its ``.grad`` stayed
    ``None``), while plain steps gave it one."""
    grads = []
    for accountant in (None, carv.Accountant(every=1, term="sds")):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed(4))
        leaf = _LEAF_INIT.clone().requires_grad_(True)
        model = _composed_model(leaf)
        up = None
        if upstream:
            up = pyro.infer.autoguide.AutoNormal(poutine.block(model, hide=_HIDE), init_scale=1.3)
        guide = carv.TimestepGuide(
            proposal="weighted", stratify="per_outer", upstream=up, seed=seed(5)
        )
        loss = carv.CARVLoss(
            num_particles=n_particles, vectorize_particles=vectorize, accountant=accountant
        )
        theta = grad_of(loss, model, guide)
        assert leaf.grad is not None
        grads.append(torch.cat([theta, leaf.grad]))
        if accountant is not None:
            assert len(accountant.history) == 1  # it did measure
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-15)


def test_a_probing_step_is_the_plain_step_at_the_probed_k():
    """At ``K = 1`` an adapting accountant's measuring step probes ``K = 2``: that step's
    gradient is exactly a plain step's at ``K = 2`` with the same draws (so it is the unbiased
    ``K = 2`` estimate, any ``K`` being unbiased), IS weights and control variates included."""
    objective = sds("sds")
    xi = torch.tensor([0.3, -0.5, 1.1, 0.2], dtype=torch.float64)
    model = _model(objective, 4, 1, xi)
    est = carv.Estimator(
        K=1, proposal="weighted", stratify="auto", control_variates=True, adapt=True
    )
    runs = []
    for adapting in (True, False):
        guide = est.guide(model, seed=seed(6))
        acc = carv.Accountant(adapt=True, every=1, costs=(1.0, 0.1)) if adapting else None
        loss = carv.CARVLoss(accountant=acc)
        first = grad_of(loss, model, guide)  # K = 1 (the first step of an accountant: plain)
        if not adapting:
            guide.K = 2
        second = grad_of(loss, model, guide)
        assert loss.last_records[0].n_inner == 2
        if adapting:
            assert len(acc.history) == 1  # the second step measured, at K = 2
        runs.append(torch.cat([first, second]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-15)


def test_an_adapting_run_with_control_variates_is_unbiased_z_test():
    """``K`` chosen online (it moves between 1 and 8 here, measuring every other step and
    probing ``K = 2`` at ``K = 1``), control variates fitted online, IS, ``stratify="auto"``
    (global at ``K = 1``, per upstream sample above) and a lattice outer design of the prior
    latent: every step is unbiased given the past, so the mean over the run is, at 5 SE."""
    objective = sds("sds")
    model = make_model(objective, 4, 1, inner="draws")
    est = carv.Estimator(
        K=1,
        proposal="weighted",
        stratify="auto",
        outer="lattice",
        control_variates=True,
        adapt=True,
        k_range=(1, 8),
    )
    acc = carv.Accountant(
        adapt=True, every=2, backoff=1.0, k_range=(1, 8), min_measurements=1, costs=(1.0, 0.002)
    )
    guide = est.guide(model, seed=seed(7))
    loss = carv.CARVLoss(accountant=acc)
    grads, sizes = [], []
    for _ in range(400):
        grads.append(grad_of(loss, model, guide))
        sizes.append(loss.last_records[0].n_inner)
    assert {1, 2}.issubset(sizes) and max(sizes) >= 4, sorted(set(sizes))
    assert guide.control_variates.coefficients(objective).abs().max() > 0.05
    z = z_scores(torch.stack(grads), expected_grad(objective, None))
    assert z.abs().max() < 5.0, z


# -- resuming a fitted state -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_pickled_guide_keeps_its_control_variate_fit(how):
    """A guide with fitted control variates pickles (it raised ``TypeError: cannot pickle
    'weakref.ReferenceType'``: the fit is keyed weakly by objective) and continues exactly as the
    guide that kept going: the fit, the random streams and the adaptive proposal (in the param
    store) are all carried."""
    objective = sds("sds")
    model = _model(objective, 2, 4, torch.tensor([0.3, -0.5], dtype=torch.float64))
    est = carv.Estimator(K=4, proposal="adaptive", stratify="per_outer", control_variates=True)
    guide = est.guide(seed=seed(8))
    loss = carv.CARVLoss()
    for _ in range(15):
        grad_of(loss, model, guide)
    gamma = guide.control_variates.coefficients(objective)
    assert gamma.abs().max() > 0.05
    copied = pickle.loads(pickle.dumps(guide)) if how == "pickle" else copy.deepcopy(guide)
    store = _adaptive_state()
    going_on = [grad_of(loss, model, guide) for _ in range(4)]
    _restore_adaptive(store)
    again = [grad_of(loss, model, copied) for _ in range(4)]
    for a, b in zip(going_on, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the copy met the term again and holds the fit (not a fresh, all-zero one)
    assert copied.control_variates.coefficients(objective).abs().max() > 0.05
