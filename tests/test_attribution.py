"""Tests for the D-TRAK-style attribution pipeline (``carv_pyro.pipelines.attribution``).

Unbiasedness is checked two ways: on an analytic teacher whose denoising-loss gradient w.r.t. a
learnable mean has a closed form, and on a tiny diffusers UNet against a reference that
enumerates every timestep of a short schedule exactly with many noise draws per timestep (the
oracle). The pilot proposal is checked exactly (it is the second-moment proposal of the draws it
made) and statistically (those second moments estimate the closed form).

Statistical thresholds: every z-test is at ``Z = 5`` standard errors. The file runs
3 coordinates x 2 examples x 7 set-ups (analytic, sample standard errors of 100 estimates)
+ 6 coordinates x 2 examples (UNet, 60 estimates) + 1 (projection, 200 projections) tests
against Student-t tails, and 6 bins x 2 (pilot: second moments and bin counts, exact standard
errors) against normal tails: a Bonferroni bound puts the chance of a false alarm for any seed
below 42 * 2.5e-6 + 12 * 5.4e-6 + 1.3e-6 + 12 * 5.7e-7 = 1.8e-4 (each statistic is a mean of at
least about 50 independent draws, so the normal approximation holds). Every seed is shifted by
``CARV_TEST_SEED`` (``tests/seeds.py``).
"""

from __future__ import annotations

import json
import signal
import warnings

import pyro
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

import carv_pyro as carv
from carv_pyro.infer.samplers import RandomSource
from carv_pyro.pipelines.attribution import (
    AttributionBench,
    AttributionFeaturizer,
    RandomProjection,
    VAEEncoder,
    attribute,
    attribution_scores,
    geometric_bins,
    pick_examples,
    pilot_proposal,
    rank_correlation,
    select_parameters,
)
from carv_pyro.pipelines.attribution._random_init import random_init
from carv_pyro.pipelines.attribution.recorder import DrawRecorder
from carv_pyro.pipelines.base import RunFolderError
from carv_pyro.proposals import WeightedProposal, second_moment_proposal
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import AbstractTeacher, DiffusersTeacher
from carv_pyro.teachers.trainable import trainable
from carv_pyro.timesteps import UniformTimesteps

from .seeds import seed
from .signals import signal_when_ready

Z = 5.0


def _seeds(base: int, n: int) -> list[int]:
    """``n`` independent seeds derived from ``base`` (disjoint streams for different bases)."""
    source = RandomSource(seed=base)
    return [source.integer_seed() for _ in range(n)]


ESTIMATORS = [
    ("prior", None, "iid"),
    ("prior", "per_outer", "iid"),
    ("weighted", None, "iid"),
    ("weighted", "per_outer", "iid"),
    ("weighted", "per_outer", "antithetic"),
    ("pilot", "per_outer", "iid"),  # pilot_proposal's q*, estimated on other examples
    ("pilot", "per_outer", "sobol"),
]


# --------------------------------------------------------------------- analytic teacher

T_ANALYTIC = 20
STD = 0.6
D = 3


class LearnableGaussianTeacher(AbstractTeacher):
    """Exact denoiser of ``N(m, STD^2 I)`` with a learnable ``m``: ``eps_hat`` is affine in ``m``.

    ``eps_hat - eps = A_t (x - m) + B_t eps`` with ``A = sigma alpha / den`` and
    ``B = sigma^2 / den - 1`` (``den = alpha^2 STD^2 + sigma^2``), so the per-draw loss
    ``w ||.||^2 / D`` has gradient ``g = -(2 / D) w A (A (x - m) + B eps)`` w.r.t. ``m``,
    ``E_eps g = -(2 / D) w A^2 (x - m)``, and the feature is ``-(2 / D) E_p[w A^2] (x - m)``.
    """

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule
        self.event_shape = torch.Size([D])
        self.cond_event_shape = None
        self.net = nn.Module()
        self.net.mean = nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        self.net.requires_grad_(False)

    def _predict_eps(self, x_t, t, cond):
        a = self.schedule.alpha(t, like=x_t)[:, None]
        s = self.schedule.sigma(t, like=x_t)[:, None]
        return s * (x_t - a * self.net.mean) / (a * a * STD**2 + s * s)


