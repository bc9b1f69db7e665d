"""Timestep proposals under their public path, ``carv_pyro.proposals``.

The proposals live in [`carv_pyro.infer.proposals`][carv_pyro.infer.proposals], the
distributions they are made of in [`carv_pyro.timesteps`][carv_pyro.timesteps].
"""

from .infer.proposals import (
    PROPOSALS,
    AdaptiveProposal,
    DefensiveMixture,
    HistogramProposal,
    PriorProposal,
    WeightedProposal,
    check_support,
    second_moment_proposal,
)
from .timesteps import AbstractTimestepDistribution, Categorical, UniformTimesteps, timestep_bins

__all__ = [
    "PROPOSALS",
    "AbstractTimestepDistribution",
    "AdaptiveProposal",
    "Categorical",
    "DefensiveMixture",
    "HistogramProposal",
    "PriorProposal",
    "UniformTimesteps",
    "WeightedProposal",
    "check_support",
    "second_moment_proposal",
    "timestep_bins",
]
