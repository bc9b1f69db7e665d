"""Distributions over the integer timesteps ``{0, ..., T - 1}`` of a discrete schedule.

The ground floor of the library (it imports nothing of ours): the timestep priors ``p(t)`` that
objectives declare and the proposals ``q(t)`` that guides draw from are all probability vectors
over the integer timesteps. The base class owns ``log_prob``, ``cdf``, ``icdf`` and ``sample``; a
subclass implements the one hook `AbstractTimestepDistribution.probs`.

The inverse CDF is exact on the discrete support: ``icdf(u)`` is the smallest ``t`` with
``F(t) > u`` for ``u`` in ``[0, 1)``, so ``icdf(U)`` with ``U ~ Uniform[0, 1)`` has law ``q`` and
never returns a timestep with ``q(t) = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks

__all__ = [
    "MAX_TIMESTEPS",
    "AbstractTimestepDistribution",
    "Categorical",
    "UniformTimesteps",
    "timestep_bins",
]


#: The most timesteps a distribution may have (diffusion schedules use 1000; this bounds the
#: tables every distribution keeps in memory).
MAX_TIMESTEPS = 1_000_000


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
        # u < 1 fall past the support into a zero-probability timestep. (From the last positive
        # mass on: where no positive mass lies strictly after; no host read on a GPU.)
        positive = (probs > 0).to(torch.int64)
        after = positive.flip(0).cumsum(0).flip(0) - positive
        return torch.where(after == 0, torch.ones_like(cdf), cdf)

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

    def probs_on(self, device: torch.device | str) -> Tensor:
        """`probs` on ``device``, copied once per device (no host-to-device copy per call)."""
        return self._table_on(0, torch.device(device))

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
        cdf = self._table_on(2, u.device)  # copied once per device, not every call
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


class UniformTimesteps(AbstractTimestepDistribution):
    """The uniform timestep prior over the integer steps ``int(lo T) .. int(hi T)`` inclusive.

    This is the ``p(t)`` of DreamFusion-style SDS with ``t_range=(0.02, 0.98)``.

    Args:
        num_timesteps: ``T``.
        t_range: ``(lo, hi)`` with ``0 <= lo <= hi < 1``.
    """

    def __init__(self, num_timesteps: int, t_range: tuple[float, float] = (0.02, 0.98)):
        if (
            not isinstance(num_timesteps, int)
            or isinstance(num_timesteps, bool)
            or not 2 <= num_timesteps <= MAX_TIMESTEPS
        ):
            raise ValueError(
                f"num_timesteps must be an integer in [2, {MAX_TIMESTEPS}], got {num_timesteps!r}"
            )
        lo, hi = _checks.ordered_pair("t_range", t_range, 0.0, 1.0, strict=False)
        if hi >= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi < 1, got {t_range!r}")
        self.num_timesteps = num_timesteps
        self.t_range = (lo, hi)
        self.low = int(lo * num_timesteps)
        self.high = int(hi * num_timesteps)
        if self.high >= num_timesteps:
            self.high = num_timesteps - 1
        p = torch.zeros(num_timesteps, dtype=torch.float64)
        p[self.low : self.high + 1] = 1.0 / (self.high - self.low + 1)
        self._probs = p

    def probs(self) -> Tensor:
        """``(T,)`` float64 probabilities, uniform on ``[low, high]`` and zero elsewhere."""
        return self._probs

    def __repr__(self) -> str:
        return f"UniformTimesteps(low={self.low}, high={self.high}, T={self.num_timesteps})"


def timestep_bins(prior: AbstractTimestepDistribution, n_bins: int) -> Tensor:
    """``(T,)`` bin index of each timestep: ``n_bins`` equal ranges over the prior's support.

    Timesteps outside the support go to the nearest end bin (their prior mass is zero anyway).
    """
    _checks.positive_int("n_bins", n_bins)
    support = torch.nonzero(prior.probs() > 0).flatten()
    lo, hi = int(support[0]), int(support[-1])
    t = torch.arange(prior.num_timesteps).clamp(lo, hi)
    width = (hi - lo + 1) / n_bins
    return ((t - lo).to(torch.float64) / width).floor().long().clamp(0, n_bins - 1)