def _analytic():
    teacher = LearnableGaussianTeacher(DiscreteSchedule.linear(T_ANALYTIC, 1e-3, 0.3))
    featurizer = AttributionFeaturizer(teacher, module=teacher.net, dim=None)
    return teacher, featurizer


def _coefficients(objective):
    """``(w, A, B)`` per timestep, float64 ``(T,)`` each."""
    t = torch.arange(T_ANALYTIC)
    f64 = torch.empty((), dtype=torch.float64)
    a, s = objective.schedule.alpha(t, like=f64), objective.schedule.sigma(t, like=f64)
    den = a * a * STD**2 + s * s
    return objective.weight(t).to(torch.float64), s * a / den, s * s / den - 1


def _analytic_feature(featurizer, teacher, x: torch.Tensor) -> torch.Tensor:
    obj = featurizer.objective
    w, A, _ = _coefficients(obj)
    c = (obj.prior.probs() * w * A * A).sum()
    return -(2.0 / D) * c * (x - teacher.net.mean.detach())


@pytest.mark.parametrize("proposal,stratify,noise", ESTIMATORS)
def test_analytic_feature_is_unbiased(proposal, stratify, noise):
    teacher, featurizer = _analytic()
    x = torch.tensor([[1.0, 0.5, -1.0], [-0.4, 0.8, 0.2]], dtype=torch.float64)
    if proposal == "pilot":
        other = torch.tensor([[0.0, -1.0, 0.5]], dtype=torch.float64)
        proposal = pilot_proposal(featurizer, other, n_draws=24, n_bins=6, seed=seed(3))
    estimator = carv.Estimator(K=4, proposal=proposal, stratify=stratify, noise=noise)
    n = 100
    est = torch.stack(
        [
            featurizer.features(x, estimator=estimator, shared_draws=False, seed=s).features
            for s in _seeds(seed(10), n)
        ]
    )
    mean, se = est.mean(0), est.std(0) / n**0.5
    want = _analytic_feature(featurizer, teacher, x)
    assert ((mean - want).abs() <= Z * se).all(), (mean - want) / se


def _record_pilot(featurizer, x, **kwargs):
    """Run `pilot_proposal` with a loss whose hook records every pilot draw."""
    recorder = DrawRecorder("denoise")
    loss = carv.CARVLoss()
    loss.hooks.append(recorder)
    q = pilot_proposal(featurizer, x, loss=loss, **kwargs)
    t = torch.cat([v.reshape(-1) for v in recorder.timesteps])  # (n_draws * n_examples,)
    eps = torch.cat([v.reshape(-1, D) for v in recorder.noise])
    example = torch.arange(t.numel()) % x.shape[0]  # the pilot runs the examples in turn
    return q, t, eps, example


def test_pilot_proposal_is_the_second_moment_q_star_of_its_draws():
    """Exact: q is `second_moment_proposal` of the per-bin mean squared norms of its draws'
    (unweighted) gradients, recomputed here in closed form; and it is a defensive mixture."""
    teacher, featurizer = _analytic()
    x = torch.tensor([[1.0, 0.5, -1.0], [0.0, -1.0, 0.5]], dtype=torch.float64)
    q, t, eps, example = _record_pilot(
        featurizer, x, n_draws=8, n_bins=6, defensive=0.2, seed=seed(0)
    )
    obj = featurizer.objective
    p = obj.prior.probs()
    w, A, B = _coefficients(obj)
    r = x - teacher.net.mean.detach()
    g = -(2 / D) * (w * A)[t, None] * (A[t, None] * r[example] + B[t, None] * eps)
    bins = geometric_bins(obj.prior, 6)
    n_bins = int(bins.max()) + 1
    sq = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins[t], g.pow(2).sum(1))
    count = torch.bincount(bins[t], minlength=n_bins).to(torch.float64)
    m2 = torch.where(count > 0, sq / count.clamp_min(1), torch.nan)
    want = second_moment_proposal(obj.prior, bins, m2, defensive=0.2).probs()
    torch.testing.assert_close(q.probs(), want, rtol=1e-9, atol=1e-12)
    assert abs(float(q.probs().sum()) - 1.0) < 1e-12
    assert ((q.probs() > 0) == (p > 0)).all()
    assert float((p / q.probs()).max()) <= 1 / 0.2 + 1e-9  # weights bounded by 1 / a
    with pytest.raises(ValueError, match="defensive"):
        pilot_proposal(featurizer, x, defensive=0.0)


