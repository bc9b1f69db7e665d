"""Outer-plate designs: unbiased by exact quadrature and by z-tests, and the drop in ``V_b``.

The analytic set-up of ``tests/analytic.py`` with a latent upstream ``x_r = theta + xi_r d``: the
expected gradient is ``c (theta + E[xi] d - m)`` for any prior of ``xi``. With zero noise (the
residual is affine in ``eps``) the estimate is linear in ``xi`` and in per-draw terms of ``t``,
so its expectation over a design only sees each draw's marginal: averaging over the cyclic shifts
of the strata assignment (every index meets every stratum once) and integrating the offset in a
stratum by the midpoint rule (exact for a uniform prior: the estimate is affine in the offset;
for a categorical prior, midpoints of the intervals between breakpoints) is the exact
expectation over the design.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import carv_pyro as carv
from carv_pyro.infer.outer import (
    OUTER,
    OuterDesigner,
    SobolDesign,
    StratifiedDesign,
    draw_shape,
    prior_icdf,
)
from carv_pyro.infer.samplers import AbstractNoiseSampler, RandomSource

from .analytic import DIRECTION, MEAN, THETA0, grad_of, sds, sds_constant
from .seeds import seed

#: z-test threshold: with the Bonferroni bound over the coordinates tested, a correct estimator
#: fails one of these tests with probability below 1e-4 whatever the seed.
Z = 4.5

VALUES = torch.tensor([-1.0, 0.25, 2.0], dtype=torch.float64)  # xi of the categorical labels
PROBS = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


class ZeroNoise(AbstractNoiseSampler):
    def sample(self, layout, event_shape, dtype, device, source):
        return torch.zeros(tuple(layout.batch_shape) + tuple(event_shape), dtype=dtype)


class Shifted(RandomSource):
    """Every base uniform is ``v``; strata are assigned by the cyclic shift ``shift``."""

    v = 0.5
    shift = 0

    def uniform(self, shape, device="cpu"):
        return torch.full(shape, self.v, dtype=torch.float64)

    def permutation_keys(self, shape, device="cpu"):
        b = shape[-1]
        return ((torch.arange(b) - self.shift) % b).to(torch.float32).expand(shape).clone()

    def integer_seed(self):
        return 0


def latent_model(objective, R, K, prior="uniform", subsample=None):
    """``x_r = theta + xi_r d`` with ``xi`` a latent of the views plate."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", R, dim=-2, subsample=subsample):
            if prior == "uniform":
                xi = pyro.sample("xi", dist.Uniform(torch.tensor(-1.0).double(), 1.5))
            elif prior == "normal":
                xi = pyro.sample("xi", dist.Normal(torch.tensor(0.3).double(), 1.2))
            else:
                label = pyro.sample("label", dist.Categorical(PROBS))
                xi = VALUES[label]
            x = theta + xi.unsqueeze(-1) * DIRECTION  # (R, 1, D)
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", objective, x)

    return model


def mean_xi(prior: str) -> float:
    return {"uniform": 0.25, "normal": 0.3, "categorical": float((PROBS * VALUES).sum())}[prior]


def expected(objective, prior: str) -> torch.Tensor:
    return sds_constant(objective) * (THETA0 + mean_xi(prior) * DIRECTION - MEAN)


def _offsets(prior: str, n: int, outer: str = "stratified") -> list[tuple[float, float]]:
    """``(midpoint, length)`` of the intervals of the offset on which the estimate is affine."""
    cdf = PROBS.cumsum(0)
    pts = {0.0, 1.0}
    if outer == "lattice":
        # slot s sits at (s / n + v) mod 1: it wraps at v = 1 - s / n, and crosses cdf_j at
        # v = cdf_j - s / n (mod 1)
        for s in range(n):
            pts.add(1.0 - s / n)
            if prior == "categorical":
                pts.update((c - s / n) % 1.0 for c in cdf.tolist())
    elif prior == "categorical":
        # a draw in stratum s takes label j when (s + v) / n, or its mirror 1 - (s + v) / n,
        # crosses cdf_j: breakpoints in v
        for s in range(n):
            for c in cdf.tolist():
                for v in (c * n - s, (1.0 - c) * n - s):
                    pts.add(v)
    pts = {v for v in pts if 0.0 <= v <= 1.0}
    pts = sorted(pts)
    return [(0.5 * (a + b), b - a) for a, b in zip(pts[:-1], pts[1:]) if b - a > 1e-15]


