"""Single-step distillation (DMD): unbiased gradients, Fréchet distance, training, checkpoints.

Analytic set-up: real teacher ``N(m_r, s_r^2 I)``, fake teacher ``N(m_f, s_f^2 I)`` (both exact
:class:`GaussianTeacher` denoisers), a linear generator ``x = theta + z d`` with ``z ~ N(0, 1)``.
Without DMD2's normalization the residual ``w(t) (eps_real - eps_fake)`` is affine in ``eps`` and
``x``; with ``D_i(t) = alpha_t^2 s_i^2 + sigma_t^2``,

    E_eps[h | x, t] = w(t) alpha_t sigma_t [ (x - m_r) / D_r(t) - (x - m_f) / D_f(t) ],

so (``J = I``, ``E_z[x] = theta``) the expected generator gradient is exactly

    E[grad] = c_r (theta - m_r) - c_f (theta - m_f),   c_i = sum_t p(t) w(t) alpha_t sigma_t / D_i(t).

Every seed is shifted by ``CARV_TEST_SEED`` (``tests/seeds.py``); every assertion holds for any
seed: exact identities, properties that hold for every draw, or z-tests at a stated number of
standard errors with a Bonferroni bound on a false alarm.
"""

from __future__ import annotations

import json
import math
import signal
import textwrap

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import nn

import carv_pyro as carv
from carv_pyro.measure import gradient_estimate
from carv_pyro.pipelines.base import Checkpointer, RunFolderError
from carv_pyro.pipelines.distillation import (
    DEFAULT_ESTIMATOR,
    DistillationBench,
    DistillationConfig,
    Distiller,
    FakeScore,
    Generator,
    StratifiedLabels,
    dmd_objective,
    fid_digits,
    frechet_distance,
    make_model,
    tiny_digits_teacher,
    train_distillation,
)
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import AbstractTeacher, GaussianTeacher

from .seeds import seed
from .signals import signal_when_ready

T = 60
M_REAL = torch.tensor([0.5, -0.25], dtype=torch.float64)
S_REAL = 0.7
M_FAKE = torch.tensor([1.2, 0.4], dtype=torch.float64)
S_FAKE = 0.5
DIRECTION = torch.tensor([0.3, 0.1], dtype=torch.float64)
THETA0 = torch.tensor([1.0, 0.2], dtype=torch.float64)
T_RANGE = (0.1, 0.9)

# Tests at 4.5 standard errors: 2 coordinates x 5 set-ups in the unbiasedness test (the standard
# error estimated from 120 repeats: a t-test with 119 degrees of freedom, 1.6e-5 two-sided) and 10
# class counts in the labels test (known variance: 6.8e-6); a Bonferroni bound puts a false alarm
# for any given seed below 10 * 1.6e-5 + 10 * 6.8e-6 = 2.3e-4.
Z = 4.5
N_REPEATS = 120


def _schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear(T, 1e-3, 0.2)


def _rng(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed(n))


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
    model = make_model(generator, objective, R=2, K=K, rng=_rng(1))
    estimator = carv.Estimator(K=K, proposal=proposal, stratify=stratify, noise=noise)
    guide = estimator.guide(model, seed=seed(2))
    loss = carv.CARVLoss()
    grads = torch.stack(
        [gradient_estimate(loss, model, guide, params=[generator.theta]) for _ in range(N_REPEATS)]
    )
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


def _tracking_setup(normalize: bool, theta: float, K: int = 4):
    std, m_real = 0.4, -1.0
    generator = LinearGenerator(torch.tensor([theta], dtype=torch.float64), torch.tensor([std]))
    real = GaussianTeacher(torch.tensor([m_real], dtype=torch.float64), std, _schedule())
    fake = _TrackingFake(generator, std, _schedule())
    objective = dmd_objective(real, fake, t_range=T_RANGE, normalize=normalize)
    model = make_model(generator, objective, R=4, K=K, rng=_rng(3))
    return generator, objective, model, std, m_real


@pytest.mark.parametrize("normalize", [True, False])
def test_every_dmd_gradient_points_from_the_data_to_the_generator(normalize):
    """With a fake score that tracks the generator and equal spreads, every draw's residual is
    ``alpha_t sigma_t (theta - m) / D_t`` (over ``mean|eps_real - eps|`` when normalized), so every
    estimate, whatever its draws, has the sign of ``theta - m``: descent moves to the data."""
    for i, theta in enumerate((-3.0, -1.2, -0.9, 0.5, 2.0)):
        generator, objective, model, _, m_real = _tracking_setup(normalize, theta)
        guide = carv.Estimator(K=4).guide(model, seed=seed(10 + i))
        with pyro.get_param_store().scope():
            for _ in range(10):
                g = gradient_estimate(carv.CARVLoss(), model, guide, params=[generator.theta])
                assert float(g) * (theta - m_real) > 0, (theta, g)


