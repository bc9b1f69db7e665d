"""Frozen diffusion teachers: predict the noise ``eps`` in ``x_t = alpha_t x + sigma_t eps``.

- `AbstractTeacher`: the interface (shape checks, classifier-free guidance, chunking).
- `GaussianTeacher`, `GaussianMixtureTeacher`: exact analytic denoisers.
- `DiffusersTeacher`: any local diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.
- `PipelineTeacher` (`teacher_from_pipeline`): a Stable-Diffusion-like pipeline's
  latent space, text prompts and VAE encoder.
- `load_default`: the small teacher shipped inside the package (16x16 digits).
- `load_shapes`: the shipped 3D-aware teacher (32x32 shaded shapes, camera-conditioned).
- `load_embedded`: a shipped teacher by name (``"digits"``, ``"shapes"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import AbstractTeacher
from .gaussian import GaussianMixtureTeacher, GaussianTeacher

if TYPE_CHECKING:
    from .diffusers_teacher import DiffusersTeacher
    from .pipeline import PipelineTeacher, teacher_from_pipeline
    from .shapes import ShapesTeacher

__all__ = [
    "AbstractTeacher",
    "DiffusersTeacher",
    "GaussianMixtureTeacher",
    "GaussianTeacher",
    "PipelineTeacher",
    "load_default",
    "load_embedded",
    "load_shapes",
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


def load_shapes(*args: Any, **kwargs: Any) -> ShapesTeacher:
    """Load the embedded 3D-aware shapes teacher shipped with the package (nothing is downloaded).

    A camera- and class-conditioned 32x32 DDPM of shaded renders of procedural 3D shapes,
    imported lazily from ``carv_pyro.teachers.shapes``; see ``carv_pyro.teachers.shapes.load_shapes``
    for the arguments (``dtype``, ``max_batch``) and ``carv_pyro.teachers.shapes.encode_cond`` for
    its conditioning.

    Returns:
        a ``carv_pyro.teachers.shapes.ShapesTeacher``.
    """
    from .shapes import load_shapes as _load_shapes

    return _load_shapes(*args, **kwargs)


def load_embedded(name: str, **kwargs: Any) -> DiffusersTeacher:
    """Load a teacher shipped with the package, by name.

    Args:
        name: ``"digits"`` (`load_default`, the 16x16 digits DDPM) or ``"shapes"``
            (`load_shapes`, the 32x32 camera-conditioned shapes DDPM).
        **kwargs: passed to the loader (``dtype``, ``max_batch``).

    Returns:
        the teacher.

    Raises:
        ValueError: naming the unknown teacher and the known ones.
    """
    loaders = {"digits": load_default, "shapes": load_shapes}
    if name not in loaders:
        raise ValueError(f"unknown embedded teacher {name!r}; expected one of {tuple(loaders)}")
    return loaders[name](**kwargs)
