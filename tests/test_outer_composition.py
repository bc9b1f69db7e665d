"""Outer-plate designs and control variates composed with what a Pyro user combines them with.

Every combination gives the right gradient or a clear error. The set-up is the analytic one of
``tests/analytic.py`` with a latent upstream: ``x_r = theta + f(latents_r) d``, whose expected
theta-gradient is ``c (theta + E[f] d - m)`` for any law of the latents, so a draw whose law is
not its prior's shows as a shift of ``E[f]``. ``f`` is nonlinear (squares, products of two
sites, a coordinate of a vector latent), so a design that got a marginal or the independence of
one draw's coordinates wrong would move it.

Statistical thresholds: z-tests at ``Z = 5`` standard errors per coordinate over ``N = 160``
independent estimates; the file holds about 100 such tests of at most 2 coordinates, so by a
Bonferroni bound a correct estimator fails one with probability below ``200 * 5.7e-7 < 1.2e-4``
for any seed. The integrands are bounded or light-tailed (uniform latents; normal ones only
linearly, squared or cubed), so the normal approximation holds at this ``N``. Discrete
marginals: 12 chi-square tests at ``p > 1e-6``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam
from scipy.stats import chi2

import carv_pyro as carv
from carv_pyro.infer.outer import OuterDesigner, outer_design, prior_icdf
from carv_pyro.infer.samplers import RandomSource

from .analytic import DIRECTION, MEAN, THETA0, grad_of, make_model, sds, sds_constant
from .seeds import seed

Z = 5.0
DESIGNS = ["stratified", "lattice", "antithetic", "sobol"]
F64 = torch.float64


def _f(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


class _Extreme(RandomSource):
    """Every base uniform is ``v`` (strata in order): the top stratum's draw sits within
    ``(1 - v) / n`` of 1."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v

    def uniform(self, shape, device="cpu"):
        return torch.full(shape, self.v, dtype=F64)

    def permutation_keys(self, shape, device="cpu"):
        return torch.arange(shape[-1], dtype=torch.float32).expand(shape).clone()

    def integer_seed(self):
        return 0


# -- bugs found: each a test that failed before its fix ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_designed_normal_draws_are_finite_in_the_tails(dtype):
    """A design's uniforms lie anywhere in ``(0, 1)`` in float64; a float32 prior's inverse CDF
    must not round them to 0 or 1 (``erfinv(+-1)`` is infinite). Before the fix a float32
    ``Normal`` latent was ``+-inf`` whenever its uniform fell within ``2^-25`` of either end:
    a few times in 10^8 draws, i.e. now and then in a long run, as a NaN render."""
    u = _f([0.0, 2.0**-60, 2.0**-30, 2.0**-26, 0.5, 1 - 2.0**-26, 1 - 2.0**-31, 1 - 2.0**-53])
    loc = torch.zeros(len(u), dtype=dtype)
    z = prior_icdf(dist.Normal(loc, 2.0), u)
    assert z.dtype == dtype and torch.isfinite(z).all(), z
    # the same draws as in float64, rounded to the prior's dtype
    want = prior_icdf(dist.Normal(loc.double(), 2.0), u).to(dtype)
    torch.testing.assert_close(z, want, rtol=0, atol=0)
    x = prior_icdf(dist.Uniform(loc, 1.0), u)
    assert x.dtype == dtype and (x >= 0).all() and (x <= 1).all()
    for prior in (dist.LogNormal(loc, 1.0), dist.Exponential(loc + 2), dist.Cauchy(loc, 1.0)):
        y = prior_icdf(prior, u)  # through their own icdf (LogNormal's through its transform)
        assert y.dtype == dtype and torch.isfinite(y).all(), (prior, y)

    def model():
        with pyro.plate("views", 4, dim=-1):
            return pyro.sample("z", dist.Normal(torch.zeros((), dtype=dtype), 1.0))

    for v in (1e-12, 1 - 1e-12):  # the first and the last stratum at their outer edges
        guide = carv.TimestepGuide(model, seed=seed(0))
        guide.outer = OuterDesigner(outer_design("stratified"), _Extreme(v))
        z = guide.run(model)[0].nodes["z"]["value"]
        assert torch.isfinite(z).all(), z


