"""End-to-end behaviour of CARVLoss + TimestepGuide through Pyro's SVI."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.guides import inner_dims, stratified_uniforms
from carv_pyro.proposals import Categorical

from .analytic import THETA0, D, expected_grad, grad_of, make_model, sds

# z-test threshold: 4.5 standard errors per coordinate. With 2 coordinates x 11 z-tested set-ups
# = 22 tests, a Bonferroni bound puts a false alarm below 22 * 6.8e-6 = 1.5e-4, and the seeds
# are fixed, so the outcome is deterministic.
Z = 4.5
N_REPEATS = 250


@pytest.mark.parametrize(
    "proposal,stratify,noise",
    [
        ("prior", None, "iid"),
        ("prior", "per_outer", "iid"),
        ("prior", "global", "iid"),
        ("weighted", None, "iid"),
        ("weighted", "per_outer", "iid"),
        ("weighted", "global", "iid"),
        ("weighted", "per_outer", "antithetic"),
        ("weighted", "per_outer", "sobol"),
        ("weighted", "global", "antithetic"),
    ],
)
def test_gradient_mean_within_standard_errors(proposal, stratify, noise):
    objective = sds("sds")
    model = make_model(objective, R=3, K=4)  # xi ~ N(0, 1) inside the model
    guide = carv.TimestepGuide(model, proposal=proposal, stratify=stratify, noise=noise)
    loss = carv.CARVLoss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(N_REPEATS)])
    mean, se = grads.mean(0), grads.std(0) / N_REPEATS**0.5
    want = expected_grad(objective, None)
    assert ((mean - want).abs() <= Z * se).all(), (mean, want, se)


def test_svi_step_moves_theta_towards_the_data_mean():
    objective = sds("sds")
    model = make_model(objective, R=2, K=4)
    guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 5.0}), loss=carv.CARVLoss())
    start = (pyro.param("theta", THETA0.clone()).detach() - objective.teacher.mean).norm()
    for _ in range(200):
        svi.step()
    end = (pyro.param("theta").detach() - objective.teacher.mean).norm()
    assert end < 0.2 * start


def test_empty_user_guide_draws_everything_from_the_prior():
    objective = sds("uniform")
    model = make_model(objective, R=2, K=2)
    loss = carv.CARVLoss()

    def empty_guide():
        pass

    grads = torch.stack([grad_of(loss, model, empty_guide) for _ in range(N_REPEATS)])
    mean, se = grads.mean(0), grads.std(0) / N_REPEATS**0.5
    assert ((mean - expected_grad(objective, None)).abs() <= Z * se).all()
    assert loss.diagnostics["sds"].max_weight == 1.0


def test_num_particles_and_differentiable_loss_agree_with_loss_and_grads():
    objective = sds("sds")
    model = make_model(objective, R=2, K=3, xi=torch.tensor([0.1, -0.4], dtype=torch.float64))
    guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
    pyro.set_rng_seed(3)
    g1 = grad_of(carv.CARVLoss(num_particles=3), model, guide)
    pyro.set_rng_seed(3)
    theta = pyro.param("theta").unconstrained()
    theta.grad = None
    carv.CARVLoss(num_particles=3).differentiable_loss(model, guide).backward()
    torch.testing.assert_close(theta.grad, g1)


def test_same_seed_gives_bit_identical_gradients():
    objective = sds("sds")
    model = make_model(objective, R=3, K=4)
    out = []
    for _ in range(2):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        guide = carv.TimestepGuide(model, proposal="weighted", stratify="global", noise="sobol")
        out.append(grad_of(carv.CARVLoss(), model, guide))
    assert torch.equal(out[0], out[1])


def test_user_guide_latents_are_importance_weighted():
    """A user guide that proposes the upstream latent from a shifted law stays unbiased."""
    objective = sds("uniform")
    model = make_model(objective, R=2, K=2)

    def shifted_guide():
        with pyro.plate("views", 2, dim=-2):
            pyro.sample("xi", dist.Normal(torch.tensor(0.5, dtype=torch.float64), 1.2))

    loss = carv.CARVLoss()
    grads = torch.stack([grad_of(loss, model, shifted_guide) for _ in range(N_REPEATS)])
    mean, se = grads.mean(0), grads.std(0) / N_REPEATS**0.5
    assert ((mean - expected_grad(objective, None)).abs() <= Z * se).all()
    assert loss.diagnostics["sds"].max_weight != loss.diagnostics["sds"].min_weight


def test_diagnostics_report_ess_and_weights():
    objective = sds("sds")
    model = make_model(objective, R=2, K=8)
    loss = carv.CARVLoss()
    grad_of(loss, model, carv.TimestepGuide(model, proposal="weighted"))
    d = loss.diagnostics["sds"]
    assert d.batch_shape == (2, 8)
    assert 1.0 <= d.ess <= 16.0
    assert d.min_weight <= d.mean_weight <= d.max_weight
    assert d.n_nonfinite == 0


def test_other_plate_layouts_work():
    """Inner plate outside, outer plate inside: x of shape (1, R, D)."""
    objective = sds("sds")

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("noise", 3, dim=-2), pyro.plate("views", 2, dim=-1):
            xi = torch.tensor([0.2, -0.6], dtype=torch.float64)
            x = theta + xi.reshape(1, 2, 1) * torch.ones(D, dtype=torch.float64)
            carv.teacher_term("sds", objective, x)

    guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
    grad_of(carv.CARVLoss(), model, guide)
    assert inner_dims(torch.Size([3, 2]), torch.Size([1, 2])) == (-2,)


# -- stratification invariants -------------------------------------------------------------


@given(
    R=st.integers(1, 5),
    K=st.integers(1, 6),
    stratify=st.sampled_from(["per_outer", "global"]),
    seed=st.integers(0, 10_000),
)
def test_one_draw_per_stratum(R, K, stratify, seed):
    g = torch.Generator().manual_seed(seed)
    batch = torch.Size([R, K])
    u = stratified_uniforms(
        batch,
        inner_dims(batch, torch.Size([R, 1])),
        stratify,
        lambda s: torch.rand(s, dtype=torch.float64, generator=g),
        lambda s: torch.rand(s, generator=g),
    )
    assert u.shape == batch
    assert ((u >= 0) & (u < 1)).all()
    if stratify == "per_outer":
        strata = (u * K).floor().long().sort(dim=-1).values
        assert torch.equal(strata, torch.arange(K).expand(R, K))
    else:
        strata = (u * R * K).floor().long().flatten().sort().values
        assert torch.equal(strata, torch.arange(R * K))


@given(
    probs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30).filter(lambda p: sum(p) > 0.01),
    u=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=20),
)
def test_icdf_lands_on_the_support_and_inverts_the_cdf(probs, u):
    q = Categorical(torch.tensor(probs, dtype=torch.float64))
    u = torch.tensor(u, dtype=torch.float64)
    t = q.icdf(u)
    assert (q.probs()[t] > 0).all()
    cdf = q.cdf(t)
    below = torch.where(t > 0, q.cdf((t - 1).clamp_min(0)), torch.zeros_like(cdf))
    assert ((below <= u + 1e-12) & (u < cdf + 1e-12)).all()


def test_svi_with_class_label_conditioning_on_mixture_teacher():
    """A conditional analytic teacher (mixture, CFG) runs through SVI with cond broadcast."""
    from carv_pyro.teachers import GaussianMixtureTeacher

    from .analytic import schedule

    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(
        means,
        torch.tensor([0.3, 0.4], dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        schedule(),
    )
    final = {}
    for scale in (1.0, 3.0):
        pyro.clear_param_store()
        objective = carv.SDS(teacher, guidance_scale=scale)

        def model(objective=objective):
            theta = pyro.param("theta", torch.zeros(2, dtype=torch.float64))
            with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 4, dim=-1):
                carv.teacher_term("sds", objective, theta.expand(2, 1, 2), cond=0)

        guide = carv.TimestepGuide(model, "weighted", "per_outer")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=carv.CARVLoss())
        for _ in range(150):
            svi.step()
        final[scale] = pyro.param("theta").detach()
    # without guidance SDS seeks the conditioned component's mode (its mean)...
    assert (final[1.0] - means[0]).norm() < 0.2
    # ...and guidance pushes further away from the other component
    assert final[3.0][0] > final[1.0][0] + 0.2


def test_score_difference_descends_towards_the_real_distribution():
    """VSD/DMD sign: SGD along w (eps_real - eps_fake) moves samples from fake to real."""
    from carv_pyro.teachers import GaussianTeacher

    from .analytic import schedule

    real = GaussianTeacher(torch.tensor([0.0, 0.0], dtype=torch.float64), 1.0, schedule())
    fake = GaussianTeacher(torch.tensor([1.0, 1.0], dtype=torch.float64), 1.0, schedule())
    objective = carv.ScoreDifference(real, fake, weighting="uniform")

    def model():
        theta = pyro.param("theta", torch.ones(2, dtype=torch.float64))
        with pyro.plate("views", 1, dim=-2), pyro.plate("noise", 16, dim=-1):
            carv.teacher_term("dmd", objective, theta.expand(1, 1, 2))

    theta = pyro.param("theta", torch.ones(2, dtype=torch.float64)).unconstrained()
    carv.CARVLoss().loss_and_grads(model, carv.TimestepGuide(model, stratify="per_outer"))
    # the gradient points from the real mean (0) towards the fake one (1): SGD descends to 0
    assert (theta.grad > 0).all()
