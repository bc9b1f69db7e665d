"""Single-step distillation (DMD): unbiased gradients, Fréchet distance, the bench adapter.

Analytic set-up: real teacher ``N(m_r, s_r^2 I)``, fake teacher ``N(m_f, s_f^2 I)`` (both exact
:class:`GaussianTeacher` denoisers), a linear generator ``x = theta + z d`` with ``z ~ N(0, 1)``.
Without DMD2's normalization the residual ``w(t) (eps_real - eps_fake)`` is affine in ``eps`` and
``x``; with ``D_i(t) = alpha_t^2 s_i^2 + sigma_t^2``,

    E_eps[h | x, t] = w(t) alpha_t sigma_t [ (x - m_r) / D_r(t) - (x - m_f) / D_f(t) ],

so (``J = I``, ``E_z[x] = theta``) the expected generator gradient is exactly

    E[grad] = c_r (theta - m_r) - c_f (theta - m_f),   c_i = sum_t p(t) w(t) alpha_t sigma_t / D_i(t).
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

import carv_pyro as carv
from carv_pyro.pipelines.distillation import (
    DistillationBench,
    DistillationConfig,
    Distiller,
    FakeScore,
    Generator,
    StratifiedLabels,
    dmd_objective,
    frechet_distance,
    make_model,
    tiny_digits_teacher,
    train_distillation,
)
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import AbstractTeacher, GaussianTeacher

T = 60
M_REAL = torch.tensor([0.5, -0.25], dtype=torch.float64)
S_REAL = 0.7
M_FAKE = torch.tensor([1.2, 0.4], dtype=torch.float64)
S_FAKE = 0.5
DIRECTION = torch.tensor([0.3, 0.1], dtype=torch.float64)
THETA0 = torch.tensor([1.0, 0.2], dtype=torch.float64)
T_RANGE = (0.1, 0.9)

# z-test at 4.5 standard errors per coordinate: 2 coordinates x 5 set-ups = 10 tests, a Bonferroni
# bound puts a false alarm below 10 * 6.8e-6 = 6.8e-5; seeds are fixed, so the outcome is too.
Z = 4.5
N_REPEATS = 120


def _schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear(T, 1e-3, 0.2)


class LinearGenerator(nn.Module):
    """``x = theta + z d``: an unconditional generator with a one-dimensional latent."""

    z_dim = 1
    num_classes = None

    def __init__(self, theta: torch.Tensor = THETA0, direction: torch.Tensor = DIRECTION):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.register_buffer("direction", direction.clone())
        self.event_shape = torch.Size(theta.shape)

    def forward(self, z, labels=None):
        return self.theta + z * self.direction  # (N, 1) * (D,) -> (N, D)


def _objective(normalize: bool = False):
    real = GaussianTeacher(M_REAL.clone(), S_REAL, _schedule())
    fake = GaussianTeacher(M_FAKE.clone(), S_FAKE, _schedule())
    return dmd_objective(real, fake, normalize=normalize, weighting="sds", t_range=T_RANGE)


def _expected_grad(objective) -> torch.Tensor:
    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a = objective.schedule.alpha(t, like=f64)
    s = objective.schedule.sigma(t, like=f64)
    pw = objective.prior.probs() * objective.weight(t) * a * s
    c_real = float((pw / (a * a * S_REAL**2 + s * s)).sum())
    c_fake = float((pw / (a * a * S_FAKE**2 + s * s)).sum())
    return c_real * (THETA0 - M_REAL) - c_fake * (THETA0 - M_FAKE)


def _grad(loss, model, guide, generator) -> torch.Tensor:
    generator.theta.grad = None
    loss.loss_and_grads(model, guide)
    return generator.theta.grad.detach().clone()


@pytest.mark.parametrize(
    "K,proposal,stratify,noise",
    [
        (1, "prior", None, "iid"),
        (4, "prior", None, "iid"),
        (4, "prior", "per_outer", "iid"),
        (4, "weighted", "per_outer", "iid"),
        (4, "prior", "per_outer", "sobol"),
    ],
)
def test_dmd_gradient_is_unbiased_on_gaussian_teachers(K, proposal, stratify, noise):
    objective = _objective()
    generator = LinearGenerator()
    model = make_model(generator, objective, R=2, K=K)
    guide = carv.TimestepGuide(model, proposal=proposal, stratify=stratify, noise=noise)
    loss = carv.CARVLoss()
    grads = torch.stack([_grad(loss, model, guide, generator) for _ in range(N_REPEATS)])
    mean, se = grads.mean(0), grads.std(0) / N_REPEATS**0.5
    want = _expected_grad(objective)
    assert ((mean - want).abs() <= Z * se).all(), (mean, want, se)
    assert set(pyro.get_param_store().keys()) == {"generator$$$theta"}  # no teacher params


class _TrackingFake(AbstractTeacher):
    """The exact fake score of the generator's current samples ``N(theta, S^2)``."""

    def __init__(self, generator, std, schedule):
        self.generator, self.std, self.schedule = generator, std, schedule
        self.event_shape = torch.Size([1])

    def _predict_eps(self, x_t, t, cond):
        mean = self.generator.theta.detach()
        a = self.schedule.alpha(t, like=x_t)[:, None]
        s = self.schedule.sigma(t, like=x_t)[:, None]
        return s * (x_t - a * mean) / (a * a * self.std**2 + s * s)


