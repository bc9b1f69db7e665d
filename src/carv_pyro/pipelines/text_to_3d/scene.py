"""What the text-to-3D job needs of a teacher: a `Scene`.

A scene binds a teacher to a prompt: how a rendered view is conditioned (the shapes teacher
knows the camera; the digits teacher only the class), how views are rendered so that they look
like the teacher's training data (resolution, shading, anti-aliasing), where cameras may be, and
how a carved field is judged (3D IoU against the prompt's true shape where there is one, and a
classifier's probability of the prompt on held-out views).

- `ShapesScene`: the embedded 3D-aware teacher (the default): full-circle cameras, IoU.
- `DigitsScene`: the embedded 16x16 digits teacher: a frontal arc (it knows no sides), no IoU.

`make_scene` picks one from ``--teacher`` (``"shapes"``, ``"digits"`` or a local folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ... import _checks

__all__ = ["TEACHERS", "DigitsScene", "Scene", "ShapesScene", "make_scene"]

TEACHERS = ("shapes", "digits")


@dataclass
class Scene:
    """A teacher and a prompt, as the text-to-3D job sees them.

    Attributes:
        teacher: the frozen teacher.
        prompt: the prompt as given.
        label: its class label.
        channels: image channels ``C``.
        render_kwargs: keyword arguments of [`render`][carv_pyro.pipelines.render.render] that
            match the teacher's training renders (``image_size``, ``shading``, ...).
        azimuth_deg: the default camera azimuth prior ``(low, high)``, degrees.
        elevation_deg: the default camera elevation prior ``(low, high)``, degrees.
        guidance_scale: the recommended SDS guidance scale.
        classifier: the judge of held-out views (``(N, C, H, W) -> logits``), or ``None``.
        names: class names in label order (for labels in pictures).
    """

    teacher: Any
    prompt: str
    label: int
    channels: int
    render_kwargs: dict[str, Any]
    azimuth_deg: tuple[float, float]
    elevation_deg: tuple[float, float]
    guidance_scale: float
    classifier: Any = None
    names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def image_size(self) -> int:
        """Pixels per side of the teacher's images."""
        return int(self.render_kwargs["image_size"])

    def cond(self, azimuth: Tensor, elevation: Tensor) -> Any:
        """The conditioning of views seen from ``(azimuth, elevation)`` (``(R, 1)`` radians),
        broadcastable against the draws ``(R, K)``."""
        raise NotImplementedError

    def true_occupancy(self, resolution: int) -> Tensor | None:
        """The prompt's true shape as a ``(D, D, D)`` occupancy grid, or ``None``."""
        return None

    @torch.no_grad()
    def judge(self, images: Tensor) -> dict[str, float]:
        """``p`` (mean probability of the prompt) and ``accuracy`` over ``(V, C, H, W)`` renders."""
        if self.classifier is None:
            return {}
        p = next(self.classifier.parameters(), None)
        if p is not None:
            images = images.to(dtype=p.dtype, device=p.device)
        probs = torch.softmax(self.classifier(images.clamp(-1, 1)).double(), dim=-1)
        return {
            "p": float(probs[:, self.label].mean()),
            "accuracy": float((probs.argmax(-1) == self.label).double().mean()),
        }


class ShapesScene(Scene):
    """The shapes teacher: conditioned on the class and the camera of every view."""

    def cond(self, azimuth: Tensor, elevation: Tensor) -> Tensor:
        return self.teacher.cond(self.label, azimuth, elevation)

    def true_occupancy(self, resolution: int) -> Tensor:
        from ..shapes import occupancy_grid

        return occupancy_grid(self.names[self.label], resolution)


class DigitsScene(Scene):
    """The digits teacher: conditioned on the class only (it has no notion of the camera)."""

    def cond(self, azimuth: Tensor, elevation: Tensor) -> Tensor:
        # a fill on the device (a tensor built from a host number would be copied: a sync)
        return torch.full((), self.label, dtype=torch.long, device=azimuth.device)


