"""`DrawRecorder`: a [`CARVLoss`][carv_pyro.CARVLoss] hook that keeps a term's draws and weights."""

from __future__ import annotations

from torch import Tensor

__all__ = ["DrawRecorder"]


class DrawRecorder:
    """Keeps, for every particle the loss runs, one term's timesteps, noise and weights.

    The timesteps and noise are read from the model trace (sites ``{term}.t`` and
    ``{term}.eps``), the importance weights ``p / q`` from the loss's last particle, so they are
    exactly the weights the gradient used. Everything is detached and copied to the CPU.

    Args:
        term: the teacher term's name.

    Attributes:
        timesteps: per particle, ``batch_shape`` long timesteps (e.g. ``(R, K)``).
        noise: per particle, ``(*batch_shape, *event)`` noise.
        weights: per particle, ``batch_shape`` float64 importance weights.
    """

    def __init__(self, term: str):
        self.term = term
        self.timesteps: list[Tensor] = []
        self.noise: list[Tensor] = []
        self.weights: list[Tensor] = []

    def __call__(self, loss, records, model_trace, guide_trace) -> None:
        """The hook: ``hook(loss, records, model_trace, guide_trace)``."""
        self.timesteps.append(model_trace.nodes[f"{self.term}.t"]["value"].detach().cpu())
        self.noise.append(model_trace.nodes[f"{self.term}.eps"]["value"].detach().cpu())
        self.weights.append(loss.last_particle.weights[self.term].detach().cpu())