def test_sgd_along_the_dmd_gradient_moves_the_generator_to_the_data():
    """The residual's sign is the descent direction of KL(generator || data), and SGD converges.

    Without normalization (uniform ``w``) the gradient is ``(theta - m) cbar`` with ``cbar`` the
    mean of ``c(t) = alpha_t sigma_t / D_t`` over the step's draws, so one SGD step maps
    ``theta - m`` to ``(theta - m)(1 - lr cbar)``. Stratified per sample with ``K = 4``, every
    sample's draws hold one timestep from each quarter of ``p(t)``, so ``cbar`` lies between the
    mean over quarters of the smallest and of the largest ``c`` in each quarter: the distance to
    the data then shrinks at least geometrically for every seed, never overshooting.
    """
    theta0, K, lr, n_steps = 2.0, 4, 0.5, 20
    generator, objective, model, _, m_real = _tracking_setup(False, theta0, K=K)
    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a, s = objective.schedule.alpha(t, like=f64), objective.schedule.sigma(t, like=f64)
    c = a * s / (a * a * 0.4**2 + s * s)
    lows, highs = [], []
    for b in range(K):
        edges = torch.tensor([b / K, (b + 1) / K - 1e-12], dtype=torch.float64)
        t0, t1 = objective.prior.icdf(edges).tolist()
        lows.append(float(c[t0 : t1 + 1].min()))
        highs.append(float(c[t0 : t1 + 1].max()))
    c_lo, c_hi = sum(lows) / K, sum(highs) / K
    assert 0 < lr * c_lo <= lr * c_hi < 1  # a contraction without overshoot
    guide = carv.Estimator(K=K, stratify="per_outer").guide(model, seed=seed(4))
    svi = SVI(model, guide, pyro.optim.SGD({"lr": lr}), loss=carv.CARVLoss())
    gap = theta0 - m_real
    for _ in range(n_steps):
        before = float(generator.theta.detach()) - m_real
        svi.step()
        after = float(generator.theta.detach()) - m_real
        slack = 1e-9 * abs(before)
        assert before * (1 - lr * c_hi) - slack <= after <= before * (1 - lr * c_lo) + slack
    bound = gap * (1 - lr * c_lo) ** n_steps
    assert 0 < float(generator.theta.detach()) - m_real <= bound + 1e-9
    assert bound < 0.1  # started 3.0 away


def test_normalized_residual_equals_dmd2_formula():
    """``(eps_r - eps_f) / mean|eps_r - eps|`` is DMD2's ``(x0_f - x0_r) / mean|x - x0_r|``."""
    objective = _objective(normalize=True)
    g = _rng(0)
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
    g = _rng(5)
    for n, per_class in ((10, 1), (30, 3)):
        labels = StratifiedLabels(10, generator=g).expand((n, 1)).sample()
        assert labels.shape == (n, 1)
        assert torch.equal(
            torch.bincount(labels.flatten(), minlength=10), torch.full((10,), per_class)
        )
    # the label at one fixed position is uniform: z-test of the 10 counts at Z standard errors
    n_draws = 4000
    first = torch.stack(
        [StratifiedLabels(10, generator=g).expand((8, 1)).sample()[0, 0] for _ in range(n_draws)]
    )
    counts = torch.bincount(first, minlength=10).to(torch.float64)
    se = (n_draws * 0.1 * 0.9) ** 0.5
    assert ((counts - n_draws * 0.1).abs() <= Z * se).all(), counts


