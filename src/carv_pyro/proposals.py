"""Timestep proposals ``q(t)`` on the discrete support ``{0, ..., T - 1}``.

Every proposal is a probability vector over the integer timesteps of a discrete schedule.
The base class owns ``log_prob``, ``cdf``, ``icdf`` and ``sample``; a subclass implements the
one hook `AbstractTimestepDistribution.probs`.

The inverse CDF is exact on the discrete support: ``icdf(u)`` is the smallest ``t`` with
``F(t) > u`` for ``u`` in ``[0, 1)``, so ``icdf(U)`` with ``U ~ Uniform[0, 1)`` has law ``q`` and
never returns a timestep with ``q(t) = 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .schedules import DiscreteSchedule

__all__ = [
    "AbstractTimestepDistribution",
    "Categorical",
    "PriorProposal",
    "WeightedProposal",
    "HistogramProposal",
    "DefensiveMixture",
    "check_support",
    "timestep_bins",
]


class AbstractTimestepDistribution:
    """A distribution over the integer timesteps ``{0, ..., T - 1}``.

    The base class owns every method; subclasses implement `probs` only.

    Subclassing:
        ```python
        class LateTimesteps(AbstractTimestepDistribution):
            def __init__(self, prior):
                self.prior = prior
                self.num_timesteps = prior.num_timesteps

            def probs(self):
                p = self.prior.probs() * torch.linspace(0.5, 1.5, self.num_timesteps,
                                                        dtype=torch.float64)
                return p / p.sum()
        ```
    """

    num_timesteps: int

    def probs(self) -> Tensor:
        """``(T,)`` float64 probabilities summing to one (the hook subclasses implement)."""
        raise NotImplementedError

    def _tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(probs, log_probs, cdf)``, cached while `probs` returns the same tensor."""
        probs = self.probs()
        cache = getattr(self, "_table_cache", None)
        if cache is not None and cache[0] is probs and cache[1] == probs._version:
            return cache[2]
        tables = (probs, probs.log(), self._cdf_table(probs))
        self._table_cache = (probs, probs._version, tables)
        return tables

    def _cdf_table(self, probs: Tensor) -> Tensor:
        cdf = probs.cumsum(0)
        # Pin the CDF to exactly 1 from the last positive mass on, so that rounding never lets
        # u < 1 fall past the support into a zero-probability timestep.
        last = int(torch.nonzero(probs > 0)[-1])
        cdf[last:] = 1.0
        return cdf

    def _table_on(self, index: int, device: torch.device) -> Tensor:
        """Table ``index`` of `_tables` on ``device``, copied once per device and version."""
        table = self._tables()[index]
        if table.device == device:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (index, device)
        hit = cache.get(key)
        if hit is None or not (hit[0] is table or torch.equal(hit[0], table)):
            hit = cache[key] = (table, table.to(device))
        return hit[1]

    def log_prob(self, t: Tensor) -> Tensor:
        """``log q(t)`` (float64) with the shape of ``t``; ``-inf`` off the support."""
        t = torch.as_tensor(t)
        return self._table_on(1, t.device)[t.long()]

    def cdf(self, t: Tensor) -> Tensor:
        """``F(t) = P(T <= t)`` (float64) with the shape of ``t``."""
        t = torch.as_tensor(t)
        return self._table_on(2, t.device)[t.long()]

    def icdf(self, u: Tensor) -> Tensor:
        """Inverse CDF: the smallest ``t`` with ``F(t) > u``.

        Args:
            u: uniforms in ``[0, 1)`` of any shape.

        Returns:
            Long tensor of timesteps with the shape of ``u``.
        """
        u = torch.as_tensor(u).to(torch.float64)
        cdf = self._tables()[2].to(u.device)
        # A float32 uniform can round up to exactly 1.0: keep u in [0, 1) so the result stays on
        # the support (the CDF is pinned to 1 from the last positive mass on).
        u = u.clamp(0.0, 1.0 - 2.0**-53).contiguous()
        return torch.searchsorted(cdf, u, right=True)

    def sample(
        self, shape: tuple[int, ...] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        """I.i.d. draws of the given shape by inverse CDF."""
        u = torch.rand(shape, dtype=torch.float64, generator=generator)
        return self.icdf(u)

    def mean(self, values: Tensor) -> Tensor:
        """``E_q[values(t)]`` for a per-timestep table ``values`` of shape ``(T, ...)``."""
        probs = self.probs().to(values.device, values.dtype)
        return torch.tensordot(probs, values, dims=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.num_timesteps})"


class Categorical(AbstractTimestepDistribution):
    """A fixed probability vector over timesteps.

    Args:
        probs: ``(T,)`` non-negative weights (normalized here).
    """

    def __init__(self, probs: Tensor):
        p = torch.as_tensor(probs, dtype=torch.float64).detach().clone()
        if p.dim() != 1 or p.numel() < 1:
            raise ValueError(f"probs must be a 1-D tensor, got shape {tuple(p.shape)}")
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError("probs must be finite, non-negative and not all zero")
        self._probs = p / p.sum()
        self.num_timesteps = p.numel()

    def probs(self) -> Tensor:
        return self._probs


