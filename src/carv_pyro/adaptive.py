"""The adaptive timestep proposal: ``q(t) ∝ p(t) sqrt(E[||f||^2 | t])``, learned online.

The variance-optimal proposal for an importance-sampled expectation ``E_p[f]`` is
``q*(t) ∝ p(t) sqrt(E[||f||^2 | t])``. `AdaptiveProposal` estimates the conditional second
moment per timestep bin from the draws the estimator already makes, and mixes the resulting
histogram proposal defensively with the prior so that every weight stays below ``1 / a``.

The proxy for ``||f||^2``: the gradient of a draw is ``J^T h`` with the upstream Jacobian ``J``
shared by all draws of one upstream sample, so the x-space residual's squared norm ``||h||^2``
ranks timesteps as ``||f||^2`` does (exactly so when ``J`` is orthogonal); for loss objectives
the squared per-draw loss is used.

Unbiasedness at every step: the proposal used at a step depends only on earlier draws, and each
draw is weighted by the ``q`` that drew it.

Its state (per-bin decayed sums and counts) lives in the Pyro param store under
``carv.adaptive.{term}.sum_sq`` and ``carv.adaptive.{term}.count``, so
``pyro.get_param_store().save(path)`` / ``.load(path)`` restore it exactly. They are written
outside the model's trace, so SVI never optimizes them.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor

from .proposals import AbstractTimestepDistribution, timestep_bins

__all__ = ["AdaptiveProposal"]


class AdaptiveProposal(AbstractTimestepDistribution):
    """``q = (1 - a) q_hist + a p`` with ``q_hist(t) ∝ p(t) sqrt(m2[bin(t)])``.

    Args:
        objective: the term's objective (for its prior).
        name: the term's name (keys the state in the param store).
        n_bins: timestep bins over the prior's support.
        defensive: the prior's share ``a`` (weights are at most ``1 / a``).
        decay: per-step decay of the running sums (the parameters move, so old draws fade).
    """

    def __init__(
        self,
        objective,
        name: str = "term",
        n_bins: int = 20,
        defensive: float = 0.1,
        decay: float = 0.98,
    ):
        if not (isinstance(n_bins, int) and n_bins >= 1):
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if not 0.0 < defensive <= 1.0:
            raise ValueError(f"defensive must lie in (0, 1], got {defensive!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        self.prior = objective.prior
        self.num_timesteps = self.prior.num_timesteps
        self.name = name
        self.n_bins = n_bins
        self.defensive = float(defensive)
        self.decay = float(decay)
        self.bin_index = timestep_bins(self.prior, n_bins)
        self._key = f"carv.adaptive.{name}"
        #: set False to freeze the proposal (e.g. to evaluate a fixed q exactly)
        self.learning = True

    # state in the param store ------------------------------------------------------------
    def _state(self) -> tuple[Tensor, Tensor]:
        store = pyro.get_param_store()
        zeros = torch.zeros(self.n_bins, dtype=torch.float64)
        sum_sq = store.setdefault(f"{self._key}.sum_sq", zeros.clone())
        count = store.setdefault(f"{self._key}.count", zeros.clone())
        return sum_sq, count

    def second_moments(self) -> Tensor:
        """``(n_bins,)`` running estimates of ``E[||f||^2 | t in bin]`` (nan where unseen)."""
        sum_sq, count = self._state()
        with torch.no_grad():
            return torch.where(count > 0, sum_sq / count.clamp_min(1e-300), torch.nan)

    def probs(self) -> Tensor:
        m2 = self.second_moments().detach()
        seen = torch.isfinite(m2)
        if not seen.any():
            return self.prior.probs()
        # unseen bins borrow the mean of the seen ones, so they keep being explored
        m2 = torch.where(seen, m2, m2[seen].mean()).clamp_min(0.0)
        h = m2.sqrt()[self.bin_index]
        q_hist = self.prior.probs() * h
        if q_hist.sum() <= 0:
            return self.prior.probs()
        q_hist = q_hist / q_hist.sum()
        return (1.0 - self.defensive) * q_hist + self.defensive * self.prior.probs()

    def update(self, record) -> None:
        """Fold one step's draws of the term into the running second moments."""
        if not self.learning:
            return
        with torch.no_grad():
            batch_ndim = len(record.batch_shape)
            if record.residual is not None:
                sq = record.residual.flatten(batch_ndim).pow(2).sum(-1)
            else:
                sq = record.value.pow(2)
            ok = ~record.nonfinite
            t = record.t[ok].reshape(-1).cpu()
            sq = sq[ok].reshape(-1).to(torch.float64).cpu()
            bins = self.bin_index[t]
            add_sq = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(0, bins, sq)
            add_n = torch.zeros(self.n_bins, dtype=torch.float64).index_add_(
                0, bins, torch.ones_like(sq)
            )
            sum_sq, count = self._state()
            sum_sq.mul_(self.decay).add_(add_sq)
            count.mul_(self.decay).add_(add_n)

    def __repr__(self) -> str:
        return f"AdaptiveProposal(term={self.name!r}, n_bins={self.n_bins}, defensive={self.defensive})"