def test_sgd_along_the_dmd_gradient_moves_the_generator_to_the_data():
    """The residual's sign is the descent direction of KL(generator || data)."""
    std = 0.4
    generator = LinearGenerator(torch.tensor([2.0], dtype=torch.float64), torch.tensor([std]))
    real = GaussianTeacher(torch.tensor([-1.0], dtype=torch.float64), std, _schedule())
    objective = dmd_objective(real, _TrackingFake(generator, std, _schedule()), t_range=T_RANGE)
    model = make_model(generator, objective, R=4, K=4)
    guide = carv.TimestepGuide(model, proposal="prior", stratify="per_outer")
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 0.1}), loss=carv.CARVLoss())
    for _ in range(30):
        svi.step()
    assert abs(float(generator.theta.detach()) + 1.0) < 0.3  # started 3.0 away


def test_normalized_residual_equals_dmd2_formula():
    """``(eps_r - eps_f) / mean|eps_r - eps|`` is DMD2's ``(x0_f - x0_r) / mean|x - x0_r|``."""
    objective = _objective(normalize=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(6, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([6, 10, 20, 30, 45, 53])
    batch = objective.noised(x, t, eps, None)
    got = objective.residual_fn(batch)
    x0_real = (batch.x_t - batch.sigma * objective.teacher.predict_eps(batch.x_t, t)) / batch.alpha
    x0_fake = (batch.x_t - batch.sigma * objective.fake.predict_eps(batch.x_t, t)) / batch.alpha
    want = (x0_fake - x0_real) / (x - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(got, want)


def test_stratified_labels_are_balanced_and_marginally_uniform():
    for n, per_class in ((10, 1), (30, 3)):
        labels = StratifiedLabels(10).expand((n, 1)).sample()
        assert labels.shape == (n, 1)
        assert torch.equal(
            torch.bincount(labels.flatten(), minlength=10), torch.full((10,), per_class)
        )
    # the label at one fixed position is uniform: z-test of the 10 counts at 4.5 standard errors
    # (Bonferroni: 10 * 6.8e-6 false-alarm bound), seeded
    n_draws = 4000
    first = torch.stack(
        [StratifiedLabels(10).expand((8, 1)).sample()[0, 0] for _ in range(n_draws)]
    )
    counts = torch.bincount(first, minlength=10).to(torch.float64)
    se = (n_draws * 0.1 * 0.9) ** 0.5
    assert ((counts - n_draws * 0.1).abs() <= Z * se).all(), counts


# -- Fréchet distance ----------------------------------------------------------------------


def test_frechet_distance_of_identical_sets_is_zero():
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    fd = frechet_distance(feats, feats.clone())
    assert abs(fd) < 1e-8 * float(torch.cov(feats.T).trace())


def test_frechet_distance_matches_closed_forms():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(400, 8, dtype=torch.float64, generator=g) @ torch.randn(8, 8, generator=g).to(
        torch.float64
    )
    shift = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)
    cov_a = torch.cov(a.T)
    # same covariance: FD = ||shift||^2
    assert math.isclose(frechet_distance(a, a + shift), float(shift.square().sum()), rel_tol=1e-9)
    # b = 2 a + shift: S_b = 4 S_a, tr sqrt(S_a S_b) = 2 tr S_a, so FD = ||mu_a - mu_b||^2 + tr S_a
    b = 2.0 * a + shift
    want = float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace())
    assert math.isclose(frechet_distance(a, b), want, rel_tol=1e-9)
    assert math.isclose(frechet_distance(b, a), want, rel_tol=1e-9)
    # b = a P with P = V diag(k) V^T (V: eigenvectors of S_a, eigenvalues lam): S_b commutes
    # with S_a, so FD = ||mu_a - mu_b||^2 + sum lam (1 - k)^2
    lam, vecs = torch.linalg.eigh(cov_a)
    k = torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    c = a @ (vecs * k) @ vecs.T + shift
    want = float((a.mean(0) - c.mean(0)).square().sum() + (lam * (1 - k) ** 2).sum())
    assert math.isclose(frechet_distance(a, c), want, rel_tol=1e-8)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="feature sizes"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="feats_b"):
        frechet_distance(torch.randn(5, 4), torch.full((5, 4), float("nan")))


