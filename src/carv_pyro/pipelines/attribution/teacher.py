"""`load_attribution_teacher`: the embedded digits teacher, or its architecture at random init."""

from __future__ import annotations

import warnings
from typing import Any

from ... import _checks
from ._random_init import random_init

__all__ = ["load_attribution_teacher"]

#: The architecture of the embedded teacher (used with random weights when they are missing).
_DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 32, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "add_attention": True,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "num_class_embeds": 11,
}


def load_attribution_teacher(seed: int = 0) -> tuple[Any, str]:
    """The embedded digits teacher, or its architecture at a seeded random init if missing.

    Args:
        seed: seed of the random weights (used only when the shipped weights are missing; drawn
            from a generator of its own, torch's global one is left alone).

    Returns:
        ``(teacher, kind)`` with ``kind`` ``"embedded"`` or ``"random-init"`` (with a warning).
    """
    from ...teachers import load_default

    seed = _checks.non_negative_int("seed", seed)
    try:
        return load_default(), "embedded"
    except FileNotFoundError:
        from diffusers import DDPMScheduler, UNet2DModel

        from ...teachers.diffusers_teacher import DiffusersTeacher

        warnings.warn(
            "the embedded teacher's weights are missing; using its architecture with random "
            "weights",
            stacklevel=2,
        )
        unet = random_init(lambda: UNet2DModel(**_DEFAULT_UNET_CONFIG), seed)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        return DiffusersTeacher(unet, sched, null_class=10), "random-init"