@pytest.mark.parametrize("prior", ["uniform", "categorical"])
@pytest.mark.parametrize("outer", ["stratified", "lattice", "antithetic"])
@pytest.mark.parametrize("R,K", [(4, 1), (2, 3)])
def test_outer_design_is_exactly_unbiased(prior, outer, R, K):
    objective = sds("sds")
    model = latent_model(objective, R, K, prior)
    inner = Shifted()
    guide = carv.TimestepGuide(model, proposal="weighted", noise=ZeroNoise(), source=inner)
    outer_source = Shifted()
    guide.outer = OuterDesigner(carv.infer.outer.outer_design(outer), outer_source)
    loss = carv.CARVLoss()
    # the timestep's uniform: the estimate is constant between the proposal's cdf breakpoints
    q = guide.proposal_for("sds", objective)
    cdf = q._cdf_table(q.probs())
    t_pts = sorted({0.0, 1.0, *[float(v) for v in cdf if 0.0 < float(v) < 1.0]})
    n_strata = R // 2 if outer == "antithetic" else R
    total = torch.zeros(2, dtype=torch.float64)
    for shift in range(n_strata):
        outer_source.shift = shift
        for v, dv in _offsets(prior, n_strata, outer):
            outer_source.v = v
            for lo, hi in zip(t_pts[:-1], t_pts[1:]):
                if hi - lo < 1e-15:
                    continue
                inner.v = 0.5 * (lo + hi)
                total += dv * (hi - lo) * grad_of(loss, model, guide)
    assert guide.outer.designed == ["label" if prior == "categorical" else "xi"]
    torch.testing.assert_close(total / n_strata, expected(objective, prior), rtol=1e-9, atol=1e-12)


def test_quadrature_detects_a_biased_design():
    """The exact machinery is sensitive: a design whose draws miss the top stratum is caught."""

    class Low(StratifiedDesign):
        def uniforms(self, n, columns, source, seed):
            return 0.9 * super().uniforms(n, columns, source, seed)

    objective = sds("sds")
    model = latent_model(objective, 4, 1, "uniform")
    guide = carv.TimestepGuide(model, noise=ZeroNoise(), source=Shifted())
    guide.outer = OuterDesigner(Low(), Shifted())
    got = torch.stack([grad_of(carv.CARVLoss(), model, guide) for _ in range(3)]).mean(0)
    # prior t is random here, so compare the xi part only: a clear shift of E[xi]
    assert not torch.allclose(got, expected(objective, "uniform"), rtol=1e-2)


@pytest.mark.parametrize("outer", ["stratified", "lattice", "antithetic", "sobol"])
@pytest.mark.parametrize("prior", ["normal", "uniform"])
def test_outer_design_unbiased_z_test(outer, prior):
    objective = sds("sds")
    model = latent_model(objective, 4, 2, prior)
    guide = carv.Estimator(K=2, proposal="weighted", stratify="per_outer", outer=outer).guide(
        model, seed=seed(11)
    )
    loss = carv.CARVLoss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(300)])
    z = (grads.mean(0) - expected(objective, prior)) / (grads.std(0) / math.sqrt(len(grads)))
    assert z.abs().max() < Z, z


def _between_variance(outer, prior, R, n=400):
    """Var of the estimate over repeats with t and eps fixed: only ``xi`` varies (``V_b / R``)."""
    objective = sds("sds", t_range=(0.5, 0.51))  # one timestep: the inner part is constant
    model = latent_model(objective, R, 1, prior)
    guide = carv.TimestepGuide(model, noise=ZeroNoise(), outer=outer, seed=seed(3))
    loss = carv.CARVLoss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(n)])
    return float(((grads - grads.mean(0)) ** 2).sum(1).mean())