def _shapes_scene(teacher: Any, prompt: str, classifier: Any) -> ShapesScene:
    from ...teachers.shapes import SHAPES_SDS_GUIDANCE_SCALE, parse_shape_prompt

    label = parse_shape_prompt(prompt, teacher.class_names)
    cams = teacher.settings.get("cameras", {})
    lo, hi = cams.get("elevation_deg", (-10.0, 50.0))
    if classifier is None:
        from ..shape_classifier import load_shape_classifier

        root = Path(getattr(teacher, "folder", "") or "")
        path = root / "classifier.safetensors"
        classifier = load_shape_classifier(path if path.is_file() else None)
    return ShapesScene(
        teacher=teacher,
        prompt=prompt,
        label=label,
        channels=int(teacher.event_shape[0]),
        render_kwargs=teacher.render_kwargs(),
        azimuth_deg=(-180.0, 180.0),
        elevation_deg=(float(lo), float(hi)),
        guidance_scale=SHAPES_SDS_GUIDANCE_SCALE,
        classifier=classifier,
        names=tuple(teacher.class_names),
    )


def _digits_scene(teacher: Any, prompt: str, classifier: Any) -> DigitsScene:
    from ...data import DIGIT_NAMES, parse_prompt

    label = parse_prompt(prompt)
    if classifier is None:
        from ...classifier import load_classifier

        classifier = load_classifier()
    size = int(teacher.event_shape[-1])
    return DigitsScene(
        teacher=teacher,
        prompt=prompt,
        label=label,
        channels=int(teacher.event_shape[0]),
        render_kwargs={"image_size": size, "n_samples": 24},
        # the digits teacher knows no side or back: a frontal arc carves a digit in relief
        azimuth_deg=(-45.0, 45.0),
        elevation_deg=(-10.0, 30.0),
        guidance_scale=10.0,
        classifier=classifier,
        names=DIGIT_NAMES,
    )


def make_scene(
    teacher: str | Any,
    prompt: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    classifier: Any = None,
    compile: bool | dict[str, Any] = False,
) -> Scene:
    """The scene of a prompt with a teacher.

    Args:
        teacher: ``"shapes"`` (the embedded 3D-aware teacher), ``"digits"`` (the embedded 16x16
            digits teacher), a local folder holding either kind (``unet/``, ``scheduler/`` and,
            for a shapes teacher, ``shapes_teacher.json``), or a teacher object.
        prompt: the prompt (a class name such as ``"torus"``, or a digit for ``"digits"``).
        device: where the teacher runs.
        dtype: its compute dtype (``None``: the input's).
        compile: the loaded teacher's ``compile=`` (``torch.compile`` of its network; see
            [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher]); a teacher object is used
            as it is (an error if ``compile`` is asked for it).
        classifier: a judge for held-out views (default: the teacher's own).

    Raises:
        ValueError: on an unknown teacher name, a folder that is no teacher, or a prompt the
            teacher does not know (the message lists the classes).
    """
    from ...teachers.shapes import SHAPES_TEACHER_CONFIG, ShapesTeacher

    _checks.instance("prompt", prompt, (str, int), "a prompt string")
    prompt = str(prompt)
    if isinstance(teacher, str) and teacher in TEACHERS:
        if teacher == "shapes":
            from ...teachers.shapes import load_shapes

            obj = load_shapes(dtype=dtype, compile=compile)
        else:
            from ...teachers import load_default

            obj = load_default(dtype=dtype, compile=compile)
    elif isinstance(teacher, (str, Path)):
        folder = Path(teacher)
        if not (folder / "unet").is_dir():
            raise ValueError(
                f"teacher must be one of {TEACHERS} or a local diffusers folder with unet/ and "
                f"scheduler/, got {str(teacher)!r}"
            )
        if (folder / SHAPES_TEACHER_CONFIG).is_file():
            settings = json.loads((folder / SHAPES_TEACHER_CONFIG).read_text())
            obj = ShapesTeacher.from_pretrained(
                folder,
                class_names=tuple(settings["class_names"]),
                settings=settings,
                dtype=dtype,
                compile=compile,
            )
        else:
            from ...teachers.diffusers_teacher import DiffusersTeacher

            obj = DiffusersTeacher.from_pretrained(folder, dtype=dtype, compile=compile)
        obj.folder = str(folder)
    else:
        if compile:
            raise ValueError(
                "compile applies to the teachers make_scene loads; pass compile= to your "
                "teacher's constructor instead"
            )
        obj = teacher
    obj = obj.to(torch.device(device))
    if isinstance(obj, ShapesTeacher):
        return _shapes_scene(obj, prompt, classifier)
    return _digits_scene(obj, prompt, classifier)