@pytest.mark.parametrize("where", ["model", "around the step"])
def test_control_variates_leave_a_conditioned_eps_alone(where):
    """A control variate has mean zero over the noise; conditioning ``eps`` fixes it, so the
    term must be evaluated at that ``eps`` as it is without control variates. Before the fix the
    fitted ``gamma(t) c(eps)`` was subtracted anyway: a silently different gradient."""
    objective = sds("sds")
    R, K = 3, 4
    xi = _f([0.3, -0.5, 0.2])
    free = make_model(objective, R, K, xi)
    guide = carv.Estimator(proposal="weighted", control_variates=True).guide(seed=seed(1))
    loss = carv.CARVLoss()
    for _ in range(20):  # the fit learns on random draws
        grad_of(loss, free, guide)
    assert guide.control_variates.coefficients(objective).abs().max() > 0.1
    gen = torch.Generator().manual_seed(seed(2))
    data = {
        "sds.t": torch.randint(8, 20, (R, K), generator=gen),  # where gamma is far from 0
        "sds.eps": torch.randn(R, K, 2, dtype=F64, generator=gen),
    }
    want = grad_of(carv.CARVLoss(), poutine.condition(free, data=data), carv.TimestepGuide())
    if where == "model":
        got = grad_of(loss, poutine.condition(free, data=data), guide)
    else:
        with poutine.condition(data=data):
            got = grad_of(loss, free, guide)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # conditioning t alone keeps eps random: the control variates still apply (and stay exact)
    t_only = poutine.condition(free, data={"sds.t": data["sds.t"]})
    pyro.param("theta").unconstrained().grad = None
    with guide.frozen():
        a = carv.CARVLoss().loss(t_only, guide)
    assert math.isfinite(a)


# -- the promise: combinations that are right ------------------------------------------------

