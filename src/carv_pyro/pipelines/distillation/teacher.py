"""The real teachers of the distillation pipeline: the embedded digits teacher, or a stand-in."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ... import _checks

__all__ = ["default_teacher", "tiny_digits_teacher"]


def tiny_digits_teacher(seed: int = 0, channels: tuple[int, ...] = (8, 16)) -> Any:
    """A small RANDOMLY initialized class-conditional teacher with the default teacher's layout.

    A stand-in for [`carv_pyro.teachers.load_default`][carv_pyro.teachers.load_default] in tests
    and demos: a ``UNet2DModel`` on ``1 x 16 x 16`` images with labels 0-9 and the null class 10,
    and the linear-beta ``DDPMScheduler`` with 1000 steps. Its predictions are meaningless.

    The weights come from torch's generator seeded with ``seed`` inside
    ``torch.random.fork_rng`` (diffusers initialises modules from the global generator), so the
    caller's global random state is left as it was.

    Args:
        seed: seeds the weights.
        channels: ``block_out_channels`` (one down/up block each).

    Returns:
        A [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher].

    Raises:
        ValueError: on a bad seed or channel count.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from ...teachers.diffusers_teacher import DiffusersTeacher

    _checks.seed_value("seed", seed)
    channels = tuple(_checks.positive_int("channels", c) for c in channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=16,
            in_channels=1,
            out_channels=1,
            block_out_channels=channels,
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            layers_per_block=1,
            norm_num_groups=4,
            num_class_embeds=11,
        )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=1000), null_class=10)


def default_teacher() -> Any:
    """The embedded teacher, or (with a warning) a random stand-in while its weights are missing."""
    from ...teachers import load_default

    try:
        with torch.random.fork_rng(devices=[]):  # building the modules draws from the global RNG
            return load_default()
    except FileNotFoundError as err:
        warnings.warn(
            f"{err}; using a randomly initialized stand-in teacher (tiny_digits_teacher): "
            f"variance numbers are indicative only and Fréchet distances meaningless",
            stacklevel=3,
        )
        return tiny_digits_teacher()
