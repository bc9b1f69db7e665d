"""Timestep proposals ``q(t)``: what a guide draws the timesteps of a teacher term from.

Every proposal is an [`AbstractTimestepDistribution`][carv_pyro.timesteps.AbstractTimestepDistribution]
over the integer timesteps. The importance weight of a draw is ``p(t) / q(t)``, so a proposal
must put mass wherever the prior does (`check_support`, run whenever a proposal is built for an
objective).

- `PriorProposal`: ``q = p`` (weights are all one).
- `WeightedProposal`: the cheap heuristic ``q ∝ p w alpha``.
- `HistogramProposal`, `DefensiveMixture`: building blocks.
- `AdaptiveProposal`: ``q ∝ p sqrt(E[||f||^2 | t])`` learned online from the estimator's own
  draws, mixed defensively with the prior; its state lives in the Pyro param store.
- `second_moment_proposal`: the same ``q*`` from measured per-bin second moments (a pilot).

`PROPOSALS` is the one registry of proposal names: ``name -> builder(objective, term)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from torch import Tensor

from .. import _checks
from ..schedules import DiscreteSchedule
from ..timesteps import AbstractTimestepDistribution, Categorical, timestep_bins

__all__ = [
    "PROPOSALS",
    "AdaptiveProposal",
    "DefensiveMixture",
    "HistogramProposal",
    "PriorProposal",
    "WeightedProposal",
    "build_proposal",
    "check_support",
    "second_moment_proposal",
]


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
    if not isinstance(q, Tensor) or q.dim() != 1 or not q.dtype.is_floating_point:
        got = f"shape {tuple(q.shape)}, dtype {q.dtype}" if isinstance(q, Tensor) else type(q)
        raise TypeError(
            f"{argument}.probs() must return a 1-D floating tensor of {prior.num_timesteps} "
            f"probabilities, got {got}"
        )
    q = q.to(torch.float64)
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
        _checks.positive_int("n_bins", n_bins)
        _checks.in_range("defensive", defensive, 0.0, 1.0, low_open=True)
        _checks.in_range("decay", decay, 0.0, 1.0, low_open=True)
        self.prior = objective.prior
        self.num_timesteps = self.prior.num_timesteps
        self.name = name
        self.n_bins = n_bins
        self.defensive = float(defensive)
        self.decay = float(decay)
        self.bin_index = timestep_bins(self.prior, n_bins)
        # the state is keyed by the term and its prior's support, so a guide reused for an
        # objective with another prior starts afresh instead of reading foreign bins
        support = torch.nonzero(self.prior.probs() > 0).flatten()
        lo, hi = int(support[0]), int(support[-1])
        self._key = f"carv.adaptive.{name}.T{self.num_timesteps}_{lo}-{hi}_b{n_bins}"
        #: set False to freeze the proposal (e.g. to evaluate a fixed q exactly)
        self.learning = True

    # state in the param store ------------------------------------------------------------
    def _state(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(sum_sq, count)`` from the param store, created on ``device`` (default: the CPU)
        and moved there once if it is elsewhere (the statistics live where the draws are)."""
        store = pyro.get_param_store()
        zeros = torch.zeros(self.n_bins, dtype=torch.float64, device=device)
        state = []
        for part in ("sum_sq", "count"):
            key = f"{self._key}.{part}"
            value = store.setdefault(key, zeros.clone())
            if device is not None and value.device != device:
                store[key] = value.detach().to(device)
                value = store[key]
            state.append(value)
        return state[0], state[1]

    def _bins_on(self, device: torch.device) -> Tensor:
        """`bin_index` on ``device``, copied once."""
        cache = self.__dict__.setdefault("_bin_index_on", {})
        hit = cache.get(device)
        if hit is None:
            hit = cache[device] = self.bin_index.to(device)
        return hit

    def second_moments(self) -> Tensor:
        """``(n_bins,)`` running estimates of ``E[||f||^2 | t in bin]`` (nan where unseen)."""
        sum_sq, count = self._state()
        with torch.no_grad():
            return torch.where(count > 0, sum_sq / count.clamp_min(1e-300), torch.nan)

    def probs(self) -> Tensor:
        """``q`` on the statistics' device; the same tensor while they are unchanged (so the
        base class's tables are rebuilt only after an update), and no host read on a GPU."""
        sum_sq, count = self._state()
        cache = self.__dict__.get("_probs_cache")
        if (
            cache is not None
            and cache[0] is sum_sq
            and cache[1] is count
            and cache[2] == (sum_sq._version, count._version)
        ):
            return cache[3]
        device = sum_sq.device
        q = _moment_mixture(
            self.prior.probs_on(device),
            self._bins_on(device),
            self.second_moments(),
            self.defensive,
        )
        self._probs_cache = (sum_sq, count, (sum_sq._version, count._version), q)
        return q

    def update(self, record) -> None:
        """Fold one step's draws of the term into the running second moments (on the draws'
        device, with tensor ops only: no host read)."""
        if not self.learning:
            return
        with torch.no_grad():
            batch_ndim = len(record.batch_shape)
            if record.residual is not None:
                sq = record.residual.flatten(batch_ndim).pow(2).sum(-1)
            else:
                sq = record.value.pow(2)
            # every draw goes in, a non-finite one as zero in both sums (selecting the finite
            # ones would read their number back to the host)
            ok = ~record.nonfinite
            device = record.t.device
            sq = torch.where(ok, sq.to(torch.float64), 0.0).reshape(-1)
            bins = self._bins_on(device)[record.t.reshape(-1)]
            zeros = torch.zeros(self.n_bins, dtype=torch.float64, device=device)
            add_sq = zeros.clone().index_add_(0, bins, sq)
            add_n = zeros.index_add_(0, bins, ok.reshape(-1).to(torch.float64))
            sum_sq, count = self._state(device)
            sum_sq.mul_(self.decay).add_(add_sq)
            count.mul_(self.decay).add_(add_n)

    def __repr__(self) -> str:
        return (
            f"AdaptiveProposal(term={self.name!r}, n_bins={self.n_bins}, "
            f"defensive={self.defensive})"
        )