def test_outer_design_cuts_the_between_variance():
    """Stratifying a uniform latent over R = 4 draws divides Var(mean xi) by R^2 = 16 exactly
    (``1 / (12 R^3)`` against ``1 / (12 R)``); antithetic pairs of a linear gradient cancel it.
    With 400 repeats a variance estimate has a relative standard error of about 7%, so the
    bounds below sit more than 7 standard errors from the truth."""
    iid = _between_variance(None, "uniform", 4)
    strat = _between_variance("stratified", "uniform", 4)
    anti = _between_variance("antithetic", "normal", 4)
    c2 = sds_constant(sds("sds", t_range=(0.5, 0.51))) ** 2 * float((DIRECTION**2).sum())
    assert iid == pytest.approx(c2 * 2.5**2 / 12 / 4, rel=0.5)
    assert iid / strat == pytest.approx(16.0, rel=0.5)
    assert anti < 1e-20  # a gradient linear in xi: each antithetic pair averages to E[xi]


def test_lattice_cancels_the_harmonics_of_a_periodic_latent():
    """A latent angle on the full circle whose gradient is a low harmonic (``cos`` and ``sin``
    of 1, 2 and 3 times the angle): ``R = 4`` evenly spaced draws (the lattice) average every such
    harmonic to exactly zero whatever the shift, where the Latin hypercube's jitter leaves a
    share of each; the lattice's draws are each uniform on the circle."""
    R = 4
    harmonics = torch.arange(1, 4, dtype=torch.float64)

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", R, dim=-2):
            angle = pyro.sample(
                "angle", dist.Uniform(torch.tensor(-math.pi).double(), torch.tensor(math.pi))
            )
            phase = angle.unsqueeze(-1) * harmonics  # (R, 1, 3)
            wave = torch.cat([torch.cos(phase), torch.sin(phase)], -1).sum(-1, keepdim=True)
            x = theta + wave * DIRECTION  # (R, 1, D)
            with carv.draws(1, "noise", dim=-1):
                carv.teacher_term("sds", sds("sds", t_range=(0.5, 0.51)), x)

    def spread(outer, n=200):
        guide = carv.TimestepGuide(model, noise=ZeroNoise(), outer=outer, seed=seed(4))
        grads = torch.stack([grad_of(carv.CARVLoss(), model, guide) for _ in range(n)])
        return float(((grads - grads.mean(0)) ** 2).sum(1).mean()), guide

    lattice, guide = spread("lattice")
    strat, _ = spread("stratified")
    assert lattice < 1e-12 * strat, (lattice, strat)  # zero up to rounding
    # every draw of the lattice is uniform: its mean angle over many runs is the circle's centre
    angles = torch.stack([guide.run(model)[0].nodes["angle"]["value"] for _ in range(400)])
    z = angles.mean() / (angles.std() / math.sqrt(angles.numel()))
    assert abs(float(z)) < Z