def test_pilot_draws_cover_the_bins_evenly_and_estimate_the_second_moments():
    """Statistical: the pilot draws every bin with probability 1 / n_bins and, within a bin,
    ``t`` by the prior, so its per-bin mean squared norm estimates ``E[||g||^2 | t in bin]``.

    Conditional on which example and bin each draw fell in, the per-bin mean has expectation
    ``sum_i n_ib mu_ib / n_b`` and variance ``sum_i n_ib sigma_ib^2 / n_b^2``, in closed form
    (``||A r + B eps||^2`` has mean ``A^2 |r|^2 + B^2 D`` and variance
    ``4 A^2 B^2 |r|^2 + 2 B^4 D``).
    """
    teacher, featurizer = _analytic()
    x = torch.tensor([[1.0, 0.5, -1.0], [0.0, -1.0, 0.5]], dtype=torch.float64)
    n_draws = 160  # 320 draws over 6 bins: about 53 a bin
    _, t, eps, example = _record_pilot(featurizer, x, n_draws=n_draws, n_bins=6, seed=seed(1))
    obj = featurizer.objective
    p = obj.prior.probs()
    w, A, B = _coefficients(obj)
    bins = geometric_bins(obj.prior, 6)
    n_bins = int(bins.max()) + 1
    N = t.numel()
    count = torch.bincount(bins[t], minlength=n_bins).to(torch.float64)
    assert ((count - N / n_bins).abs() <= Z * (N * (1 / n_bins) * (1 - 1 / n_bins)) ** 0.5).all()

    r2 = ((x - teacher.net.mean.detach()) ** 2).sum(1)  # (n_examples,)
    c2 = ((2 / D) * w * A) ** 2  # (T,)
    mean_v = A[None] ** 2 * r2[:, None] + B[None] ** 2 * D  # (n_examples, T)
    var_v = 4 * A[None] ** 2 * B[None] ** 2 * r2[:, None] + 2 * B[None] ** 4 * D
    m1 = c2 * mean_v  # E ||g||^2 | t, x_i
    m4 = c2**2 * (var_v + mean_v**2)  # E ||g||^4 | t, x_i
    mass = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, p)
    within = p / mass[bins]  # t | bin
    mu = torch.zeros(x.shape[0], n_bins, dtype=torch.float64).index_add_(1, bins, within * m1)
    mom4 = torch.zeros(x.shape[0], n_bins, dtype=torch.float64).index_add_(1, bins, within * m4)
    var = mom4 - mu**2

    g = (
        -(2 / D)
        * (w * A)[t, None]
        * (A[t, None] * (x - teacher.net.mean.detach())[example] + B[t, None] * eps)
    )
    sq = g.pow(2).sum(1)
    for b in range(n_bins):
        in_b = bins[t] == b
        n_ib = torch.bincount(example[in_b], minlength=x.shape[0]).to(torch.float64)
        target = (n_ib * mu[:, b]).sum() / n_ib.sum()
        se = ((n_ib * var[:, b]).sum()).sqrt() / n_ib.sum()
        assert abs(float(sq[in_b].mean() - target)) <= Z * float(se), (b, sq[in_b].mean(), target)


def test_geometric_bins_are_contiguous_and_finest_at_small_t():
    bins = geometric_bins(UniformTimesteps(1000, (0.0, 0.999)), 12)
    sizes = torch.bincount(bins)
    assert (bins.diff() >= 0).all() and (bins.diff() <= 1).all()
    assert sizes[0] == 1 and sizes[1] == 1 and (sizes.diff() >= 0).all()
    assert int(bins.max()) + 1 == 12


# ------------------------------------------------------------------------- tiny UNet

T_UNET = 10


def _tiny_teacher(init_seed: int = 0, channels: int = 1, size: int = 8) -> DiffusersTeacher:
    unet = random_init(
        lambda: UNet2DModel(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            num_class_embeds=4,
        ),
        init_seed,
    )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=T_UNET))


@pytest.fixture(scope="module")
def tiny():
    teacher = _tiny_teacher(seed(0))
    g = torch.Generator().manual_seed(seed(5))
    images = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.tensor([0, 2, 1])
    return teacher, images, labels