def second_moment_proposal(
    prior: AbstractTimestepDistribution,
    bin_index: Tensor,
    second_moments: Tensor,
    defensive: float = 0.1,
) -> Categorical:
    """``q = (1 - a) q* + a p`` with ``q*(t) ∝ p(t) sqrt(m2[bin(t)])``: the variance-optimal proposal.

    Args:
        prior: the timestep prior ``p``.
        bin_index: ``(T,)`` long bin of every timestep.
        second_moments: ``(n_bins,)`` estimates of ``E[||f||^2 | t in bin]``; bins with a
            non-finite value borrow the mean of the finite ones.
        defensive: the prior's share ``a`` in ``(0, 1]`` (weights stay below ``1 / a``).

    Returns:
        A [`Categorical`][carv_pyro.timesteps.Categorical] proposal.
    """
    a = _checks.in_range("defensive", defensive, 0.0, 1.0, low_open=True)
    return Categorical(_moment_mixture(prior.probs(), bin_index, second_moments, a))


def _moment_mixture(p: Tensor, bin_index: Tensor, second_moments: Tensor, a: float) -> Tensor:
    """``(1 - a) q* + a p`` as a probability vector (see `second_moment_proposal`); ``p`` where
    no bin is seen or ``q*`` has no mass. No host read for tensors on a GPU."""
    m2 = torch.as_tensor(second_moments, dtype=torch.float64).detach()
    seen = torch.isfinite(m2)
    if m2.device.type == "cpu":  # reads are free here: the exact mean of the seen bins
        if not seen.any():
            return p
        fill = m2[seen].mean()
    else:
        fill = torch.where(seen, m2, 0.0).sum() / seen.sum().clamp_min(1)
    # unseen bins borrow the mean of the seen ones, so they keep being explored
    m2 = torch.where(seen, m2, fill).clamp_min(0.0)
    q = p * m2.sqrt()[bin_index]
    total = q.sum()
    mixture = (1.0 - a) * q / total + a * p
    return torch.where(seen.any() & (total > 0), mixture, p)


def _prior(objective, term: str) -> AbstractTimestepDistribution:
    return PriorProposal(objective.prior)


def _weighted(objective, term: str) -> AbstractTimestepDistribution:
    return WeightedProposal(objective.prior, objective.schedule, objective.weight)


def _adaptive(objective, term: str) -> AbstractTimestepDistribution:
    return AdaptiveProposal(objective, name=term)


#: The proposal names and their builders ``(objective, term name) -> proposal``.
PROPOSALS: dict[str, Callable[..., AbstractTimestepDistribution]] = {
    "prior": _prior,
    "weighted": _weighted,
    "adaptive": _adaptive,
}


def build_proposal(
    proposal: str | AbstractTimestepDistribution | Callable, objective, term: str
) -> AbstractTimestepDistribution:
    """The proposal for term ``term`` of ``objective``, support-checked against its prior.

    Args:
        proposal: a name in `PROPOSALS`, a distribution, or a callable ``objective -> proposal``.
        objective: the term's objective (its prior, schedule and weighting).
        term: the term's name (keys adaptive state).

    Raises:
        ValueError: on an unknown name, a callable that returns something else, or a proposal
            with ``q(t) = 0`` where ``p(t) > 0``.
    """
    if isinstance(proposal, str):
        q = PROPOSALS[_checks.choice("proposal", proposal, PROPOSALS)](objective, term)
    elif isinstance(proposal, AbstractTimestepDistribution):
        q = proposal
    elif callable(proposal):
        q = proposal(objective)
        if not isinstance(q, AbstractTimestepDistribution):
            raise TypeError(
                f"the proposal callable must return an AbstractTimestepDistribution, got "
                f"{type(q).__name__}"
            )
    else:
        raise ValueError(
            f"proposal must be one of {tuple(PROPOSALS)}, an AbstractTimestepDistribution or a "
            f"callable objective -> proposal, got {proposal!r}"
        )
    check_support(q, objective.prior, f"proposal for term {term!r}")
    return q
