"""Outer-plate designs and control variates composed with what a Pyro user combines them with.

Every combination gives the right gradient or a clear error. The set-up is the analytic one of
``tests/analytic.py`` with a latent upstream: ``x_r = theta + f(latents_r) d``, whose expected
theta-gradient is ``c (theta + E[f] d - m)`` for any law of the latents, so a draw whose law is
not its prior's shows as a shift of ``E[f]``. ``f`` is nonlinear (squares, products of two
sites, a coordinate of a vector latent), so a design that got a marginal or the independence of
one draw's coordinates wrong would move it.

Statistical thresholds: z-tests at ``Z = 5`` standard errors per coordinate over ``N``
independent estimates; the file holds fewer than 60 such tests of 2 coordinates, so by a
Bonferroni bound a correct estimator fails one with probability below ``120 * 5.7e-7 < 1e-4``
for any seed. The integrands are bounded or light-tailed (uniform latents; normal ones only
linearly or squared), so the normal approximation holds at these ``N``. Discrete marginals are
checked by chi-square tests at ``p > 1e-6``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import carv_pyro as carv
from carv_pyro.infer.outer import OuterDesigner, outer_design, prior_icdf
from carv_pyro.infer.samplers import RandomSource

from .analytic import grad_of, make_model, sds
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
