"""`VAEEncoder`: a frozen diffusers ``AutoencoderKL`` encoder, the upstream of a latent teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import _checks
from ._random_init import random_init

__all__ = ["TINY_VAE_CONFIG", "VAEEncoder"]

#: A tiny ``AutoencoderKL`` for 1 x 16 x 16 images: 4 x 8 x 8 latents (random weights).
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
}


class VAEEncoder:
    """A frozen diffusers ``AutoencoderKL`` encoder as the upstream of a latent teacher.

    ``u = scaling_factor * mean(q(z | x))``: the posterior mean, as latent-diffusion training
    uses it (deterministic, so one encoding per example is reused by all its draws).

    Args:
        vae: an ``AutoencoderKL``; default: one built from ``config`` with seeded random
            weights (the encoder's cost is real, its weights are not trained; drawn from a
            generator of its own, torch's global one is left alone).
        config: constructor arguments for the default (default `TINY_VAE_CONFIG`).
        seed: seed of the default's random weights.
        scaling_factor: latent scale (default: the VAE config's ``scaling_factor``).

    Raises:
        ValueError: if ``vae`` is not an ``AutoencoderKL``.
    """

    def __init__(
        self,
        vae: Any = None,
        *,
        config: dict[str, Any] | None = None,
        seed: int = 0,
        scaling_factor: float | None = None,
    ):
        from diffusers import AutoencoderKL

        if vae is None:
            seed = _checks.non_negative_int("seed", seed)
            cfg = dict(config or TINY_VAE_CONFIG)
            vae = random_init(lambda: AutoencoderKL(**cfg), seed)
        elif not isinstance(vae, AutoencoderKL):
            raise ValueError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.scaling_factor = float(
            vae.config.scaling_factor if scaling_factor is None else scaling_factor
        )

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Encode images.

        Args:
            images: ``(n, C, H, W)`` images.

        Returns:
            ``(n, latent_channels, h, w)`` scaled posterior-mean latents.
        """
        param = next(self.vae.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def to(self, *args: Any, **kwargs: Any) -> VAEEncoder:
        """Move the VAE (``torch.nn.Module.to`` arguments); returns ``self``."""
        self.vae.to(*args, **kwargs)
        return self
