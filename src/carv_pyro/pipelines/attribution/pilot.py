"""`pilot_proposal`: the variance-optimal timestep proposal ``q*``, measured by a pilot.

For the embedded digits teacher the per-draw gradient norm is far from flat in ``t``
(``E||f||^2 | t`` falls about a thousandfold from ``t = 0`` to ``t > 500``), so importance
sampling matters more than stratification, and the x-space proxies of ``"weighted"`` and
``"adaptive"`` do not track ``||f||``. The pilot measures the second moments of single-draw
gradient features directly, per geometric bin (`geometric_bins`), and hands them to
[`second_moment_proposal`][carv_pyro.proposals.second_moment_proposal].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ... import _checks
from ...infer.estimator import Estimator
from ...infer.loss import CARVLoss
from ...infer.proposals import second_moment_proposal
from ...infer.samplers import RandomSource
from ...timesteps import AbstractTimestepDistribution, Categorical

if TYPE_CHECKING:
    from .featurizer import AttributionFeaturizer

__all__ = ["geometric_bins", "pilot_proposal"]


def geometric_bins(prior: AbstractTimestepDistribution, n_bins: int = 12) -> Tensor:
    """``(T,)`` bin index of every timestep: ``n_bins`` geometrically growing bins.

    Bin ``b`` covers ``[lo + e_b, lo + e_{b+1})`` with ``e_b ≈ span^(b / n_bins) - 1`` over the
    prior's support ``[lo, lo + span)``, so the first bins are single timesteps and the last
    ones wide: the resolution where per-draw gradient norms change fastest (small ``t``).
    Empty bins are merged, so fewer than ``n_bins`` may result.

    Args:
        prior: the timestep prior (its support is binned; other timesteps go to the end bins).
        n_bins: the number of bins asked for.

    Returns:
        ``(T,)`` long bin indices ``0 .. n - 1``, non-decreasing in ``t``.
    """
    n_bins = _checks.positive_int("n_bins", n_bins)
    support = torch.nonzero(prior.probs() > 0).flatten()
    lo, hi = int(support[0]), int(support[-1])
    span = hi - lo + 1
    edges = sorted({round(span ** (b / n_bins)) - 1 for b in range(n_bins)} | {0, span})
    edges = torch.tensor(edges, dtype=torch.long)
    t = torch.arange(prior.num_timesteps).clamp(lo, hi) - lo
    return torch.searchsorted(edges[1:-1], t, right=True)


def pilot_proposal(
    featurizer: AttributionFeaturizer,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    n_draws: int = 48,
    n_bins: int = 12,
    defensive: float = 0.1,
    seed: int = 0,
    loss: CARVLoss | None = None,
) -> Categorical:
    """The variance-optimal timestep proposal, estimated from a pilot of per-draw gradients.

    ``q*(t) ∝ p(t) sqrt(E[||f||^2 | t])`` where ``f`` is one draw's (projected) gradient
    feature. The second moments are measured per geometric bin (`geometric_bins`) from
    ``n_draws`` single-draw gradients of each pilot example, the bins drawn equally often and
    ``t`` within a bin by the prior (the draws' importance weights are divided out). The result
    is mixed with the prior, ``q = (1 - a) q* + a p``, so that every weight ``p / q`` stays
    below ``1 / a`` ([`second_moment_proposal`][carv_pyro.proposals.second_moment_proposal];
    a bin the pilot never drew borrows the mean of the others).

    The pilot costs ``n_examples * n_draws`` teacher forward and backward passes, once; the
    proposal is then fixed and reused for every example (an unbiased IS proposal needs only
    to be independent of the draws it weights).

    Args:
        featurizer: the featurizer whose features the proposal is for.
        images: ``(n, *image)`` a few pilot examples (as in `AttributionFeaturizer.features`).
        labels: ``(n,)`` their labels.
        n_draws: single-draw gradients per pilot example.
        n_bins: geometric timestep bins asked for.
        defensive: the prior's share ``a`` in ``(0, 1]``.
        seed: seed of the pilot draws.
        loss: the [`CARVLoss`][carv_pyro.CARVLoss] the pilot runs (default: a new one); its
            ``hooks`` see every pilot draw.

    Returns:
        A [`Categorical`][carv_pyro.proposals.Categorical] over the ``T`` timesteps.

    Raises:
        ValueError: naming the bad argument.
    """
    n_draws = _checks.positive_int("n_draws", n_draws)
    defensive = _checks.in_range("defensive", defensive, 0.0, 1.0, low_open=True)
    source = RandomSource(seed=_checks.non_negative_int("seed", seed))
    prior = featurizer.objective.prior
    p = prior.probs()
    bins = geometric_bins(prior, n_bins)
    n = int(bins.max()) + 1
    mass = torch.zeros(n, dtype=torch.float64).index_add_(0, bins, p)
    # the pilot draws each bin equally often, t within a bin by the prior
    design = Categorical(torch.where(mass[bins] > 0, p / mass[bins].clamp_min(1e-300), 0.0))
    estimator = Estimator(K=1, proposal=design, name="pilot")
    sum_sq = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for _ in range(n_draws):
        res = featurizer.features(
            images,
            labels,
            estimator=estimator,
            shared_draws=False,
            seed=source.integer_seed(),
            record_draws=True,
            loss=loss,
        )
        # the recorded draws live on the CPU, the features where the teacher runs
        f = res.features.to("cpu", torch.float64) / res.weights  # (n_examples, k), unweighted
        b = bins[res.timesteps[:, 0]]
        sum_sq.index_add_(0, b, f.pow(2).sum(1))
        count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    m2 = torch.where(count > 0, sum_sq / count.clamp_min(1.0), torch.nan)
    return second_moment_proposal(prior, bins, m2, defensive)
