"""Discrete noise schedules ``alpha(t), sigma(t)``.

A diffusion teacher noises a clean sample as ``x_t = alpha_t x + sigma_t eps``. For the
discrete (DDPM-style) schedules used by diffusers, ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])`` for integer ``t in {0, ..., T - 1}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DiscreteSchedule"]


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
        try:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().clone()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"alphas_cumprod must be a 1-D sequence of numbers, got {alphas_cumprod!r:.60}"
            ) from None
        if ac.dim() != 1 or ac.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D tensor with at least 2 entries, got shape "
                f"{tuple(ac.shape)}"
            )
        if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must be finite and lie in (0, 1]")
        if (ac[1:] > ac[:-1] * (1 + 1e-12)).any():  # relative: tiny values count too
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