def _exact_reference(featurizer, images, labels, m: int = 64, chunk: int = 32):
    """Every timestep enumerated with ``m`` noise draws each: (mean, standard error), projected."""
    obj = featurizer.objective
    p = obj.prior.probs()
    params = featurizer.params
    means, variances = [], []
    g = torch.Generator().manual_seed(seed(99))
    with trainable(featurizer.teacher, params=params):
        for x, y in zip(images, labels):
            mean = torch.zeros(featurizer.dim, dtype=torch.float64)
            var = torch.zeros(featurizer.dim, dtype=torch.float64)
            for t in range(T_UNET):
                chunks = []
                for _ in range(m // chunk):
                    eps = torch.randn((chunk, 1, 8, 8), generator=g)
                    out = obj.evaluate(
                        x.expand(chunk, 1, 8, 8),
                        torch.full((chunk,), t),
                        eps,
                        y.expand(chunk),
                    )
                    grads = torch.autograd.grad(out.surrogate.mean(), params)
                    flat = torch.cat([gr.reshape(-1) for gr in grads])
                    chunks.append(featurizer.projection(flat[None])[0].to(torch.float64))
                c = torch.stack(chunks)
                mean += p[t] * c.mean(0)
                var += p[t] ** 2 * c.var(0) / c.shape[0]
            means.append(mean)
            variances.append(var)
    return torch.stack(means), torch.stack(variances).sqrt()


def test_unet_feature_is_unbiased_against_exact_timestep_enumeration(tiny):
    """IS + stratification on a real UNet (the other estimators are checked analytically)."""
    teacher, images, labels = tiny
    featurizer = AttributionFeaturizer(
        teacher, params=("up_blocks.1", "conv_out"), dim=6, projection_seed=seed(3)
    )
    images, labels = images[:2], labels[:2]
    ref, ref_se = _exact_reference(featurizer, images, labels)
    n = 60
    carv_est = carv.Estimator.preset("carv", K=4)  # weighted IS, stratified per example
    est = torch.stack(
        [
            featurizer.features(images, labels, estimator=carv_est, seed=s).features.to(
                torch.float64
            )
            for s in _seeds(seed(1000), n)
        ]
    )
    mean, se = est.mean(0), est.std(0) / n**0.5
    total_se = (se**2 + ref_se**2).sqrt()
    assert ((mean - ref).abs() <= Z * total_se).all(), (mean - ref) / total_se


def test_feature_is_exactly_that_examples_weighted_gradient(tiny):
    """One estimate equals (1/K) sum_k w_k grad loss_k of that example alone, by hand, with the
    recorded weights exactly ``p / q`` of the recorded timesteps."""
    teacher, images, labels = tiny
    featurizer = AttributionFeaturizer(teacher, dim=None)
    res = featurizer.features(
        images,
        labels,
        K=3,
        proposal="weighted",
        stratify="per_outer",
        shared_draws=False,
        seed=seed(4),
        record_draws=True,
    )
    obj = featurizer.objective
    q = WeightedProposal(obj.prior, obj.schedule, obj.weight)
    assert res.timesteps.shape == res.weights.shape == (3, 3)
    assert res.noise.shape == (3, 3, 1, 8, 8)
    torch.testing.assert_close(
        res.weights, (obj.prior.log_prob(res.timesteps) - q.log_prob(res.timesteps)).exp()
    )
    assert not torch.equal(res.weights, torch.ones_like(res.weights))
    with trainable(teacher, params=featurizer.params):
        for i in range(images.shape[0]):
            out = obj.evaluate(
                images[i].expand(3, 1, 8, 8), res.timesteps[i], res.noise[i], labels[i].expand(3)
            )
            surrogate = (res.weights[i].to(out.surrogate.dtype) * out.surrogate).mean()
            grads = torch.autograd.grad(surrogate, featurizer.params)
            want = torch.cat([g.reshape(-1) for g in grads])
            torch.testing.assert_close(res.features[i], want, rtol=1e-4, atol=1e-6)


def test_shared_draws_are_identical_across_examples(tiny):
    teacher, images, labels = tiny
    featurizer = AttributionFeaturizer(teacher, params="conv_out", dim=4)
    s = seed(1)
    for stratify in (None, "per_outer"):
        shared = featurizer.features(
            images, labels, K=5, stratify=stratify, shared_draws=True, seed=s, record_draws=True
        )
        assert torch.equal(shared.timesteps, shared.timesteps[:1].expand_as(shared.timesteps))
        assert torch.equal(shared.noise, shared.noise[:1].expand_as(shared.noise))
        # the same draws for a subset: each example's feature is its own term's gradient only
        alone = featurizer.features(images[1:2], labels[1:2], K=5, stratify=stratify, seed=s)
        torch.testing.assert_close(alone.features[0], shared.features[1])
    own = featurizer.features(images, labels, K=5, shared_draws=False, seed=s, record_draws=True)
    assert not torch.equal(own.timesteps[0], own.timesteps[1])
    assert not torch.equal(own.noise[0], own.noise[1])


def test_same_seed_same_features_and_no_state_leaks(tiny):
    """Same seed, same features; the teacher's flags and gradients, torch's global generator
    and the caller's Pyro param store are left as they were (a learning proposal included)."""
    teacher, images, labels = tiny
    featurizer = AttributionFeaturizer(teacher, params=("up_blocks.1",), dim=8)
    pyro.param("user_param", torch.ones(2))
    rng = torch.get_rng_state()
    a = featurizer.features(images, labels, K=2, seed=seed(7)).features
    b = featurizer.features(images, labels, estimator="reuse", K=2, seed=seed(7)).features
    c = featurizer.features(images, labels, K=2, seed=seed(8)).features
    featurizer.features(images, labels, estimator="adaptive", K=2, seed=seed(9))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(rng, torch.get_rng_state())
    assert list(pyro.get_param_store().keys()) == ["user_param"]
    assert teacher.requires_grad is False
    assert all(not p.requires_grad and p.grad is None for p in teacher.unet.parameters())


def test_latent_teacher_with_vae_encoder_upstream():
    rng = torch.get_rng_state()
    encoder = VAEEncoder(seed=seed(0))
    teacher = _tiny_teacher(seed(0), channels=4, size=8)
    assert torch.equal(rng, torch.get_rng_state())  # random weights from generators of their own
    featurizer = AttributionFeaturizer(teacher, upstream=encoder, dim=8)
    g = torch.Generator().manual_seed(seed(6))
    images = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    res = featurizer.features(images, torch.tensor([0, 1]), K=2, seed=seed(0))
    assert res.features.shape == (2, 8) and torch.isfinite(res.features).all()
    assert res.seconds_upstream > 0
    pixel = AttributionFeaturizer(teacher, dim=8)
    with pytest.raises(ValueError, match="images must have shape"):
        pixel.features(images, torch.tensor([0, 1]), K=2)


# ------------------------------------------------------------------------ projection


def test_projection_is_deterministic_under_a_seed_and_differs_across_seeds():
    s = seed(0)
    a = RandomProjection(1000, 16, seed=s, chunk_size=300).matrix()
    b = RandomProjection(1000, 16, seed=s, chunk_size=300, max_cache_bytes=0).matrix()
    c = RandomProjection(1000, 16, seed=s + 1, chunk_size=300).matrix()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    r = RandomProjection(1000, 16, seed=s, kind="rademacher").matrix()
    assert set(torch.unique(r * 4).tolist()) == {-1.0, 1.0}


def test_projection_applies_the_matrix_chunk_by_chunk():
    proj = RandomProjection(1000, 16, seed=seed(2), chunk_size=300, max_cache_bytes=0)
    g = torch.randn(3, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed(2)))
    torch.testing.assert_close(proj(g), g @ proj.matrix().to(torch.float64).T)
    torch.testing.assert_close(proj(g[0]), proj(g)[0])