R, K = 4, 2
N = 160
VALUES = _f([-1.0, 0.25, 2.0])
PROBS = _f([[0.2, 0.8, 0.0], [0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
U2 = 2.5**2 / 12 + 0.25**2  # E[b^2] for b ~ U(-1, 1.5)


def _uniform() -> dist.Uniform:
    return dist.Uniform(_f(-1.0), 1.5)


def _views(latents, n=R, sub=None):
    """``x_r = theta + latents(idx)_r d`` in a plate of ``n`` views (dim -2)."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", n, dim=-2, subsample_size=sub) as idx:
            x = theta + latents(idx).unsqueeze(-1) * DIRECTION
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", OBJECTIVE, x)

    return model


def _two_sites(idx):
    a = pyro.sample("a", dist.Normal(_f(0.3), 1.0))
    b = pyro.sample("b", _uniform())
    return a * b + b * b  # needs (a, b) of one draw independent


def _hierarchical(idx):
    a = pyro.sample("a", dist.Uniform(_f(0.0), 1.0))
    return pyro.sample("b", dist.Normal(a, 1.0)) ** 2


def _global_and_plate():
    def model():
        theta = pyro.param("theta", THETA0.clone())
        g = pyro.sample("g", dist.Normal(_f(0.3), 1.0))  # outside every plate: its prior
        with pyro.plate("views", R, dim=-2):
            a = pyro.sample("a", dist.Normal(g, 1.0))
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", OBJECTIVE, theta + (a * a).unsqueeze(-1) * DIRECTION)

    return model


def _nested(n_obj=2, n_views=2):
    """An outer plate of views inside an outer plate of objects."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("objects", n_obj, dim=-3):
            a = pyro.sample("a", dist.Uniform(_f(0.0), 1.0))
            with pyro.plate("views", n_views, dim=-2):
                b = pyro.sample("b", dist.Normal(a, 1.0))
                with carv.draws(K, "noise", dim=-1):
                    carv.teacher_term("sds", OBJECTIVE, theta + (b * b).unsqueeze(-1) * DIRECTION)

    return model


def _vector(idx):
    c = pyro.sample("c", dist.Uniform(_f([0.0, -1.0]), 1.0).to_event(1))
    return (c * c).prod(-1)  # needs the coordinates of one draw independent


def _masked_scaled(idx):
    keep = torch.tensor([True, False, True, False])[idx].reshape(-1, 1)
    with poutine.mask(mask=keep), poutine.scale(scale=0.3):  # log-densities only
        return pyro.sample("b", _uniform()) ** 2


LOC = _f([0.0, 1.0, -2.0, 0.5])
OBJECTIVE = sds("sds")

#: name -> (model, E[f], the sites the design draws, loss options)
CASES = {
    "vector latent (to_event)": (_views(_vector), 1 / 9, ["c"], {}),
    "batch-dependent Normal": (
        _views(lambda idx: pyro.sample("z", dist.Normal(LOC[idx].reshape(-1, 1), 2.0))),
        float(LOC.mean()),
        ["z"],
        {},
    ),
    "batch-dependent Categorical": (
        _views(lambda idx: VALUES[pyro.sample("k", dist.Categorical(PROBS[idx].unsqueeze(-2)))]),
        float((PROBS @ VALUES).mean()),
        ["k"],
        {},
    ),
    "two sites of one plate": (_views(_two_sites), 0.3 * 0.25 + U2, ["a", "b"], {}),
    "hierarchical sites": (_views(_hierarchical), 1 / 3 + 1, ["a", "b"], {}),
    "global site and plate": (_global_and_plate(), 0.09 + 2, ["a"], {}),
    "nested plates": (_nested(), 1 / 3 + 1, ["a", "b"], {}),
    "subsampled vector latent": (_views(_vector, n=8, sub=3), 1 / 9, ["c"], {}),
    "mask and scale on the site": (_views(_masked_scaled), U2, ["b"], {}),
    "LocScaleReparam": (
        poutine.reparam(
            _views(lambda idx: pyro.sample("z", dist.Normal(_f(0.3), 1.2)) ** 2),
            config={"z": LocScaleReparam(0.0)},
        ),
        0.09 + 1.44,
        ["z_decentered"],
        {},
    ),
    "poutine.block hides the site": (
        poutine.block(_views(lambda idx: pyro.sample("b", _uniform()) ** 2), hide=["b"]),
        U2,
        [],
        {},
    ),
    "odd plate": (_views(lambda idx: pyro.sample("b", _uniform()) ** 2, n=3), U2, ["b"], {}),
    "2 vectorized particles": (
        _global_and_plate(),
        0.09 + 2,
        ["g", "a"],  # the particle plate makes the global site a plate's
        dict(num_particles=2, vectorize_particles=True),
    ),
    "3 particles": (_views(_two_sites), 0.3 * 0.25 + U2, ["a", "b"], dict(num_particles=3)),
    "MultivariateNormal (its prior)": (
        _views(
            lambda idx: pyro.sample(
                "c", dist.MultivariateNormal(_f([0.3, -0.2]), torch.eye(2, dtype=F64))
            ).sum(-1)
        ),
        0.1,
        [],
        {},
    ),
    "Dirichlet (its prior)": (
        _views(lambda idx: pyro.sample("w", dist.Dirichlet(_f([1.0, 3.0])))[..., 0]),
        0.25,
        [],
        {},
    ),
    "Bernoulli": (
        _views(lambda idx: pyro.sample("k", dist.Bernoulli(_f(0.3)))),
        0.3,
        ["k"],
        {},
    ),
    "batch-dependent Bernoulli": (
        _views(
            lambda idx: pyro.sample(
                "k", dist.Bernoulli(_f([0.1, 0.3, 0.5, 0.9])[idx].reshape(-1, 1))
            )
        ),
        (0.1 + 0.3 + 0.5 + 0.9) / 4,
        ["k"],
        {},
    ),
    "OneHotCategorical": (
        _views(lambda idx: pyro.sample("k", dist.OneHotCategorical(PROBS[1])) @ VALUES),
        float(PROBS[1] @ VALUES),
        ["k"],
        {},
    ),
    "LogNormal (an icdf through its transform)": (
        _views(lambda idx: pyro.sample("s", dist.LogNormal(_f(0.1), 0.5))),
        math.exp(0.1 + 0.5**2 / 2),
        ["s"],
        {},
    ),
    "Exponential, squared": (
        _views(lambda idx: pyro.sample("s", dist.Exponential(_f(2.0))) ** 2),
        2 / 2.0**2,
        ["s"],
        {},
    ),
    "Gamma (its prior: no inverse CDF)": (
        _views(lambda idx: pyro.sample("s", dist.Gamma(_f(2.0), 4.0))),
        0.5,
        [],
        {},
    ),
}


def _z(grads: torch.Tensor, mean_f: float) -> torch.Tensor:
    want = sds_constant(OBJECTIVE) * (THETA0 + mean_f * DIRECTION - MEAN)
    return (grads.mean(0) - want) / (grads.std(0) / math.sqrt(len(grads)))


@pytest.mark.parametrize("outer", DESIGNS)
@pytest.mark.parametrize("case", list(CASES))
def test_designs_compose_unbiased(case, outer):
    """Each composition: the draws the design takes over, and a z-test of the gradient."""
    model, mean_f, designed, options = CASES[case]
    guide = carv.Estimator(proposal="weighted", outer=outer).guide(seed=seed(20))
    loss = carv.CARVLoss(**options)
    if outer == "antithetic" and case == "odd plate":
        with pytest.raises(ValueError, match="site 'b' has 3 draws in the plates \\['views'\\]"):
            grad_of(loss, model, guide)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "outer='sobol' works best", UserWarning)
        warnings.filterwarnings("ignore", "outer design: site", UserWarning)
        grads = torch.stack([grad_of(loss, model, guide) for _ in range(N)])
    assert guide.outer.designed == designed
    assert _z(grads, mean_f).abs().max() < Z


@pytest.mark.parametrize("outer", DESIGNS)
def test_designed_labels_have_their_priors_law(outer):
    """Labels of a batch-dependent Categorical: per view, the counts over 400 runs fit its
    probabilities (chi-square, p > 1e-6 for each of the 4 views), zero-probability classes never."""
    model = _views(lambda idx: VALUES[pyro.sample("k", dist.Categorical(PROBS.unsqueeze(-2)))])
    guide = carv.TimestepGuide(outer=outer, seed=seed(21))
    k = torch.stack([guide.run(model)[0].nodes["k"]["value"].reshape(-1) for _ in range(400)])
    for view in range(R):
        counts = torch.bincount(k[:, view], minlength=3).double()
        p = PROBS[view]
        assert (counts[p == 0] == 0).all()
        if (p > 0).sum() > 1:
            stat = ((counts - 400 * p)[p > 0] ** 2 / (400 * p[p > 0])).sum()
            assert chi2.sf(float(stat), int((p > 0).sum()) - 1) > 1e-6


@pytest.mark.parametrize("outer", DESIGNS)
def test_designed_one_hot_labels_and_flips_have_their_priors_law(outer):
    """A batch-dependent ``OneHotCategorical`` (one uniform per view, not one per class) and a
    batch-dependent ``Bernoulli``: every designed value is a one-hot row / a 0-1 value, and per
    view the counts over 400 runs fit the probabilities (chi-square, p > 1e-6)."""
    flip = _f([0.1, 0.3, 0.5, 0.9])

    def model():
        with pyro.plate("views", R, dim=-1):
            pyro.sample("k", dist.OneHotCategorical(PROBS))
            pyro.sample("f", dist.Bernoulli(flip))

    guide = carv.TimestepGuide(outer=outer, seed=seed(22))
    runs = [guide.run(model)[0].nodes for _ in range(400)]
    assert guide.outer.designed == ["k", "f"]
    onehot = torch.stack([n["k"]["value"] for n in runs])  # (400, R, 3)
    flips = torch.stack([n["f"]["value"] for n in runs])  # (400, R)
    assert onehot.shape == (400, R, 3) and (onehot.sum(-1) == 1).all()
    assert set(flips.unique().tolist()) <= {0.0, 1.0}
    for view in range(R):
        counts, p = onehot[:, view].sum(0), PROBS[view]
        assert (counts[p == 0] == 0).all()
        if (p > 0).sum() > 1:
            stat = ((counts - 400 * p)[p > 0] ** 2 / (400 * p[p > 0])).sum()
            assert chi2.sf(float(stat), int((p > 0).sum()) - 1) > 1e-6
        ones, q = flips[:, view].sum(), flip[view]
        stat = (ones - 400 * q) ** 2 / (400 * q * (1 - q))
        assert chi2.sf(float(stat), 1) > 1e-6


@pytest.mark.parametrize("outer", DESIGNS)
def test_a_designed_normal_is_reparameterized_through_the_design(outer):
    """``xi ~ N(mu, s)`` with a learnable ``mu``: the design's inverse CDF carries the pathwise
    gradient, ``d/dmu = 2 c (mu (theta - m).d + (mu^3 + 3 mu s^2) |d|^2)``; a float32 prior
    gets a finite gradient too."""
    mu0, s = 0.4, 0.8

    def model(dtype=F64):
        theta = pyro.param("theta", THETA0.clone().to(dtype))
        mu = pyro.param("mu", torch.tensor(mu0, dtype=dtype))
        with pyro.plate("views", R, dim=-2):
            xi = pyro.sample("xi", dist.Normal(mu, s))
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", OBJECTIVE, theta + (xi * xi).unsqueeze(-1) * DIRECTION)

    guide = carv.Estimator(outer=outer).guide(seed=seed(22))
    loss = carv.CARVLoss()
    grads = []
    for _ in range(N):
        pyro.param("mu", _f(mu0)).unconstrained().grad = None
        grad_of(loss, model, guide)
        grads.append(pyro.param("mu").unconstrained().grad.clone())
    grads = torch.stack(grads)
    d = DIRECTION
    want = (
        2
        * sds_constant(OBJECTIVE)
        * (mu0 * (THETA0 - MEAN) @ d + (mu0**3 + 3 * mu0 * s**2) * d @ d)
    )
    assert abs(float((grads.mean() - want) / (grads.std() / math.sqrt(N)))) < Z
    assert guide.outer.designed == ["xi"]


def test_compositions_that_cannot_be_right_are_clear_errors():
    """A learnable Categorical has no pathwise gradient (refused before any gradient exists);
    an odd plate under antithetic names the site and its plates, the particle plate included."""
    loss = carv.CARVLoss()

    def learnable():
        theta = pyro.param("theta", THETA0.clone())
        p = pyro.param("p", _f([0.3, 0.7]), constraint=dist.constraints.simplex)
        with pyro.plate("views", R, dim=-2):
            k = pyro.sample("k", dist.Categorical(p))
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", OBJECTIVE, theta + k.unsqueeze(-1).to(F64) * DIRECTION)

    for outer in DESIGNS:
        guide = carv.Estimator(outer=outer).guide(seed=seed(23))
        with pytest.raises(ValueError, match="'k' is not reparameterizable"):
            grad_of(loss, learnable, guide)
        assert pyro.param("theta").unconstrained().grad is None
    anti = carv.Estimator(outer="antithetic").guide(seed=seed(23))
    with pytest.raises(ValueError, match="site 'a' has 3 draws in the plates \\['objects'\\]"):
        grad_of(loss, _nested(3, 2), anti)
    three = carv.CARVLoss(num_particles=3, vectorize_particles=True)
    with pytest.raises(ValueError, match="'g' has 3 draws .*'num_particles_vectorized'"):
        grad_of(three, _global_and_plate(), anti)


@pytest.mark.parametrize("where", ["obs=", "model", "around the step"])
def test_a_conditioned_site_is_observed_not_redrawn(where):
    """``obs=``, ``poutine.condition`` of the model, or a condition handler around the step:
    the site keeps its data in every run; the design draws the others; the gradient's mean is
    the one at the data."""
    data = _f([0.1, 0.2, -0.3, 0.4]).reshape(R, 1)

    def latents(idx):
        a = pyro.sample("a", _uniform(), obs=data if where == "obs=" else None)
        return a + pyro.sample("b", _uniform()) ** 2

    model = _views(latents)
    if where == "model":
        model = poutine.condition(model, data={"a": data})
    guide = carv.Estimator(outer="sobol").guide(seed=seed(24))
    loss = carv.CARVLoss()
    grads = []
    for _ in range(N):
        with (
            poutine.condition(data={"a": data})
            if where == "around the step"
            else contextlib.nullcontext()
        ):
            grads.append(grad_of(loss, model, guide))
    assert _z(torch.stack(grads), float(data.mean()) + U2).abs().max() < Z
    with (
        poutine.condition(data={"a": data})
        if where == "around the step"
        else contextlib.nullcontext()
    ):
        nodes = guide.run(model)[0].nodes
    assert nodes["a"]["is_observed"] and torch.equal(nodes["a"]["value"], data)
    assert guide.outer.designed == ["b"]  # "a" holds its data, not a design's draw


@pytest.mark.parametrize("outer", DESIGNS)
def test_one_guide_across_models_with_other_plate_sizes(outer):
    """One guide alternating between plates of 2 and 6 views: each model's gradient is right."""
    small = _views(lambda idx: pyro.sample("b", _uniform()) ** 2, n=2)
    large = _views(lambda idx: pyro.sample("b", _uniform()) ** 2, n=6)
    guide = carv.Estimator(outer=outer).guide(seed=seed(25))
    loss = carv.CARVLoss()
    grads = {small: [], large: []}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "outer='sobol' works best", UserWarning)
        for _ in range(N // 2):
            for model in grads:
                grads[model].append(grad_of(loss, model, guide))
    for g in grads.values():
        assert _z(torch.stack(g), U2).abs().max() < Z


@pytest.mark.parametrize("outer", DESIGNS)
@pytest.mark.parametrize("particles", [1, 2])
def test_control_variates_with_outer_designs(outer, particles):
    """The online control-variate fit under each design (and vectorized particles): unbiased
    from the first step on (each step's coefficients come from earlier steps)."""
    guide = carv.Estimator(
        proposal="weighted", stratify="per_outer", outer=outer, control_variates=True
    ).guide(seed=seed(26))
    loss = carv.CARVLoss(num_particles=particles, vectorize_particles=particles > 1)
    grads = torch.stack([grad_of(loss, _views(_two_sites), guide) for _ in range(N)])
    assert guide.control_variates.coefficients(OBJECTIVE).abs().max() > 0
    assert _z(grads, 0.3 * 0.25 + U2).abs().max() < Z
