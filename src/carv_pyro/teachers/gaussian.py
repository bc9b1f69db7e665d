"""Analytic teachers: the exact denoisers of Gaussian and Gaussian-mixture data.

For data ``x ~ p`` noised as ``x_t = alpha_t x + sigma_t eps``, the ideal noise predictor is
Tweedie's ``E[eps | x_t] = -sigma_t grad log p_t(x_t)``. For Gaussian data (and mixtures of
isotropic Gaussians) it is available in closed form, which makes these teachers the ground truth
of the library's tests and toy problems.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..schedules import DiscreteSchedule
from .base import AbstractTeacher

__all__ = ["GaussianTeacher", "GaussianMixtureTeacher"]


def _check_schedule(schedule: Any) -> DiscreteSchedule:
    if not all(hasattr(schedule, a) for a in ("alpha", "sigma", "num_timesteps")):
        raise TypeError(
            f"schedule must be a DiscreteSchedule (with alpha, sigma, num_timesteps), got "
            f"{type(schedule).__name__}"
        )
    return schedule


class _BufferCache:
    """Tensors moved lazily to the dtype/device of the input, cached for the last one seen."""

    def __init__(self, **tensors: Tensor):
        self._master = tensors
        self._key: tuple[torch.dtype, torch.device] | None = None
        self._moved: dict[str, Tensor] = {}

    def like(self, x: Tensor) -> dict[str, Tensor]:
        key = (x.dtype, x.device)
        if key != self._key:
            self._moved = {k: v.to(dtype=x.dtype, device=x.device) for k, v in self._master.items()}
            self._key = key
        return self._moved


def _per_row(v: Tensor, ndim: int) -> Tensor:
    """``(N,)`` -> ``(N, 1, ..., 1)`` with ``ndim`` trailing singleton dims."""
    return v.reshape(v.shape + (1,) * ndim)


class GaussianTeacher(AbstractTeacher):
    """The exact noise predictor for data ``x ~ N(mean, std^2 I)``.

    With ``x_t = alpha_t x + sigma_t eps``,

    ``eps_hat(x_t, t) = E[eps | x_t] = sigma_t (x_t - alpha_t mean) / (alpha_t^2 std^2 + sigma_t^2)``.

    Computes in ``x_t``'s dtype and on its device (the buffers follow lazily). Unconditional.

    Args:
        mean: the data mean; a tensor of at least one dimension whose shape is the
            ``event_shape``, e.g. ``(D,)`` or ``(C, H, W)``.
        std: the per-coordinate standard deviation: a positive float, or a positive tensor
            broadcastable to ``mean``'s shape.
        schedule: the noise schedule.

    Examples:
        >>> teacher = GaussianTeacher(torch.zeros(2), 1.0, DiscreteSchedule.linear(10))
        >>> teacher.predict_eps(torch.ones(4, 2), torch.full((4,), 9)).shape
        torch.Size([4, 2])
    """

    def __init__(self, mean: Tensor, std: float | Tensor, schedule: DiscreteSchedule):
        if not isinstance(mean, Tensor) or mean.dim() < 1:
            got = (
                f"a tensor of shape {tuple(mean.shape)}"
                if isinstance(mean, Tensor)
                else type(mean).__name__
            )
            raise ValueError(
                f"mean must be a tensor with at least one dimension (its shape is the "
                f"event_shape), got {got}"
            )
        if not mean.dtype.is_floating_point:
            mean = mean.to(torch.get_default_dtype())
        std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
        try:
            std_t = torch.broadcast_to(std_t, mean.shape)
        except RuntimeError:
            raise ValueError(
                f"std must be broadcastable to mean's shape {tuple(mean.shape)}, got shape "
                f"{tuple(std_t.shape)}"
            ) from None
        if not torch.isfinite(mean).all():
            raise ValueError("mean must be finite")
        if not (torch.isfinite(std_t).all() and (std_t > 0).all()):
            raise ValueError("std must be positive and finite")
        self.schedule = _check_schedule(schedule)
        self.mean = mean.detach().clone()
        self.std = std_t.detach().clone()
        self.event_shape = torch.Size(mean.shape)
        self.cond_event_shape = None
        self._buffers = _BufferCache(mean=self.mean, var=self.std**2)

    def _predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        b = self._buffers.like(x_t)
        nd = len(self.event_shape)
        a = _per_row(self.schedule.alpha(t, like=x_t), nd)
        s = _per_row(self.schedule.sigma(t, like=x_t), nd)
        return s * (x_t - a * b["mean"]) / (a**2 * b["var"] + s**2)


class GaussianMixtureTeacher(AbstractTeacher):
    """The exact noise predictor for a mixture of isotropic Gaussians, class-conditional.

    Data: ``k ~ Categorical(weights)``, ``x | k ~ N(means[k], stds[k]^2 I)``. Given ``x_t``,
    component ``k`` has ``x_t | k ~ N(alpha_t means[k], v_k I)`` with
    ``v_k = alpha_t^2 stds[k]^2 + sigma_t^2``, and

    ``E[eps | x_t] = sum_k r_k(x_t) sigma_t (x_t - alpha_t means[k]) / v_k``

    with posterior responsibilities ``r_k`` computed in log space (stable for far-apart
    components).

    Conditioning is a long component index (``cond_event_shape == ()``): ``cond = k`` in
    ``[0, M - 1]`` gives component ``k``'s exact denoiser (``r = one_hot(k)``); ``cond = M``
    means "the whole mixture" and is what `null_cond` returns, so classifier-free guidance
    ``eps_mix + s (eps_k - eps_mix)`` is exactly checkable. ``cond=None`` is the mixture.

    Args:
        means: ``(M, *event_shape)`` component means.
        stds: ``(M,)`` positive component standard deviations (a float is shared by all).
        weights: ``(M,)`` non-negative mixture weights with a positive sum (normalized here).
        schedule: the noise schedule.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | Any,
        schedule: DiscreteSchedule,
    ):
        if not isinstance(means, Tensor) or means.dim() < 2:
            got = tuple(means.shape) if isinstance(means, Tensor) else type(means).__name__
            raise ValueError(
                f"means must be a tensor of shape (M, *event_shape) with a non-empty "
                f"event_shape, got {got}"
            )
        if not means.dtype.is_floating_point:
            means = means.to(torch.get_default_dtype())
        m = means.shape[0]
        if m < 1:
            raise ValueError("means must hold at least one component (M >= 1)")
        stds = torch.as_tensor(stds, dtype=means.dtype, device=means.device)
        if stds.dim() == 0:
            stds = stds.expand(m)
        if stds.shape != (m,):
            raise ValueError(f"stds must have shape ({m},), got {tuple(stds.shape)}")
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (m,):
            raise ValueError(f"weights must have shape ({m},), got {tuple(weights.shape)}")
        if not torch.isfinite(means).all():
            raise ValueError("means must be finite")
        if not (torch.isfinite(stds).all() and (stds > 0).all()):
            raise ValueError("stds must be positive and finite")
        if not (torch.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
            raise ValueError("weights must be non-negative and finite with a positive sum")
        self.schedule = _check_schedule(schedule)
        self.means = means.detach().clone()
        self.stds = stds.detach().clone()
        self.weights = (weights / weights.sum()).detach().clone()
        self.num_components = m
        self.event_shape = torch.Size(means.shape[1:])
        self.cond_event_shape = torch.Size([])
        self._buffers = _BufferCache(
            means=self.means, var=self.stds**2, log_weights=self.weights.log()
        )

    def null_cond(self, n: int) -> Tensor:
        """``(n,)`` filled with ``M``: the index meaning "the whole mixture"."""
        return torch.full((n,), self.num_components, dtype=torch.long)

    def label_range(self) -> tuple[int, int]:
        """``(0, M)``: a component index, or ``M`` for the whole mixture."""
        return 0, self.num_components

    def component(self, k: int) -> GaussianTeacher:
        """Component ``k`` as a `GaussianTeacher` (the same as ``cond = k``)."""
        return GaussianTeacher(self.means[k], self.stds[k], self.schedule)

    def _predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        b = self._buffers.like(x_t)
        n, m = x_t.shape[0], self.num_components
        dim = self.event_shape.numel()
        a = self.schedule.alpha(t, like=x_t)[:, None]  # (N, 1)
        s = self.schedule.sigma(t, like=x_t)[:, None]  # (N, 1)
        v = a**2 * b["var"] + s**2  # (N, M)
        x = x_t.reshape(n, 1, dim)
        resid = x - a[..., None] * b["means"].reshape(1, m, dim)  # (N, M, D)
        eps_k = s[..., None] * resid / v[..., None]  # (N, M, D)
        log_lik = -0.5 * (resid.square().sum(-1) / v + dim * torch.log(v))  # (N, M)
        r = torch.softmax(b["log_weights"] + log_lik, dim=-1)  # (N, M)
        if cond is not None:
            if cond.dtype.is_floating_point or cond.dtype.is_complex or cond.dtype == torch.bool:
                raise TypeError(f"cond must hold integer component indices, got {cond.dtype}")
            if int(cond.min()) < 0 or int(cond.max()) > m:
                raise ValueError(
                    f"cond must lie in [0, {m}] (component index, or {m} for the whole "
                    f"mixture), got range [{int(cond.min())}, {int(cond.max())}]"
                )
            cond = cond.long()
            one_hot = torch.nn.functional.one_hot(cond.clamp_max(m - 1), m).to(r.dtype)
            r = torch.where((cond < m)[:, None], one_hot, r)
        eps = (r[..., None] * eps_k).sum(1)  # (N, D)
        return eps.reshape(n, *self.event_shape)

    def __repr__(self) -> str:
        return (
            f"GaussianMixtureTeacher(M={self.num_components}, "
            f"event_shape={tuple(self.event_shape)}, schedule={self.schedule!r})"
        )