# -- networks, fake score, bench -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher():
    return tiny_digits_teacher(seed=0)


SMALL = {"fake_warmup": 2, "fake_batch": 8, "fake_updates": 1, "fd_samples": 40, "width": 8}


def test_generator_shape_range_and_conditioning():
    gen = Generator(z_dim=8, width=8)
    x = gen(torch.randn(5, 8), torch.arange(5))
    assert x.shape == (5, 1, 16, 16) and x.abs().max() <= 1.0
    with pytest.raises(ValueError, match="labels"):
        gen(torch.randn(5, 8))
    with pytest.raises(ValueError, match="z must"):
        gen(torch.randn(5, 7), torch.arange(5))


def test_fake_score_trains_online_and_stays_frozen(tiny_teacher):
    distiller = Distiller(DistillationConfig(R=2, K=2, **SMALL), teacher=tiny_teacher)
    fake: FakeScore = distiller.fake
    before = [p.detach().clone() for p in fake.teacher.unet.parameters()]
    distiller.fake_step(2)
    after = list(fake.teacher.unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not fake.teacher.requires_grad
    assert not any(p.requires_grad for p in after)
    guide = distiller.guide(2, "prior", "per_outer", "iid")
    with pyro.get_param_store().scope():
        carv.CARVLoss().loss_and_grads(distiller.model, guide)
        names = set(pyro.get_param_store().keys())
    assert names and all(n.startswith("generator$$$") for n in names)
    assert all(p.grad is None for p in fake.teacher.unet.parameters())


@pytest.fixture(scope="module")
def bench(tiny_teacher):
    return DistillationBench(
        quick=True, seed=0, teacher=tiny_teacher, pretrain_steps=1, config=SMALL
    )


def test_bench_estimates_are_finite_and_leave_the_checkpoint_alone(bench):
    rows = bench.configs()
    methods = {r["method"] for r in rows}
    assert {"baseline", "reuse", "reuse+strat", "reuse+IS+strat", "reuse+strat+QMC"} <= methods
    P = sum(p.numel() for p in bench.distiller.parameters())
    fake_before = [p.detach().clone() for p in bench.distiller.fake.teacher.unet.parameters()]
    for row in rows:
        g = bench.estimate(dict(row, R=2))
        assert g.shape == (P,) and torch.isfinite(g).all() and g.abs().sum() > 0
    ref = bench.reference(1)
    assert ref.shape == (P,) and torch.isfinite(ref).all()
    assert bench.checkpoint_unchanged()
    fake_after = list(bench.distiller.fake.teacher.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(fake_before, fake_after))


def test_equal_budget_training_and_extras(bench):
    out = bench.extras(budget_seconds=0.05)
    for key in ("fd_baseline", "fd_carv", "fd_checkpoint"):
        assert math.isfinite(out[key]) and out[key] >= 0
    assert out["steps_baseline"] >= 1 and out["steps_carv"] >= 1
    history = train_distillation(
        bench.config, "baseline", steps=2, init=bench.distiller, eval_every=1, progress=False
    )
    assert history.steps == 2 and len(history.evals) == 2 and history.config.K == 1
    assert bench.checkpoint_unchanged()


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"R": 0}, "R"),
        ({"K": -1}, "K"),
        ({"proposal": "nope"}, "proposal"),
        ({"stratify": "nope"}, "stratify"),
        ({"noise": "antithetic", "K": 3}, "antithetic"),
        ({"fake_init": "nope"}, "fake_init"),
        ({"lr": 0.0}, "lr"),
        ({"t_range": (0.9, 0.1)}, "t_range"),
        ({"labels": "nope"}, "labels"),
    ],
)
def test_bad_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


def test_bad_arguments_name_the_argument(bench):
    with pytest.raises(ValueError, match="estimator"):
        train_distillation(bench.config, "nope", steps=1, init=bench.distiller)
    with pytest.raises(ValueError, match="steps or budget_seconds"):
        train_distillation(bench.config, "carv", init=bench.distiller)
    with pytest.raises(ValueError, match="budget_seconds"):
        train_distillation(bench.config, budget_seconds=-1.0, init=bench.distiller)
    with pytest.raises(ValueError, match="R must"):
        bench.estimate({"R": 0, "K": 4})
    with pytest.raises(ValueError, match="K must"):
        bench.estimate({"R": 2, "K": 0})
    with pytest.raises(ValueError, match="noise"):
        bench.estimate({"R": 2, "K": 2, "noise": "nope"})
    with pytest.raises(ValueError, match="R must"):
        make_model(LinearGenerator(), _objective(), R=0, K=1)
    with pytest.raises(ValueError, match="n must"):
        bench.reference(0)
    assert bench.checkpoint_unchanged()
