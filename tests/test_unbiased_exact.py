"""Exact unbiasedness: the estimator's expectation, integrated exactly, equals the closed form.

The Gaussian teacher's residual is affine in ``eps``, so the expectation over ``eps`` is the value
at ``eps = 0`` (a zero-noise guide). The expectation over the uniforms ``u`` that drive the
timestep draws is an integral of a piecewise-constant function; we integrate it exactly by
evaluating the real estimator at the midpoint of every interval between breakpoints and weighting
by the interval's length. Global stratification assigns strata to draws by a random permutation;
only each draw's marginal matters (the estimator is linear in per-draw terms), so averaging over
the ``B`` cyclic shifts of the assignment is the exact average over permutations.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import carv_pyro as carv
from carv_pyro.infer.samplers import AbstractNoiseSampler, RandomSource
from carv_pyro.proposals import (
    DefensiveMixture,
    HistogramProposal,
    PriorProposal,
    WeightedProposal,
)

from .analytic import T, expected_grad, grad_of, make_model, sds


class ZeroNoise(AbstractNoiseSampler):
    """``eps = 0``: the exact expectation over eps for residuals affine in eps."""

    def sample(self, layout, event_shape, dtype, device, source):
        return torch.zeros(
            tuple(layout.batch_shape) + tuple(event_shape), dtype=dtype, device=device
        )


class FixedUniforms(RandomSource):
    """All base uniforms equal ``u``; strata assigned by a fixed cyclic shift."""

    u = 0.5
    shift = 0

    def uniform(self, shape, device="cpu"):
        return torch.full(shape, self.u, dtype=torch.float64, device=device)

    def permutation_keys(self, shape, device="cpu"):
        # argsort(keys)[j] = (j + shift) mod B  <=>  keys[i] = (i - shift) mod B
        b = shape[-1]
        keys = (torch.arange(b, device=device) - self.shift) % b
        return keys.to(torch.float32).expand(shape).clone()


def _guide(model, proposal, stratify, source):
    return carv.TimestepGuide(
        model, proposal=proposal, stratify=stratify, noise=ZeroNoise(), source=source
    )


def _breakpoints(proposal, n_strata: int) -> list[float]:
    cdf = proposal._cdf_table(proposal.probs())
    scaled = n_strata * cdf
    frac = scaled - scaled.floor()
    pts = sorted({0.0, 1.0, *[float(v) for v in frac if 0.0 < float(v) < 1.0]})
    return pts


def exact_expectation(objective, proposal_obj, stratify, R, K, xi, inner="plain"):
    model = make_model(objective, R, K, xi, inner=inner)
    source = FixedUniforms()
    guide = _guide(model, proposal_obj, stratify, source)
    loss = carv.CARVLoss()
    if stratify == "auto":  # per upstream sample when K > 1, else global
        stratify_as = "per_outer" if K > 1 else "global"
    else:
        stratify_as = stratify
    n_strata = {None: 1, "per_outer": K, "global": R * K}[stratify_as]
    shifts = range(R * K) if stratify_as == "global" else range(1)
    pts = _breakpoints(guide.proposal_for("sds", objective), n_strata)
    total = torch.zeros(2, dtype=torch.float64)
    for shift in shifts:
        source.shift = shift
        for lo, hi in zip(pts[:-1], pts[1:]):
            if hi - lo < 1e-15:
                continue
            source.u = 0.5 * (lo + hi)
            total += (hi - lo) * grad_of(loss, model, guide)
    return total / len(shifts)


def _proposal(kind: str, objective, seed: int):
    prior = objective.prior
    if kind == "prior":
        return PriorProposal(prior)
    if kind == "weighted":
        return WeightedProposal(prior, objective.schedule, objective.weight)
    g = torch.Generator().manual_seed(seed)
    bins = torch.rand(5, generator=g, dtype=torch.float64) + 0.05
    if kind == "histogram":
        return HistogramProposal(prior, bins)
    return DefensiveMixture(HistogramProposal(prior, bins), prior, weight=0.2)


@settings(max_examples=40)
@given(
    kind=st.sampled_from(["prior", "weighted", "histogram", "defensive"]),
    stratify=st.sampled_from([None, "per_outer", "global", "auto"]),
    R=st.integers(1, 3),
    K=st.integers(1, 4),
    weighting=st.sampled_from(["sds", "uniform", "fantasia3d"]),
    seed=st.integers(0, 1000),
    inner=st.sampled_from(["plain", "draws"]),
)
def test_estimator_expectation_is_exact(kind, stratify, R, K, weighting, seed, inner):
    objective = sds(weighting)
    xi = torch.linspace(-1.0, 1.5, R, dtype=torch.float64) * (1 + seed % 3)
    proposal_obj = _proposal(kind, objective, seed)
    got = exact_expectation(objective, proposal_obj, stratify, R, K, xi, inner)
    want = expected_grad(objective, xi)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_breakpoint_quadrature_is_sensitive():
    """The exact machinery detects a biased estimator: drop the importance weights."""
    objective = sds("sds")
    xi = torch.tensor([0.3, -0.2], dtype=torch.float64)
    proposal = WeightedProposal(objective.prior, objective.schedule, objective.weight)

    class Unweighted(PriorProposal):
        """Draws from q but reports log q = log p: weights of one, a biased estimator."""

        def __init__(self):
            super().__init__(objective.prior)

        def icdf(self, u):
            return proposal.icdf(u)

    model = make_model(objective, 2, 3, xi)
    source = FixedUniforms()
    guide = _guide(model, Unweighted(), None, source)
    loss = carv.CARVLoss()
    pts = _breakpoints(proposal, 1)
    total = torch.zeros(2, dtype=torch.float64)
    for lo, hi in zip(pts[:-1], pts[1:]):
        source.u = 0.5 * (lo + hi)
        total += (hi - lo) * grad_of(loss, model, guide)
    assert not torch.allclose(total, expected_grad(objective, xi), rtol=1e-3)


def test_is_weights_have_mean_one_under_q():
    objective = sds("sds")
    prior = objective.prior
    for q in [
        PriorProposal(prior),
        WeightedProposal(prior, objective.schedule, objective.weight),
        DefensiveMixture(HistogramProposal(prior, torch.arange(1.0, 6.0)), prior, 0.1),
    ]:
        t = torch.arange(T)
        qp, pp = q.probs(), prior.probs()
        support = qp > 0
        w = torch.zeros(T, dtype=torch.float64)
        w[support] = pp[support] / qp[support]
        assert math.isclose(float((qp * w).sum()), 1.0, rel_tol=1e-12)
        # and the log-prob path used by the loss agrees
        lw = prior.log_prob(t[support]) - q.log_prob(t[support])
        torch.testing.assert_close(lw.exp(), w[support])