@pytest.mark.parametrize("outer, n", [("stratified", 4), ("sobol", 8)])
def test_sharded_plate_takes_its_rows_of_one_global_design(outer, n):
    """Two shards of a plate of ``n``, drawn with the same outer seed, take their rows of one
    global design: together one draw per stratum ``[a / n, (a + 1) / n)`` (a Latin hypercube's
    strata; a Sobol net's intervals)."""
    objective = sds("sds")
    us = []
    for shard in (torch.arange(0, n // 2), torch.arange(n // 2, n)):
        model = latent_model(objective, n, 1, "uniform", subsample=shard)
        guide = carv.TimestepGuide(model, outer=outer, seed=shard[0].item(), outer_seed=5)
        xi = guide.run(model)[0].nodes["xi"]["value"].reshape(-1)
        us.append((xi + 1.0) / 2.5)
    assert sorted(torch.cat(us).mul(n).floor().long().tolist()) == list(range(n))


def test_sobol_spans_the_sites_of_a_plate():
    """Two sites of one plate take consecutive columns of one scrambled Sobol point set: the
    pairs (u1, u2) of 4 points fall one in each quadrant-row of the 2-D net."""

    def model():
        with pyro.plate("views", 4, dim=-1):
            a = pyro.sample("a", dist.Uniform(torch.tensor(0.0), 1.0))
            b = pyro.sample("b", dist.Uniform(torch.tensor(0.0), 1.0))
        return a, b

    guide = carv.TimestepGuide(model, outer="sobol", seed=seed(0))
    model_trace, _ = guide.run(model)
    a = model_trace.nodes["a"]["value"]
    b = model_trace.nodes["b"]["value"]
    # a (0, 2, 2)-net in base 2: every elementary 2 x 2 box holds exactly one point
    boxes = sorted(((a * 2).floor() * 2 + (b * 2).floor()).long().tolist())
    assert boxes == [0, 1, 2, 3]
    assert guide.outer.designed == ["a", "b"]


def _cells(u: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, d)`` -> per column, the sorted intervals ``[a / n, (a + 1) / n)`` of its points."""
    return (u * n).floor().long().sort(0).values


def test_vector_latent_takes_one_row_of_the_design_per_draw():
    """A site with an event shape under a plate: each of the ``R`` draws is one row of the design
    (a plate's dim counts from the right of the batch shape, not of the value), so every
    coordinate of a Latin hypercube has one draw per stratum."""
    R = 8

    def model():
        with pyro.plate("views", R, dim=-1):
            return pyro.sample("c", dist.Uniform(torch.zeros(3).double(), 1.0).to_event(1))

    guide = carv.TimestepGuide(model, outer="stratified", seed=seed(9))
    c = guide.run(model)[0].nodes["c"]["value"]
    assert c.shape == (R, 3) and guide.outer.designed == ["c"]
    assert torch.equal(_cells(c, R), torch.arange(R)[:, None].expand(R, 3))


@pytest.mark.parametrize("m", range(7))
def test_sobol_design_is_a_net_on_the_midpoint_grid(m):
    """Each column of ``n = 2^m`` points has exactly one point in each ``[a / n, (a + 1) / n)``,
    and every point is a midpoint ``(x + 1/2) 2^-30`` of the grid the digital shift makes it
    exactly uniform on."""
    n, d = 2**m, 8
    u = SobolDesign().uniforms(n, range(d), RandomSource(), seed(20 + m))
    assert u.dtype == torch.float64 and u.shape == (n, d)
    x = u * 2**30 - 0.5
    assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() < 2**30
    assert torch.equal(_cells(u, n), torch.arange(n)[:, None].expand(n, d))


def test_sobol_sites_of_a_plate_form_one_point_set():
    """The sites of a plate take consecutive columns of one scrambled sequence: a site's
    columns are those columns of the plate's whole draw, and the first two sites' points form
    a ``(0, m, 2)``-net, as Sobol's first two dimensions do (scrambling keeps the t-value): each
    elementary box ``[a 2^-k, (a + 1) 2^-k) x [b 2^(k-m), (b + 1) 2^(k-m))`` of area ``1 / n``
    holds exactly one of the ``n = 2^m`` points, for every ``k``."""
    design, source, m = SobolDesign(), RandomSource(), 4
    n = 2**m
    whole = design.uniforms(n, range(5), source, seed(5))
    parts = [
        design.uniforms(n, cols, source, seed(5)) for cols in (range(1), range(1, 4), range(4, 5))
    ]
    assert torch.equal(torch.cat(parts, 1), whole)

    def model():
        with pyro.plate("views", n, dim=-1):
            a = pyro.sample("a", dist.Uniform(torch.tensor(0.0).double(), 1.0))
            b = pyro.sample("b", dist.Uniform(torch.tensor(0.0).double(), 1.0))
            c = pyro.sample("c", dist.Uniform(torch.zeros(3).double(), 1.0).to_event(1))
        return a, b, c

    guide = carv.TimestepGuide(model, outer="sobol", seed=seed(6))
    nodes = guide.run(model)[0].nodes
    a, b = nodes["a"]["value"], nodes["b"]["value"]
    for k in range(m + 1):
        boxes = (a * 2**k).floor() * 2 ** (m - k) + (b * 2 ** (m - k)).floor()
        assert sorted(boxes.long().tolist()) == list(range(n)), k
    assert torch.equal(_cells(nodes["c"]["value"], n), torch.arange(n)[:, None].expand(n, 3))
    assert guide.outer.designed == ["a", "b", "c"]


def test_sobol_runs_scramble_afresh():
    """Each run draws new words (from the plate's fresh seed): no two of 400 runs agree, and
    the first points of consecutive runs are uncorrelated (``corr sqrt(N)`` is ``N(0, 1)`` for
    independent runs: within ``Z``)."""

    def model():
        with pyro.plate("views", 4, dim=-1):
            return pyro.sample("a", dist.Uniform(torch.tensor(0.0).double(), 1.0))

    guide = carv.TimestepGuide(model, outer="sobol", seed=seed(7))
    runs = torch.stack([guide.run(model)[0].nodes["a"]["value"] for _ in range(400)])
    assert len({tuple(r.tolist()) for r in runs}) == len(runs)
    first = runs[:, 0]
    corr = torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1]
    assert abs(float(corr)) * math.sqrt(len(first) - 1) < Z


def test_sobol_design_is_unbiased_through_the_inverse_cdf():
    """``E[exp(z_1) z_2^2] = exp(mu_1 + s_1^2 / 2) (mu_2^2 + s_2^2)`` for independent normal
    coordinates ``z_j = icdf(u_j)``: the mean over 2000 runs of a run's 8-point average is within
    ``Z`` standard errors (estimated from the runs) of it."""
    loc = torch.tensor([0.3, -0.5], dtype=torch.float64)
    scale = torch.tensor([0.8, 1.3], dtype=torch.float64)
    prior = dist.Normal(loc, scale).expand((8, 2))
    design, source = SobolDesign(), RandomSource(seed=seed(8))
    runs = []
    for _ in range(2000):
        z = prior_icdf(prior, design.uniforms(8, range(2), source, source.integer_seed()))
        runs.append((z[:, 0].exp() * z[:, 1] ** 2).mean())
    runs = torch.stack(runs)
    want = math.exp(0.3 + 0.8**2 / 2) * (0.5**2 + 1.3**2)
    z = (runs.mean() - want) / (runs.std() / math.sqrt(len(runs)))
    assert abs(float(z)) < Z, z


def test_sobol_design_checks_its_plate():
    design = SobolDesign()
    with pytest.raises(ValueError, match="at most"):
        design.uniforms(4, range(SobolDesign.MAX_DIM + 1), RandomSource(), 0)
    with pytest.warns(UserWarning, match="power-of-two"):
        design.uniforms(6, range(2), RandomSource(), 0)


def test_latin_hypercube_of_camera_and_t():
    """Outer strata with global inner strata at K = 1: a Latin hypercube over (latent, t). Each
    of R views' latent strata is used once; the timesteps' uniforms are the global strata of
    the inner sampler (one per stratum of [0, 1)), paired with the views at random."""
    objective = sds("sds")
    model = latent_model(objective, 8, 1, "uniform")
    guide = carv.Estimator(K=1, stratify="global", outer="stratified").guide(model, seed=seed(1))
    seen = []
    uniform = guide.source.uniform
    guide.source.uniform = lambda shape, device="cpu": (
        seen.append(uniform(shape, device)) or seen[-1]
    )
    keys = guide.source.permutation_keys
    perms = []
    guide.source.permutation_keys = lambda shape, device="cpu": (
        perms.append(keys(shape, device)) or perms[-1]
    )
    model_trace, _ = guide.run(model)
    xi = model_trace.nodes["xi"]["value"].reshape(-1)
    assert sorted(((xi + 1.0) / 2.5 * 8).floor().long().tolist()) == list(range(8))
    # the second draw of keys and offsets is the timesteps': one uniform per stratum
    u_t = (torch.argsort(perms[1], dim=-1)[0].double() + seen[1]) / 8
    assert sorted((u_t * 8).floor().long().tolist()) == list(range(8))


def test_prior_icdf():
    u = torch.tensor([0.1, 0.25, 0.69, 0.71, 0.99], dtype=torch.float64)
    got = prior_icdf(dist.Categorical(PROBS), u)
    assert got.tolist() == [0, 1, 1, 2, 2]
    normal = dist.Normal(torch.zeros(5, dtype=torch.float64), 1.0).to_event(1)
    torch.testing.assert_close(prior_icdf(normal, torch.full((5,), 0.5)), torch.zeros(5).double())
    assert prior_icdf(dist.Gamma(torch.tensor(2.0), 1.0), torch.tensor(0.5)) is None
    assert prior_icdf(dist.StudentT(torch.tensor(3.0)), torch.tensor(0.5)) is None
    # a one-hot label takes one uniform per draw, not one per class
    onehot = dist.OneHotCategorical(PROBS.expand(5, -1))
    assert draw_shape(onehot) == (5,) and draw_shape(onehot.to_event(1)) == (5,)
    assert prior_icdf(onehot, u).argmax(-1).tolist() == got.tolist()
    # Bernoulli(p): 0 up to F(0) = 1 - p = 0.7, then 1
    flips = prior_icdf(dist.Bernoulli(torch.full((5,), 0.3)), u)
    assert flips.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0] and flips.dtype == torch.float32
    # continuous priors through their own icdf, in closed form
    rate, loc, scale = 2.0, 0.3, 0.7
    exp = prior_icdf(dist.Exponential(torch.tensor(rate, dtype=torch.float64)), u)
    torch.testing.assert_close(exp, -torch.log1p(-u) / rate)
    lognormal = dist.LogNormal(torch.tensor(loc, dtype=torch.float64), scale)
    torch.testing.assert_close(prior_icdf(lognormal, u), dist.Normal(loc, scale).icdf(u).exp())


def test_user_upstream_guide_keeps_its_sites():
    """Sites a user's upstream guide proposes are its own; the design draws the others."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 4, dim=-2):
            a = pyro.sample("a", dist.Normal(torch.tensor(0.0).double(), 1.0))
            b = pyro.sample("b", dist.Normal(torch.tensor(0.0).double(), 1.0))
            x = theta + (a + b).unsqueeze(-1) * DIRECTION
            with carv.draws(2, "noise", dim=-1):
                carv.teacher_term("sds", sds("sds"), x)

    def upstream():
        with pyro.plate("views", 4, dim=-2):
            pyro.sample("a", dist.Normal(torch.tensor(0.5).double(), 1.0))

    guide = carv.TimestepGuide(model, upstream=upstream, outer="stratified", seed=seed(0))
    grad_of(carv.CARVLoss(), model, guide)
    assert guide.outer.designed == ["b"]


def test_odd_plate_under_antithetic_names_the_site():
    model = latent_model(sds("sds"), 3, 1, "normal")
    guide = carv.TimestepGuide(model, outer="antithetic", seed=seed(0))
    with pytest.raises(ValueError, match="'xi'.*even"):
        guide.run(model)


def test_outer_options_are_checked():
    assert OUTER == (None, "stratified", "lattice", "antithetic", "sobol")
    with pytest.raises(ValueError, match="outer must be one of"):
        carv.Estimator(K=2, outer="lhs")
    with pytest.raises(ValueError, match="outer must be one of"):
        carv.TimestepGuide(outer=3)
    with pytest.raises(TypeError, match="outer_sites"):
        carv.TimestepGuide(outer="sobol", outer_sites="xi")
    est = carv.Estimator(K=2, outer="sobol")
    assert "outer='sobol'" in repr(est)
    settings = est.settings()
    settings["k_range"] = tuple(settings["k_range"])
    assert carv.Estimator(**settings) == est


def test_design_split_accounting():
    """Rows solved for V_b and V_w, plain and under a design: the split, the ceilings, K*, ECM."""
    from carv_pyro.accounting import DesignSplit, effective_compute_multiplier
    from carv_pyro.bench import BenchRow, design_splits

    vb, vw, vb_left = 0.4, 3.6, 0.1

    def row(K, v_b, outer=None):
        return BenchRow(method="m", R=2, K=K, var=(v_b + vw / K) / 2, cost_s=1.0, outer=outer)

    rows = [row(1, vb), row(8, vb), row(1, vb_left, "stratified"), row(8, vb_left, "stratified")]
    (split,) = design_splits(rows)
    assert split.design == "outer=stratified"
    assert split.v_between == pytest.approx(vb) and split.v_between_left == pytest.approx(vb_left)
    assert split.v_between_removed == pytest.approx(vb - vb_left)
    assert split.ceiling_before == pytest.approx(10.0) and split.ceiling_after == pytest.approx(
        40.0
    )
    assert split.k_star(1.0, 1.0) == pytest.approx(math.sqrt(vw / vb_left))
    want = (vb + vw) * 2 / ((vb_left + vw / 4) * 5)
    assert split.ecm(4, 1.0, 1.0) == pytest.approx(want)
    assert effective_compute_multiplier(
        4, 1.0, 1.0, vb, vw, v_between_left=vb_left
    ) == pytest.approx(want)
    assert "removes 75%" in DesignSplit("d", vb, vw, vb_left, vw).text(1.0, 1.0)