def test_projection_preserves_squared_norms_in_expectation():
    # E||P g||^2 = ||g||^2: a z-test of the mean ratio over 200 independent projections (each a
    # scaled chi-square with k = 16 degrees of freedom), with its sample standard error.
    gen = torch.Generator().manual_seed(seed(3))
    g = torch.randn(500, dtype=torch.float64, generator=gen)
    ratios = torch.stack(
        [
            RandomProjection(500, 16, seed=s)(g).pow(2).sum() / g.pow(2).sum()
            for s in _seeds(seed(3), 200)
        ]
    )
    assert abs(float(ratios.mean()) - 1.0) < Z * float(ratios.std()) / 200**0.5


# ---------------------------------------------------------------------------- scores


def test_trak_scores_match_the_direct_formula_in_both_branches():
    g = torch.Generator().manual_seed(seed(0))
    for n, k in ((5, 12), (12, 5)):
        F = torch.randn(n, k, generator=g, dtype=torch.float64)
        Q = torch.randn(3, k, generator=g, dtype=torch.float64)
        lam = 0.1 * float((F * F).sum()) / k
        want = Q @ torch.linalg.inv(F.T @ F + lam * torch.eye(k, dtype=F.dtype)) @ F.T
        torch.testing.assert_close(attribution_scores(F, Q, damping=0.1), want)
    F = torch.randn(4, 9, generator=g, dtype=torch.float64)
    Q = torch.randn(2, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attribution_scores(F, Q, damping=0.0), Q @ torch.linalg.pinv(F))
    cos = attribution_scores(F, Q, method="cosine")
    assert cos.shape == (2, 4) and (cos.abs() <= 1 + 1e-12).all()