def check_support(
    proposal: AbstractTimestepDistribution,
    prior: AbstractTimestepDistribution,
    argument: str = "proposal",
) -> None:
    """Raise if ``q(t) = 0`` anywhere the prior has ``p(t) > 0``.

    Such a proposal would never draw those timesteps, and the importance-weighted estimator
    would be silently biased.

    Args:
        proposal: the proposal ``q``.
        prior: the prior ``p``.
        argument: the argument name to put in the error message.

    Raises:
        ValueError: naming ``argument`` and the first offending timesteps.
    """
    if proposal.num_timesteps != prior.num_timesteps:
        raise ValueError(
            f"{argument} is defined on {proposal.num_timesteps} timesteps but the prior on "
            f"{prior.num_timesteps}"
        )
    q, p = proposal.probs(), prior.probs()
    if not torch.isfinite(q).all() or (q < 0).any() or abs(float(q.sum()) - 1.0) > 1e-6:
        raise ValueError(f"{argument} must have finite, non-negative probabilities summing to 1")
    bad = torch.nonzero((q <= 0) & (p > 0)).flatten()
    if bad.numel():
        raise ValueError(
            f"{argument} has q(t) = 0 at {bad.numel()} timesteps where the prior p(t) > 0 "
            f"(e.g. t = {bad[:5].tolist()}); importance weights p/q would be infinite there. "
            f"Mix it with the prior (DefensiveMixture) or widen its support."
        )


class PriorProposal(AbstractTimestepDistribution):
    """``q = p``: sample timesteps from the prior itself (weights are all one)."""

    def __init__(self, prior: AbstractTimestepDistribution):
        self.prior = prior
        self.num_timesteps = prior.num_timesteps

    def probs(self) -> Tensor:
        return self.prior.probs()


class WeightedProposal(AbstractTimestepDistribution):
    """The cheap heuristic ``q(t) ∝ p(t) w(t) alpha_t``.

    ``w(t)`` is the objective's weighting and ``alpha_t`` the schedule's signal scale; their
    product tracks ``sqrt(E||f||^2 | t)`` for SDS-like residuals, so this proposal captures much
    of the variance-optimal ``q*``.

    Args:
        prior: the timestep prior ``p``.
        schedule: the noise schedule (for ``alpha_t``).
        weighting: ``w(t)`` as a callable on a long tensor of timesteps.

    Raises:
        ValueError: if ``w(t) alpha_t`` vanishes somewhere on the prior's support.
    """

    def __init__(
        self,
        prior: AbstractTimestepDistribution,
        schedule: DiscreteSchedule,
        weighting: Callable[[Tensor], Tensor],
    ):
        self.prior = prior
        self.num_timesteps = prior.num_timesteps
        t = torch.arange(self.num_timesteps)
        w = torch.as_tensor(weighting(t), dtype=torch.float64).abs()
        q = prior.probs() * w * schedule.alpha(t, like=w)
        if not torch.isfinite(q).all() or q.sum() <= 0:
            raise ValueError("weighting(t) * alpha_t must be finite and positive somewhere")
        self._probs = q / q.sum()
        check_support(self, prior, "proposal='weighted'")

    def probs(self) -> Tensor:
        return self._probs


class HistogramProposal(AbstractTimestepDistribution):
    """``q(t) ∝ p(t) h_{bin(t)}``: the prior reweighted by a histogram over timestep bins.

    The bins split the prior's support ``[t_lo, t_hi]`` into ``len(bin_weights)`` contiguous,
    nearly equal ranges.

    Args:
        prior: the timestep prior ``p``.
        bin_weights: ``(n_bins,)`` positive weights ``h``.
    """

    def __init__(self, prior: AbstractTimestepDistribution, bin_weights: Tensor):
        h = torch.as_tensor(bin_weights, dtype=torch.float64)
        if h.dim() != 1 or h.numel() < 1:
            raise ValueError(f"bin_weights must be 1-D and non-empty, got shape {tuple(h.shape)}")
        if not torch.isfinite(h).all() or (h <= 0).any():
            raise ValueError("bin_weights must be finite and strictly positive")
        self.prior = prior
        self.num_timesteps = prior.num_timesteps
        self.bin_weights = h
        self.bin_index = timestep_bins(prior, h.numel())

    def probs(self) -> Tensor:
        q = self.prior.probs() * self.bin_weights[self.bin_index]
        return q / q.sum()


def timestep_bins(prior: AbstractTimestepDistribution, n_bins: int) -> Tensor:
    """``(T,)`` bin index of each timestep: ``n_bins`` equal ranges over the prior's support.

    Timesteps outside the support go to the nearest end bin (their prior mass is zero anyway).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    support = torch.nonzero(prior.probs() > 0).flatten()
    lo, hi = int(support[0]), int(support[-1])
    t = torch.arange(prior.num_timesteps).clamp(lo, hi)
    width = (hi - lo + 1) / n_bins
    return ((t - lo).to(torch.float64) / width).floor().long().clamp(0, n_bins - 1)


class DefensiveMixture(AbstractTimestepDistribution):
    """``q = (1 - a) q_0 + a p``: a defensive mixture that keeps ``p / q <= 1 / a``.

    Args:
        proposal: the base proposal ``q_0``.
        prior: the prior ``p``.
        weight: the prior's share ``a`` in ``(0, 1]``.
    """

    def __init__(
        self,
        proposal: AbstractTimestepDistribution,
        prior: AbstractTimestepDistribution,
        weight: float = 0.1,
    ):
        if not 0.0 < float(weight) <= 1.0:
            raise ValueError(f"weight must lie in (0, 1], got {weight!r}")
        if proposal.num_timesteps != prior.num_timesteps:
            raise ValueError("proposal and prior must be defined on the same timesteps")
        self.proposal = proposal
        self.prior = prior
        self.weight = float(weight)
        self.num_timesteps = prior.num_timesteps

    def probs(self) -> Tensor:
        return (1.0 - self.weight) * self.proposal.probs() + self.weight * self.prior.probs()
