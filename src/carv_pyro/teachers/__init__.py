"""Frozen diffusion teachers: predict the noise ``eps`` in ``x_t = alpha_t x + sigma_t eps``.

- `AbstractTeacher`: the interface (shape checks, classifier-free guidance, chunking).
- `GaussianTeacher`, `GaussianMixtureTeacher`: exact analytic denoisers.
- `DiffusersTeacher`: any local diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.
- `PipelineTeacher` (`teacher_from_pipeline`): a Stable-Diffusion-like pipeline's
  latent space, text prompts and VAE encoder.
- `load_default`: the small teacher shipped inside the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import AbstractTeacher
from .gaussian import GaussianMixtureTeacher, GaussianTeacher

if TYPE_CHECKING:
    from .diffusers_teacher import DiffusersTeacher
    from .pipeline import PipelineTeacher, teacher_from_pipeline

__all__ = [
    "AbstractTeacher",
    "DiffusersTeacher",
    "GaussianMixtureTeacher",
    "GaussianTeacher",
    "PipelineTeacher",
    "load_default",
    "teacher_from_pipeline",
]


def __getattr__(name: str) -> Any:
    # diffusers takes seconds to import: load it only when a diffusers teacher is asked for.
    if name == "DiffusersTeacher":
        from .diffusers_teacher import DiffusersTeacher

        return DiffusersTeacher
    if name in ("PipelineTeacher", "teacher_from_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_default(*args: Any, **kwargs: Any) -> DiffusersTeacher:
    """Load the embedded default teacher shipped with the package (nothing is downloaded).

    Imported lazily from `carv_pyro.teachers.embedded`; see
    [`carv_pyro.teachers.embedded.load_default`][carv_pyro.teachers.load_default] for the arguments.

    Returns:
        a `DiffusersTeacher`.
    """
    from .embedded import load_default as _load_default

    return _load_default(*args, **kwargs)