def test_rank_correlation_matches_spearman_with_ties():
    from scipy.stats import spearmanr

    a = torch.tensor([[1.0, 2.0, 2.0, 5.0, 0.5, 3.0], [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]])
    b = torch.tensor([[2.0, 1.0, 4.0, 4.0, 0.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    got = rank_correlation(a, b)
    for i in range(2):
        assert abs(float(got[i]) - spearmanr(a[i], b[i]).statistic) < 1e-12
    assert float(rank_correlation(a[0], a[0])) == pytest.approx(1.0)


def test_pick_examples_cycles_through_the_digits():
    labels = torch.tensor([3, 0, 1, 0, 2, 1, 9, 3])
    assert pick_examples(labels, 5, offset=9).tolist() == [6, 1, 2, 4, 0]
    with pytest.raises(ValueError, match="n must"):
        pick_examples(labels, 9)


# ------------------------------------------------------------------ the resumable run


def _run_inputs():
    """A small attribution run: a tiny UNet, 4 training examples and a query, 2 estimates, and
    an adaptive proposal (its learned state must survive a resume). ``(featurizer, args,
    kwargs)`` for `attribute`; a fresh featurizer every call."""
    featurizer = AttributionFeaturizer(
        _tiny_teacher(seed(0)), params=("up_blocks.1", "conv_out"), dim=8, projection_seed=seed(1)
    )
    g = torch.Generator().manual_seed(seed(5))
    x = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 1])
    estimator = carv.Estimator(K=4, proposal="adaptive", stratify="per_outer", noise="sobol")
    kwargs = dict(estimator=estimator, estimates=2, shared_draws=False, seed=seed(2))
    return featurizer, (x[:4], y[:4], x[4:], y[4:]), kwargs


def _same_run(a, b) -> bool:
    return (
        torch.equal(a.estimates, b.estimates)
        and torch.equal(a.features, b.features)
        and torch.equal(a.scores, b.scores)
    )


def test_attribute_writes_its_folder_and_never_overwrites_a_finished_run(tmp_path):
    featurizer, args, kwargs = _run_inputs()
    out = tmp_path / "run"
    run = attribute(featurizer, *args, out_dir=out, progress=False, **kwargs)
    assert run.steps == 10 and run.resumed_from is None
    assert run.features.shape == (5, 8) and run.estimates.shape == (2, 5, 8)
    assert run.scores.shape == (1, 4) and torch.isfinite(run.estimates).all()
    # the run draws as the featurizer's reference does (the projection rounds one row at a time)
    fresh, (x, y, xq, yq), _ = _run_inputs()
    ref = fresh.reference(
        torch.cat([x, xq]), torch.cat([y, yq]), n=2, estimator=kwargs["estimator"], seed=seed(2)
    )
    assert torch.allclose(run.features, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert json.loads((out / "carv-run.json").read_text()) == {
        "kind": "attribution",
        "state": "finished",
    }
    assert json.loads((out / "summary.json").read_text())["top_train_examples"][0] == (
        run.scores.topk(4, dim=1).indices[0].tolist()
    )
    assert torch.equal(torch.load(out / "features.pt")["features"], run.features)
    # a second run with the same settings agrees bit for bit (the adaptive proposal restarts)
    again = attribute(featurizer, *args, out_dir=tmp_path / "again", progress=False, **kwargs)
    assert _same_run(run, again)
    # a finished folder is never overwritten without resume or overwrite, and nothing changes
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="finished 'attribution' run.*--resume.*--overwrite"):
        attribute(featurizer, *args, out_dir=out, progress=False, **kwargs)
    for changed, differ in (
        (dict(kwargs, seed=seed(3)), "'seed'"),
        (dict(kwargs, estimator=kwargs["estimator"].replace(K=2)), "'estimator'"),
    ):
        with pytest.raises(ValueError, match=rf"cannot resume .*differ in \[{differ}\]"):
            attribute(featurizer, *args, out_dir=out, resume=True, progress=False, **changed)
    with pytest.raises(ValueError, match=r"differ in \['inputs_sha256'\]"):
        other = (x, y, xq + 1, yq)
        attribute(featurizer, *other, out_dir=out, resume=True, progress=False, **kwargs)
    assert (out / "checkpoint.pt").read_bytes() == before
    resumed = attribute(featurizer, *args, out_dir=out, resume=True, progress=False, **kwargs)
    assert resumed.resumed_from == 10 and _same_run(run, resumed)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not empty"):
        attribute(featurizer, *args, out_dir=foreign, progress=False, **kwargs)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    replaced = attribute(featurizer, *args, out_dir=out, overwrite=True, progress=False, **kwargs)
    assert _same_run(run, replaced)


_CHILD = """
import sys
import torch
torch.set_num_threads(1)
from carv_pyro.pipelines.attribution import attribute
from carv_pyro.pipelines.base import RunStopped
from tests.signals import pause_on_call
from tests.test_attribution import _run_inputs

featurizer, args, kwargs = _run_inputs()
# pause inside the teacher's forward pass of step 4 (one teacher call a step)
pause_on_call(featurizer.teacher, "_predict_eps", call=4)
try:
    attribute(featurizer, *args, out_dir=sys.argv[1], progress=False, checkpoint_every=2, **kwargs)
except RunStopped as stop:
    print(f"carv-pyro: {stop}", file=sys.stderr)
    sys.exit(stop.exit_code)
"""


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: signal.Signals(s).name
)
def test_a_signal_inside_a_step_loses_nothing_and_resume_is_bit_identical(tmp_path, sig):
    """A real subprocess is signalled inside the teacher's forward pass of step 4: SIGINT and
    SIGTERM let the step finish, checkpoint it and exit 130 / 143 with one line; SIGKILL loses
    the work since the last periodic checkpoint (step 2). Resumed, the run equals an
    uninterrupted one bit for bit."""
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    code, lines, err = signal_when_ready([str(script), str(out)], sig)
    done = torch.load(out / "checkpoint.pt", weights_only=False)["loop"]["step"]
    assert json.loads((out / "carv-run.json").read_text())["state"] == "running"
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and done == 2
    else:
        assert code == 128 + sig, err[-2000:]
        name = signal.Signals(sig).name
        assert err.strip().splitlines() == [
            f"carv-pyro: stopped by {name} after step 4; the run is checkpointed in {out} and "
            f"continues with --resume"
        ]
        assert done == 4
    featurizer, args, kwargs = _run_inputs()
    resumed = attribute(featurizer, *args, out_dir=out, resume=True, progress=False, **kwargs)
    assert resumed.resumed_from == done and resumed.steps == 10
    whole = attribute(*_run_inputs()[:1], *args, progress=False, **kwargs)
    assert _same_run(resumed, whole)


