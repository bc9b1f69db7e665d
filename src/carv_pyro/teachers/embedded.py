"""The embedded default teacher: a class-conditional 16x16 digits DDPM shipped with the package.

The weights live in ``carv_pyro/teachers/default/`` (`DEFAULT_TEACHER_DIR`):

- ``unet/``: a diffusers ``UNet2DModel`` (1 x 16 x 16, ``num_class_embeds=11``: the digits
  0-9 and the null class 10 used by classifier-free guidance), EMA weights;
- ``scheduler/``: ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
  prediction_type="epsilon")``;
- ``classifier.safetensors``: the digit classifier used to judge samples
  ([`carv_pyro.classifier.load_classifier`][carv_pyro.classifier.load_classifier]);
- ``manifest.json``: sha256 of every weight and config file, the training command, seed, steps,
  wall time, losses and the measured quality numbers.

Everything is produced by ``scripts/train_default_teacher.py`` from scikit-learn's bundled
digits and loads offline.

Examples:
    >>> teacher = load_default()
    >>> x_t = torch.randn(4, 1, 16, 16)
    >>> t = torch.tensor([10, 200, 500, 900])
    >>> cond = default_prompt_cond("three").expand(4)
    >>> teacher.predict_eps(x_t, t, cond, guidance_scale=DEFAULT_GUIDANCE_SCALE).shape
    torch.Size([4, 1, 16, 16])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import parse_prompt
from . import manifest as _manifest
from .diffusers_teacher import DiffusersTeacher
from .manifest import MANIFEST_FILE as MANIFEST_FILE  # re-exported (scripts import it here)
from .manifest import file_sha256

__all__ = [
    "DEFAULT_ETA",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_TEACHER_DIR",
    "NULL_CLASS",
    "default_prompt_cond",
    "file_sha256",
    "load_default",
    "load_manifest",
    "verify_default_weights",
]

DEFAULT_TEACHER_DIR: Path = Path(__file__).resolve().parent / "default"
"""Folder of the shipped default teacher (``unet/``, ``scheduler/``, classifier, manifest)."""

NULL_CLASS = 10
"""The unconditional class label of the default teacher (classifier-free guidance)."""

DEFAULT_GUIDANCE_SCALE = 2.0
"""Classifier-free guidance scale at which the default teacher's sample quality is measured
(``manifest.json``, key ``"quality"``)."""

DEFAULT_ETA = 1.0
"""DDIM ``eta`` of the measured samples (1: ancestral, DDPM-like). With 50 steps it avoids the
few speckled samples that deterministic DDIM (``eta=0``) gives this small teacher; the
manifest's ``quality.samples.sweep`` reports ``eta=0`` too."""

_SCRIPT = "scripts/train_default_teacher.py"


def load_default(
    *,
    dtype: torch.dtype | None = None,
    max_batch: int | None = None,
    compile: bool | dict[str, Any] = False,
) -> DiffusersTeacher:
    """Load the embedded default teacher (offline, frozen).

    Args:
        dtype: compute dtype (``None``: the input's dtype); see
            [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher].
        max_batch: evaluate at most this many rows per network call (``None``: one call).
        compile: compile the UNet's forward with `torch.compile`: ``True`` or a dict of its
            keyword arguments (see [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher]).

    Returns:
        A [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher] with ``event_shape == (1, 16, 16)``,
        ``cond_event_shape == ()`` (class labels ``0..9``) and null class
        `NULL_CLASS`.

    Raises:
        FileNotFoundError: if the shipped weights are missing.
        carv_pyro.teachers.manifest.TeacherFilesError: if a shipped file is missing or differs
            from ``manifest.json`` (checked once per process; see `verify_default_weights`).
    """
    if not (DEFAULT_TEACHER_DIR / "unet").is_dir():
        raise FileNotFoundError(
            f"the default teacher's weights are missing from {DEFAULT_TEACHER_DIR}; "
            f"run scripts/train_default_teacher.py to create them"
        )
    verify_default_weights()
    return DiffusersTeacher.from_pretrained(
        DEFAULT_TEACHER_DIR,
        dtype=dtype,
        max_batch=max_batch,
        null_class=NULL_CLASS,
        compile=compile,
    )


def default_prompt_cond(prompt: str | int) -> Tensor:
    """The default teacher's conditioning for a digit prompt.

    Args:
        prompt: ``"3"``, ``"three"``, ``" Three "`` or ``3`` (see
            [`carv_pyro.data.parse_prompt`][carv_pyro.data.parse_prompt]).

    Returns:
        A 0-d ``torch.long`` tensor holding the class label (broadcast by ``predict_eps`` to all
        rows).

    Raises:
        ValueError: if the prompt is not a digit or a digit's English name.
    """
    return torch.tensor(parse_prompt(prompt), dtype=torch.long)


def load_manifest(folder: str | Path | None = None) -> dict[str, Any]:
    """Read ``manifest.json`` of the default teacher (or of ``folder``).

    Raises:
        FileNotFoundError: if there is no manifest.
        carv_pyro.teachers.manifest.TeacherFilesError: if it is not valid JSON.
    """
    return _manifest.load_manifest(Path(folder or DEFAULT_TEACHER_DIR), script=_SCRIPT)


def verify_default_weights(folder: str | Path | None = None) -> None:
    """Check every file listed in ``manifest.json`` against its recorded sha256.

    A thin wrapper of ``carv_pyro.teachers.manifest.verify_teacher_files`` (cached per
    process by the files' sizes and modification times).

    Args:
        folder: the teacher folder (default: `DEFAULT_TEACHER_DIR`).

    Raises:
        FileNotFoundError: if the manifest is missing.
        RuntimeError: (a ``TeacherFilesError``) naming each file that is missing or whose
            sha256 differs from the manifest (the weights were modified or are from another
            training run).
    """
    _manifest.verify_teacher_files(
        Path(folder or DEFAULT_TEACHER_DIR), script=_SCRIPT, what="default teacher"
    )
