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

    def check_timesteps(self, t: Tensor | int) -> Tensor:
        """``t`` as a long tensor, checked to hold integer timesteps in ``[0, T - 1]``.

        On the CPU the range is read once (one ``aminmax``); on an accelerator a device-side
        assert takes its place, so the check never waits for the device.

        Raises:
            TypeError: if ``t`` is not integer.
            ValueError: if a CPU ``t`` leaves ``[0, T - 1]``.
        """
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if not t.numel():
            return t.long()
        if t.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(t))
            if low < 0 or high >= self.num_timesteps:
                raise ValueError(
                    f"t must lie in [0, {self.num_timesteps - 1}], got range [{low}, {high}]"
                )
        else:
            # no host round trip on an accelerator: a device-side assert instead of ValueError
            torch._assert_async(
                ((t >= 0) & (t < self.num_timesteps)).all(),
                f"t must lie in [0, {self.num_timesteps - 1}]",
            )
        return t.long()

    def lookup(self, name: str, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``alpha_t`` (``name="alpha"``) or ``sigma_t`` (``"sigma"``) for ``t`` already checked
        by `check_timesteps`: one gather from a table kept per device and dtype.

        Args:
            name: ``"alpha"`` or ``"sigma"``.
            t: long timesteps in ``[0, T - 1]`` (unchecked here: negative ones would wrap).
            dtype: the result's dtype (default: torch's default dtype).
        """
        table = {"alpha": self._alpha, "sigma": self._sigma}[name]
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        return self._table_on(table, t.device, dtype)[t]

    def _index(self, table: Tensor, t: Tensor | int, like: Tensor | None) -> Tensor:
        t = self.check_timesteps(t)
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        return self._table_on(table, t.device, dtype)[t]

    def _table_on(self, table: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``table`` on ``device`` in ``dtype``, made once per device and dtype (no copy or cast
        per call; casting the table then gathering equals gathering then casting)."""
        if table.device == device and table.dtype == dtype:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), device, dtype)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = table.to(device=device, dtype=dtype)
        return hit

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