def test_model_latents_come_from_its_generator():
    """The model's draws are a function of its ``rng`` alone (the global RNG is not used)."""
    generator = LinearGenerator()

    def z_of(rng_seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        model = make_model(
            generator, _objective(), R=3, K=2, rng=torch.Generator().manual_seed(rng_seed)
        )
        trace = pyro.poutine.trace(model).get_trace()
        return trace.nodes["z"]["value"]

    assert torch.equal(z_of(seed(6), 1), z_of(seed(6), 2))
    assert not torch.equal(z_of(seed(6), 1), z_of(seed(7), 1))
    trace = pyro.poutine.trace(make_model(generator, _objective(), R=3, K=2)).get_trace()
    assert trace.nodes["dmd"]["infer"]["carv_draws"] == "noise"  # the reserved inner plate


# -- Fréchet distance ----------------------------------------------------------------------


def test_frechet_distance_of_identical_sets_is_zero():
    feats = torch.randn(300, 16, generator=_rng(1))
    fd = frechet_distance(feats, feats.clone())
    assert abs(fd) < 1e-8 * float(torch.cov(feats.T).trace())


def test_frechet_distance_matches_closed_forms():
    g = _rng(2)
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


# -- networks, fake score ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher():
    return tiny_digits_teacher(seed=seed(0))


SMALL = {"fake_warmup": 2, "fake_batch": 8, "fake_updates": 1, "fd_samples": 40, "width": 8}


def _small(**changes) -> DistillationConfig:
    settings = dict(SMALL, R=2, estimator=carv.Estimator.preset("stratified", K=2), seed=seed(0))
    settings.update(changes)
    return DistillationConfig(**settings)


def test_generator_shape_range_and_conditioning():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed(0))
        gen = Generator(z_dim=8, width=8)
    x = gen(torch.randn(5, 8, generator=_rng(1)), torch.arange(5))
    assert x.shape == (5, 1, 16, 16) and x.abs().max() <= 1.0
    with pytest.raises(ValueError, match="labels"):
        gen(torch.randn(5, 8))
    with pytest.raises(ValueError, match="z must"):
        gen(torch.randn(5, 7), torch.arange(5))


def test_fake_score_trains_online_and_stays_frozen(tiny_teacher):
    distiller = Distiller(_small(), teacher=tiny_teacher)
    fake: FakeScore = distiller.fake
    before = [p.detach().clone() for p in fake.teacher.unet.parameters()]
    distiller.fake_step(2)
    after = list(fake.teacher.unet.parameters())
    assert fake.updates == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not fake.teacher.requires_grad
    assert not any(p.requires_grad for p in after)
    assert all(p.grad is None for p in after)
    guide = distiller.guide(seed=seed(1))
    with pyro.get_param_store().scope():
        carv.CARVLoss().loss_and_grads(distiller.model, guide)
        names = set(pyro.get_param_store().keys())
    assert names and all(n.startswith("generator$$$") for n in names)
    assert all(p.grad is None for p in fake.teacher.unet.parameters())
    # a clone is independent: training it leaves the original alone
    other = fake.clone()
    other.update(torch.zeros(4, 1, 16, 16), torch.arange(4))
    assert other.updates == 3 and fake.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(after, fake.teacher.unet.parameters()))


def test_distiller_gradient_draws_afresh_and_leaves_grads_alone(tiny_teacher):
    distiller = Distiller(_small(), teacher=tiny_teacher)
    distiller.fake_step(1)  # the fake starts as a copy of the real teacher: zero residuals
    P = sum(p.numel() for p in distiller.parameters())
    g1 = distiller.gradient(2, 2)
    g2 = distiller.gradient(2, 2)
    g3 = distiller.gradient(2, 4, "carv")
    assert g1.shape == g2.shape == g3.shape == (P,) and torch.isfinite(g3).all()
    assert not torch.equal(g1, g2)  # the cached guide and the latents draw afresh
    assert all(p.grad is None for p in distiller.parameters())
    assert len(pyro.get_param_store().keys()) == 0  # a private param store


def test_stratified_labels_spread_the_models_samples_over_the_classes(tiny_teacher):
    distiller = Distiller(_small(R=10, labels="stratified"), teacher=tiny_teacher)
    with pyro.get_param_store().scope():
        for _ in range(3):
            trace = pyro.poutine.trace(distiller.model).get_trace()
            labels = trace.nodes["label"]["value"]  # (R, 1)
            assert labels.shape == (10, 1)
            assert torch.equal(
                torch.bincount(labels.flatten(), minlength=10), torch.ones(10).long()
            )


# -- training, checkpoints -----------------------------------------------------------------------


def _same_state(a: Distiller, b: Distiller) -> bool:
    pairs = [
        (a.generator.state_dict(), b.generator.state_dict()),
        (a.fake.teacher.unet.state_dict(), b.fake.teacher.unet.state_dict()),
    ]
    return all(torch.equal(x[k], y[k]) for x, y in pairs for k in x) and (
        a.fake.updates == b.fake.updates
    )


def _fds(history) -> list[tuple[int, float]]:
    return [(e["step"], e["fd"]) for e in history.evals]


def test_training_leaves_the_global_rng_alone(tiny_teacher):
    config = _small()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        runs.append(train_distillation(config, steps=2, teacher=tiny_teacher, progress=False))
        assert torch.equal(state, torch.get_rng_state())
    assert _same_state(runs[0].distiller, runs[1].distiller)
    assert runs[0].loss == runs[1].loss and _fds(runs[0]) == _fds(runs[1])
    assert [e["step"] for e in runs[0].evals] == [0, 2]  # before the first step and at the end


