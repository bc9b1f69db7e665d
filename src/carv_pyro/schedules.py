"""Noise schedules ``alpha(t), sigma(t)`` and timestep priors ``p(t)``.

A diffusion teacher noises a clean sample as ``x_t = alpha_t x + sigma_t eps``. For the
discrete (DDPM-style) schedules used by diffusers, ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])`` for integer ``t in {0, ..., T - 1}``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .proposals import AbstractTimestepDistribution

__all__ = ["DiscreteSchedule", "UniformTimesteps"]


class DiscreteSchedule:
    """A discrete variance-preserving noise schedule.

    Args:
        alphas_cumprod: ``(T,)`` cumulative products of ``1 - beta_t``, strictly in ``(0, 1]``
            and non-increasing, as in diffusers' ``scheduler.alphas_cumprod``.

    Examples:
        >>> from diffusers import DDPMScheduler
        >>> schedule = DiscreteSchedule.from_diffusers(DDPMScheduler())
        >>> schedule.num_timesteps
        1000
        >>> schedule.alpha(torch.tensor([[0, 999]])).shape
        torch.Size([1, 2])
    """

    def __init__(self, alphas_cumprod: Tensor | Any):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().clone()
        if ac.dim() != 1 or ac.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape "
                f"{tuple(ac.shape)}"
            )
        if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must be finite and lie in (0, 1]")
        if (ac[1:] > ac[:-1] + 1e-12).any():
            raise ValueError("alphas_cumprod must be non-increasing in t")
        self.alphas_cumprod = ac
        self._alpha = ac.sqrt()
        self._sigma = (1.0 - ac).clamp_min(0.0).sqrt()

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> DiscreteSchedule:
        """Build the schedule of any diffusers scheduler that exposes ``alphas_cumprod``.

        Args:
            scheduler: e.g. ``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``.

        Raises:
            TypeError: if ``scheduler`` has no ``alphas_cumprod`` attribute.
        """
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise TypeError(
                f"scheduler must expose `alphas_cumprod` (a DDPM-style discrete scheduler); "
                f"{type(scheduler).__name__} does not"
            )
        return cls(ac)

    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
    ) -> DiscreteSchedule:
        """The DDPM linear-beta schedule (``beta_schedule="linear"`` in diffusers)."""
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @property
    def num_timesteps(self) -> int:
        """``T``, the number of discrete timesteps."""
        return self.alphas_cumprod.numel()

    def _index(self, table: Tensor, t: Tensor | int, like: Tensor | None) -> Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.device.type == "cpu":
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
                raise ValueError(
                    f"t must lie in [0, {self.num_timesteps - 1}], got range "
                    f"[{int(t.min())}, {int(t.max())}]"
                )
        elif t.numel():
            # no host round trip on an accelerator: a device-side assert instead of ValueError
            torch._assert_async(
                ((t >= 0) & (t < self.num_timesteps)).all(),
                f"t must lie in [0, {self.num_timesteps - 1}]",
            )
        out = self._table_on(table, t.device)[t.long()]
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        return out.to(dtype)

    def _table_on(self, table: Tensor, device: torch.device) -> Tensor:
        """``table`` on ``device``, copied once per device (no host-to-device copy per call)."""
        if table.device == device:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), device)
        if key not in cache:
            cache[key] = table.to(device)
        return cache[key]

    def alpha(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``alpha_t = sqrt(alphas_cumprod[t])`` with the shape of ``t``.

        Args:
            t: integer timesteps of any shape.
            like: optional tensor whose dtype the result takes (default: torch's default dtype).
        """
        return self._index(self._alpha, t, like)

    def sigma(self, t: Tensor | int, like: Tensor | None = None) -> Tensor:
        """``sigma_t = sqrt(1 - alphas_cumprod[t])`` with the shape of ``t``."""
        return self._index(self._sigma, t, like)

    def __repr__(self) -> str:
        return f"DiscreteSchedule(num_timesteps={self.num_timesteps})"


class UniformTimesteps(AbstractTimestepDistribution):
    """The uniform timestep prior over the integer steps ``int(lo T) .. int(hi T)`` inclusive.

    This is the ``p(t)`` of DreamFusion-style SDS with ``t_range=(0.02, 0.98)``.

    Args:
        num_timesteps: ``T``.
        t_range: ``(lo, hi)`` with ``0 <= lo <= hi < 1``.
    """

    def __init__(self, num_timesteps: int, t_range: tuple[float, float] = (0.02, 0.98)):
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        try:
            lo, hi = (float(v) for v in t_range)
        except (TypeError, ValueError):
            raise ValueError(f"t_range must be a pair (lo, hi), got {t_range!r}") from None
        if not (0.0 <= lo <= hi < 1.0) or math.isnan(lo) or math.isnan(hi):
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