# ------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_errors_naming_them(tiny):
    teacher, images, labels = tiny
    f = AttributionFeaturizer(teacher, params="conv_out", dim=4)
    cases = [
        (lambda: f.features(images, labels, K=0), "K must"),
        (lambda: f.features(images, labels, proposal="bogus"), "proposal"),
        (lambda: f.features(images, labels, stratify="bogus"), "stratify"),
        (lambda: f.features(images, labels, noise="bogus"), "noise"),
        (lambda: f.features(images, labels, estimator="bogus"), "estimator"),
        (lambda: f.features(images, labels, estimator=carv.Estimator()), "must set K"),
        (lambda: f.features(images, labels, estimator="auto"), "adapt"),
        (lambda: f.features(images, labels, shared_draws="yes"), "shared_draws"),
        (lambda: f.features(images, labels, seed=-1), "seed"),
        (lambda: f.features(images, labels[:2]), "labels"),
        (lambda: f.features(images[0], labels), "images"),
        (lambda: AttributionFeaturizer(teacher, dim=0), "dim must"),
        (lambda: AttributionFeaturizer(teacher, params=("nope",)), "params"),
        (lambda: AttributionFeaturizer(teacher, dim=4, projection="bogus"), "projection"),
        (lambda: RandomProjection(10, 4, kind="bogus"), "kind"),
        (lambda: AttributionFeaturizer(object()), "module"),
        (lambda: RandomProjection(10, 4)(torch.zeros(2, 11)), "g must"),
        (lambda: attribution_scores(torch.zeros(3, 4), torch.zeros(2, 4), damping=-1), "damping"),
        (lambda: attribution_scores(torch.zeros(3, 4), torch.zeros(2, 5)), "query_features"),
        (lambda: attribution_scores(torch.zeros(3, 4), torch.zeros(2, 4), method="x"), "method"),
        (lambda: attribution_scores(torch.zeros(4), torch.zeros(2, 4)), "train_features"),
        (lambda: rank_correlation(torch.zeros(3), torch.zeros(4)), "shape"),
        (lambda: AttributionBench(quick="yes"), "quick"),
        (lambda: attribute(object(), images), "featurizer must be an AttributionFeaturizer"),
        (lambda: attribute(f, images, labels, estimates=0), "estimates must"),
        (lambda: attribute(f, images, labels, estimator="auto"), "adapt"),
        (lambda: attribute(f, images, labels[:2]), "train_labels must have shape"),
        (lambda: attribute(f, images, labels, images), "labels for both"),
        (lambda: attribute(f, images, labels, images[0, 0, 0], labels), "query_images must"),
        (lambda: attribute(f, images, labels, resume=True), "need an out_dir"),
        (lambda: attribute(f, images, labels, seed=None), "seed"),
        (lambda: attribute(f, images[:, :, :4], labels), r"images must have shape \(n, 1, 8, 8\)"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    assert [n for n, _ in select_parameters(teacher.unet, "conv_out")] == [
        "conv_out.weight",
        "conv_out.bias",
    ]


# ----------------------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def bench():
    # the bench warns when the embedded weights are still missing; either way is fine here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AttributionBench(quick=True, seed=seed(0))


def test_bench_protocol_estimates_and_reference_are_finite(bench):
    configs = bench.configs()
    assert {c["K"] for c in configs} == {4, 64}
    assert {(c["proposal"], c["stratify"]) for c in configs} >= {
        ("prior", None),
        ("prior", "per_outer"),
        ("weighted", None),
        ("weighted", "per_outer"),
    }
    small = next(c for c in configs if c["K"] == 4 and c["method"] == "IS*+strat")
    estimator = bench.estimator(small)
    assert estimator.proposal is bench.pilot() and estimator.stratify == "per_outer"
    assert estimator.name == "IS*+strat" and estimator.K == 4
    g = bench.estimate(small)
    ref = bench.reference(1)
    assert g.shape == ref.shape == (bench.R * bench.featurizer.dim,)
    assert g.dtype == ref.dtype == torch.float64
    assert torch.isfinite(g).all() and torch.isfinite(ref).all()
    assert not torch.equal(g, bench.estimate(small))  # independent across estimates
    assert bench.checkpoint_unchanged()
    with pytest.raises(ValueError, match="R must"):
        bench.estimate(dict(small, R=bench.R + 1))
    # with the protocol's rows, ECM against the baseline at the same K
    from types import SimpleNamespace as Row

    bench.rows = [
        Row(method="baseline", K=4, var=2.0, cost_s=1.0),
        Row(method="x", K=4, var=0.5, cost_s=2.0),
    ]
    assert bench._same_k_ecm() == {"ecm_same_K/baseline/K=4": 1.0, "ecm_same_K/x/K=4": 2.0}
    bench.rows = []