def test_resume_extends_a_finished_run_exactly_and_never_overwrites_it(tiny_teacher, tmp_path):
    config = _small()
    kwargs = dict(teacher=tiny_teacher, progress=False, eval_every=1)
    whole = train_distillation(config, steps=3, **kwargs)
    out = tmp_path / "run"
    first = train_distillation(config, steps=2, out_dir=out, **kwargs)
    assert json.loads((out / "carv-run.json").read_text())["state"] == "finished"
    assert json.loads((out / "history.json").read_text())["steps"] == 2
    saved = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="--resume"):
        train_distillation(config, steps=3, out_dir=out, **kwargs)
    assert (out / "checkpoint.pt").read_bytes() == saved  # untouched
    with pytest.raises(ValueError, match="differs"):
        train_distillation(config.replace(R=3), steps=3, out_dir=out, resume=True, **kwargs)
    resumed = train_distillation(None, steps=3, out_dir=out, resume=True, **kwargs)
    assert resumed.steps == 3 and first.steps == 2
    assert _same_state(whole.distiller, resumed.distiller)
    assert resumed.loss == whole.loss and _fds(resumed) == _fds(whole)
    again = train_distillation(config, steps=1, out_dir=out, overwrite=True, **kwargs)
    assert again.steps == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        train_distillation(config, steps=1, out_dir=foreign, **kwargs)
    assert (foreign / "notes.txt").read_text() == "mine"


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from carv_pyro.pipelines.base import RunStopped
    from carv_pyro.pipelines.distillation import (
        DistillationConfig, tiny_digits_teacher, train_distillation)

    out, teacher_seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = DistillationConfig.from_dict(json.loads(sys.argv[4]))

    def hook(state, metrics):
        print(f"step {state.step}", flush=True)
        if state.step == 2:
            sys.stdin.readline()  # the parent sends SIGTERM, then a line

    try:
        train_distillation(config, steps=steps, teacher=tiny_digits_teacher(seed=teacher_seed),
                           out_dir=out, evaluate=False, hooks=[hook], progress=False)
    except RunStopped as stop:
        print(f"stopped after {stop.step}", flush=True)
        sys.exit(stop.exit_code)
    print("finished", flush=True)
    """
)


def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(tiny_teacher, tmp_path):
    """A SIGTERM in the middle of a run: the step in progress finishes, the state is
    checkpointed, and the resumed run ends exactly where the uninterrupted one does."""
    config = _small(estimator=carv.Estimator.preset("carv", K=2))
    steps, out = 4, tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    argv = [str(script), str(out), str(seed(0)), str(steps), json.dumps(config.to_dict())]
    code, lines, err = signal_when_ready(argv, signal.SIGTERM, ready="step 2")
    assert code == 128 + signal.SIGTERM, (lines, err[-2000:])
    assert "stopped after 2" in lines
    assert json.loads((out / "carv-run.json").read_text())["state"] == "running"
    assert Checkpointer(out / "checkpoint.pt").load()["loop"]["step"] == 2
    kwargs = dict(steps=steps, teacher=tiny_teacher, evaluate=False, progress=False)
    resumed = train_distillation(out_dir=out, resume=True, **kwargs)
    whole = train_distillation(config, **kwargs)
    assert resumed.step == whole.step == list(range(1, steps + 1))
    assert _same_state(whole.distiller, resumed.distiller)
    assert resumed.loss == whole.loss and resumed.fake_loss == whole.fake_loss


# -- config ------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    default = DistillationConfig()
    assert default.estimator == DEFAULT_ESTIMATOR
    assert (default.estimator.K, default.estimator.stratify) == (16, "per_outer")
    assert default.estimator.proposal == "prior"  # IS measured to hurt here
    custom = DistillationConfig(
        estimator=carv.Estimator(K=6, proposal="weighted", stratify="global", noise="sobol"),
        seed=seed(3),
        R=3,
        t_range=(0.1, 0.8),
        betas=(0.0, 0.9),
        labels="stratified",
        fake_init="scratch",
        fake_channels=(8, 16),
    )
    for config in (default, custom, DistillationConfig(estimator="carv")):
        data = json.loads(json.dumps(config.to_dict()))
        assert DistillationConfig.from_dict(data) == config
    assert DistillationConfig(estimator="carv").estimator == carv.Estimator.preset("carv")
    with pytest.raises(ValueError, match="K"):
        DistillationConfig.from_dict({"K": 4})  # the estimator holds K now


# -- the bench adapter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tiny_teacher):
    return DistillationBench(
        quick=True, seed=seed(0), teacher=tiny_teacher, pretrain_steps=1, config=SMALL
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
    assert out["estimators"] == ["baseline", "stratified"]
    for key in ("fd_baseline", "fd_stratified", "fd_checkpoint"):
        assert math.isfinite(out[key]) and out[key] >= 0
    assert out["steps_baseline"] >= 1 and out["steps_stratified"] >= 1
    history = train_distillation(
        bench.config, "baseline", steps=2, init=bench.distiller, eval_every=1, progress=False
    )
    assert history.steps == 2 and [e["step"] for e in history.evals] == [0, 1, 2]
    assert history.config.estimator.K == 1 and history.estimator == "baseline"
    assert bench.checkpoint_unchanged()


def test_bench_takes_the_arguments_carv_pyro_bench_passes(tiny_teacher):
    smoke = DistillationBench(
        quick=True, seed=seed(1), device="cpu", smoke=True, teacher=tiny_teacher, pretrain_steps=0
    )
    assert smoke.R == 2 and smoke.pretrain_steps == 0
    g = smoke.estimate(smoke.configs()[0])
    assert g.shape == (sum(p.numel() for p in smoke.params()),)


# -- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"R": 0}, "R"),
        ({"estimator": "nope"}, "estimator"),
        ({"fake_init": "nope"}, "fake_init"),
        ({"lr": 0.0}, "lr"),
        ({"fake_lr": -1.0}, "fake_lr"),
        ({"t_range": (0.9, 0.1)}, "t_range"),
        ({"t_range": (0.1, 1.0)}, "t_range"),
        ({"betas": (0.5, 1.0)}, "betas"),
        ({"betas": (0.5,)}, "betas"),
        ({"labels": "nope"}, "labels"),
        ({"normalize": "yes"}, "normalize"),
        ({"fake_channels": (8, 0)}, "fake_channels"),
        ({"fake_updates": -1}, "fake_updates"),
        ({"fd_samples": 1}, "fd_samples"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
    ],
)
def test_bad_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(**kwargs)


def test_bad_arguments_name_the_argument(bench, tmp_path):
    config, init = bench.config, bench.distiller
    with pytest.raises(ValueError, match="estimator"):
        train_distillation(config, "nope", steps=1, init=init)
    with pytest.raises(ValueError, match="steps or budget_seconds"):
        train_distillation(config, "carv", init=init)
    with pytest.raises(ValueError, match="budget_seconds"):
        train_distillation(config, budget_seconds=-1.0, init=init)
    with pytest.raises(ValueError, match="steps"):
        train_distillation(config, steps=0, init=init)
    with pytest.raises(ValueError, match="eval_every"):
        train_distillation(config, steps=1, eval_every=0, init=init)
    with pytest.raises(ValueError, match="fake_warmup"):
        train_distillation(config, steps=1, fake_warmup=-1, init=init)
    with pytest.raises(ValueError, match="clock"):
        train_distillation(config, steps=1, clock="sundial", init=init)
    with pytest.raises(ValueError, match="out_dir"):
        train_distillation(config, steps=1, resume=True, init=init)
    with pytest.raises(ValueError, match="nothing to resume"):
        train_distillation(config, steps=1, out_dir=tmp_path / "empty", resume=True, init=init)
    with pytest.raises(TypeError, match="config"):
        train_distillation({"R": 2}, steps=1, init=init)
    with pytest.raises(ValueError, match="R must"):
        bench.estimate({"R": 0, "K": 4})
    with pytest.raises(ValueError, match="K must"):
        bench.estimate({"R": 2, "K": 0})
    with pytest.raises(ValueError, match="noise"):
        bench.estimate({"R": 2, "K": 2, "noise": "nope"})
    with pytest.raises(ValueError, match="R must"):
        make_model(LinearGenerator(), _objective(), R=0, K=1)
    with pytest.raises(ValueError, match="labels"):
        make_model(LinearGenerator(), _objective(), R=1, K=1, labels="nope")
    with pytest.raises(ValueError, match="n must"):
        bench.reference(0)
    with pytest.raises(ValueError, match="R must"):
        init.gradient(0)
    with pytest.raises(ValueError, match="n must"):
        fid_digits(init.generator, 1)
    with pytest.raises(ValueError, match="pretrain_steps"):
        DistillationBench(quick=True, seed=0, teacher=init.real, pretrain_steps=-1, config=SMALL)
    with pytest.raises(ValueError, match="fake_init"):
        FakeScore.from_teacher(init.real, init="nope")
    assert bench.checkpoint_unchanged()
