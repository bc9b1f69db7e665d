"""The embedded shapes teacher: a camera- and class-conditioned 32x32 DDPM of shaded 3D shapes.

A teacher that knows 3D, for text-to-3D by score distillation: it was trained on renders of the
procedural shapes of [`carv_pyro.pipelines.shapes`][carv_pyro.pipelines.shapes] from random orbit
cameras, made by [`render`][carv_pyro.pipelines.render.render] itself (Lambertian shading,
anti-aliased) from `VoxelField` density grids, so a voxel field rendered with the teacher's
`ShapesTeacher.render_kwargs` can reach exactly the teacher's data, and a carved object is
judged against its true shape by 3D IoU.

Conditioning, as MVDream and Zero-1-to-3 condition on the camera: one vector per draw,

    ``[one_hot(class) over C classes + 1 null slot, sin(azimuth), cos(azimuth),
    sin(elevation), cos(elevation)]``   (``D = C + 5``),

projected by the UNet's class embedding (``UNet2DConditionModel`` with
``class_embed_type="projection"``) and added to the timestep embedding. Classifier-free
guidance drops the CLASS to the null slot and keeps the camera: the unconditional branch is
"some shape seen from this camera" (`null_class_cond`).

The folder ``carv_pyro/teachers/shapes_teacher/`` (`SHAPES_TEACHER_DIR`) holds ``unet/``,
``scheduler/``, ``classifier.safetensors`` (a
[`ShapeClassifier`][carv_pyro.pipelines.shape_classifier.ShapeClassifier]), ``shapes_teacher.json``
(class names, render settings, camera ranges) and ``manifest.json`` (sha256 of every file, the
training command and the measured quality), all written by ``scripts/train_shapes_teacher.py``.

Examples:
    >>> teacher = load_shapes()
    >>> azimuth = torch.rand(4, 1) * 6.28  # a plate of 4 views at dim -2
    >>> cond = encode_cond("torus", azimuth, torch.zeros(4, 1))
    >>> cond.shape  # broadcasts against draws of batch shape (4, K)
    torch.Size([4, 1, 17])
    >>> x_t = torch.randn(4, 1, 32, 32)
    >>> eps = teacher.predict_eps(x_t, torch.tensor([10, 200, 500, 900]), cond[:, 0],
    ...                           guidance_scale=SHAPES_GUIDANCE_SCALE)
    >>> eps.shape
    torch.Size([4, 1, 32, 32])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..pipelines.shapes import SHAPE_CLASSES
from .diffusers_teacher import DiffusersTeacher
from .manifest import verify_teacher_files

__all__ = [
    "SHAPES_GUIDANCE_SCALE",
    "SHAPES_SDS_GUIDANCE_SCALE",
    "SHAPES_TEACHER_CONFIG",
    "SHAPES_TEACHER_DIR",
    "ShapesTeacher",
    "cond_dim",
    "encode_cond",
    "label_cond",
    "load_shapes",
    "null_class_cond",
    "parse_shape_prompt",
]

SHAPES_TEACHER_DIR: Path = Path(__file__).resolve().parent / "shapes_teacher"
"""Folder of the shipped shapes teacher (``unet/``, ``scheduler/``, classifier, manifest)."""

SHAPES_TEACHER_CONFIG = "shapes_teacher.json"
"""The teacher's own settings inside its folder: class names, render settings, camera ranges."""

SHAPES_GUIDANCE_SCALE = 2.0
"""The classifier-free guidance scale at which the shapes teacher's DDIM samples are measured
(``manifest.json``, ``quality.samples``; its ``sweep`` has 1.0, 3.0 and 5.0). For the shipped
(H200-trained) weights, 50-step DDIM without clipping: the classifier reads 100% of the samples
at every scale from 1 to 5, and their silhouettes match the true render from their own camera
with IoU 0.96 (0.82 against a render from another camera of the same class). Sample without
``clip_sample``: clipping ``x0`` at the first step (``t = 999``, ``alpha = 0.006``) saturates
the guided estimate and collapsed guided samples into other classes."""

SHAPES_SDS_GUIDANCE_SCALE = 2.0
"""Guidance scale for score distillation with the shapes teacher: smaller than DreamFusion's.
Measured on a 2-core CPU (a 32^3 `VoxelField`, the teacher's render settings, cameras over the
full circle, R = 4 views, K = 8 draws, weighted and stratified timesteps, Adam lr 0.3, 250
steps): 3D IoU with the true shape 0.75 (mug), 0.83 (L-block), 0.89 (torus) at 2.0, against
0.54, 0.76, 0.82 at 7.5; the best centred z-symmetric ellipsoid (a "blob") reaches 0.28, 0.41,
0.63."""

_SCRIPT = "scripts/train_shapes_teacher.py"
_CAMERA_SLOTS = 4  # sin az, cos az, sin el, cos el


def cond_dim(num_classes: int = len(SHAPE_CLASSES)) -> int:
    """``D``, the length of a conditioning vector for ``num_classes`` classes (``C + 5``)."""
    return int(num_classes) + 1 + _CAMERA_SLOTS


def parse_shape_prompt(
    prompt: str | int | None, class_names: Sequence[str] = SHAPE_CLASSES
) -> int | None:
    """The class label of a prompt.

    Args:
        prompt: a class name (``"torus"``, ``" Torus "``, ``"a torus"``, ``"an octahedron"``),
            a label ``0 .. C - 1``, or ``None`` (the null class, returned as ``None``).
        class_names: the classes, in label order.

    Returns:
        The label, or ``None`` for the null class.

    Raises:
        ValueError: naming the prompt and the known classes.
    """
    if prompt is None:
        return None
    names = tuple(class_names)
    if isinstance(prompt, bool):
        raise ValueError(f"prompt must be a shape name or label, got {prompt!r}")
    if isinstance(prompt, int):
        if not 0 <= prompt < len(names):
            raise ValueError(f"shape label must lie in [0, {len(names) - 1}], got {prompt}")
        return prompt
    if isinstance(prompt, str):
        words = prompt.strip().lower().split()
        if len(words) == 2 and words[0] in ("a", "an", "the"):
            words = words[1:]
        if len(words) == 1 and words[0] in names:
            return names.index(words[0])
    raise ValueError(f"unknown shape prompt {prompt!r}; expected one of {names}")


def encode_cond(
    prompt: str | int | None,
    azimuth: Tensor | float,
    elevation: Tensor | float,
    *,
    class_names: Sequence[str] = SHAPE_CLASSES,
) -> Tensor:
    """The conditioning vectors of a prompt seen from cameras.

    Args:
        prompt: a class name or label (see `parse_shape_prompt`); ``None`` for the null class
            (the unconditional branch of guidance).
        azimuth: camera azimuths in radians, any batch shape ``B...`` (e.g. ``(R, 1)`` from a
            plate at ``dim=-2``), or a number.
        elevation: camera elevations in radians, broadcastable against ``azimuth``.
        class_names: the classes, in label order (default: the shipped teacher's).

    Returns:
        ``(*B, D)`` float vectors ``[one-hot class + null slot, sin az, cos az, sin el,
        cos el]``, in the cameras' dtype (float32 for numbers) and on their device. For
        ``(R, 1)`` cameras the result ``(R, 1, D)`` broadcasts against draws of batch shape
        ``(R, K)``.

    Raises:
        ValueError: on an unknown prompt or camera shapes that do not broadcast.
    """
    label = parse_shape_prompt(prompt, class_names)
    n_classes = len(class_names)
    azimuth = torch.as_tensor(azimuth)
    labels = torch.full((), n_classes if label is None else label, device=azimuth.device)
    return label_cond(labels, azimuth, elevation, n_classes)


def label_cond(
    labels: Tensor,
    azimuth: Tensor | float,
    elevation: Tensor | float,
    num_classes: int = len(SHAPE_CLASSES),
) -> Tensor:
    """Conditioning vectors from integer labels (batched `encode_cond`, as training uses it).

    Args:
        labels: integer class labels ``0 .. C - 1``, or ``C`` for the null class; any shape
            broadcastable against the cameras.
        azimuth: radians.
        elevation: radians.
        num_classes: ``C``.

    Returns:
        ``(*B, D)`` vectors, ``B`` the broadcast shape of labels and cameras, in the cameras'
        floating dtype (default dtype for numbers) on the cameras' device.

    Raises:
        ValueError: on labels outside ``[0, C]`` or shapes that do not broadcast.
    """
    azimuth, elevation = torch.as_tensor(azimuth), torch.as_tensor(elevation)
    labels = torch.as_tensor(labels, device=azimuth.device)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() and labels.device.type == "cpu":
        if int(labels.min()) < 0 or int(labels.max()) > num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}] ({num_classes}: null)")
    dtype = torch.promote_types(azimuth.dtype, elevation.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    try:
        shape = torch.broadcast_shapes(labels.shape, azimuth.shape, elevation.shape)
    except RuntimeError:
        raise ValueError(
            f"labels, azimuth and elevation shapes must broadcast, got {tuple(labels.shape)}, "
            f"{tuple(azimuth.shape)} and {tuple(elevation.shape)}"
        ) from None
    device = azimuth.device
    azimuth = azimuth.to(dtype).expand(shape)
    elevation = elevation.to(dtype=dtype, device=device).expand(shape)
    one_hot = torch.nn.functional.one_hot(labels.long().expand(shape), num_classes + 1)
    camera = torch.stack([azimuth.sin(), azimuth.cos(), elevation.sin(), elevation.cos()], -1)
    return torch.cat([one_hot.to(dtype), camera], dim=-1)


def null_class_cond(cond: Tensor, num_classes: int = len(SHAPE_CLASSES)) -> Tensor:
    """The same cameras with the class dropped to the null slot (guidance's unconditional branch).

    Args:
        cond: ``(..., D)`` conditioning vectors (`encode_cond`).
        num_classes: ``C``.

    Returns:
        ``(..., D)``: the class part replaced by the null one-hot, the camera part kept.
    """
    if cond.shape[-1] != cond_dim(num_classes):
        raise ValueError(
            f"cond must end in D = {cond_dim(num_classes)} for {num_classes} classes, got "
            f"{tuple(cond.shape)}"
        )
    # built by a kernel (an item assignment would copy a host scalar: a sync on a GPU)
    null = (torch.arange(num_classes + 1, device=cond.device) == num_classes).to(cond.dtype)
    return torch.cat([null.expand(*cond.shape[:-1], num_classes + 1), cond[..., -4:]], dim=-1)


class ShapesTeacher(DiffusersTeacher):
    """The camera-conditioned shapes teacher: a `DiffusersTeacher` whose guidance keeps the camera.

    ``cond`` is the ``(N, D)`` vector of `encode_cond` (``cond_event_shape == (D,)``). With
    ``guidance_scale = s != 1``, ``eps = eps(x, null) + s (eps(x, cond) - eps(x, null))`` where
    ``null = null_class_cond(cond)`` has the same camera, both branches evaluated in one batched
    call of ``2N`` rows (chunked by ``max_batch``). Everything else (validation, gradient mode,
    dtype, caching) is `DiffusersTeacher`'s.

    Args:
        unet: the ``UNet2DConditionModel`` (``class_embed_type="projection"``).
        scheduler: its scheduler.
        class_names: the classes in label order (``D = len(class_names) + 5``).
        settings: the folder's ``shapes_teacher.json`` (render settings, camera ranges), or
            ``None``.
        **kwargs: `DiffusersTeacher` options (``dtype``, ``max_batch``, ``compile``).

    Attributes:
        class_names: the classes in label order.
        settings: the training settings of ``shapes_teacher.json`` (``render``, ``field``,
            ``cameras``).

    Raises:
        ValueError: if the UNet's conditioning width is not ``len(class_names) + 5``.
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        *,
        class_names: Sequence[str] = SHAPE_CLASSES,
        settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(unet, scheduler, **kwargs)
        self.class_names = tuple(class_names)
        if self._cond_kind != "class_vector" or tuple(self.cond_event_shape) != (
            cond_dim(len(self.class_names)),
        ):
            raise ValueError(
                f"the shapes teacher needs a UNet conditioned on a vector of "
                f"D = {cond_dim(len(self.class_names))} (class_embed_type='projection'), got "
                f"cond_event_shape {self.cond_event_shape}"
            )
        self.settings: dict[str, Any] = dict(settings or {})

    # ------------------------------------------------------------------ conditioning

    def cond(self, prompt: str | int | None, azimuth: Tensor | float, elevation: Tensor | float):
        """`encode_cond` with this teacher's classes: ``(*B, D)`` vectors."""
        return encode_cond(prompt, azimuth, elevation, class_names=self.class_names)

    def encode_cond(self, cond: Any) -> Tensor | None:
        """A tensor passes through; a tuple ``(prompt, azimuth, elevation)`` is encoded.

        Args:
            cond: ``(..., D)`` vectors, a ``(prompt, azimuth, elevation)`` tuple, or ``None``.

        Returns:
            ``(..., D)`` vectors, or ``None``.
        """
        if cond is None or isinstance(cond, Tensor):
            return cond
        if isinstance(cond, tuple) and len(cond) == 3:
            return self.cond(*cond)
        raise ValueError(
            "cond must be a (..., D) tensor from encode_cond or a (prompt, azimuth, elevation) "
            f"tuple, got {type(cond).__name__}"
        )

    def null_cond(self, n: int) -> Tensor:
        """``(n, D)`` null-class vectors at azimuth 0, elevation 0.

        A representative unconditional input (for timing or ``cond=None``). Guidance does not
        use it: it keeps each draw's own camera (`null_class_cond`).
        """
        return encode_cond(None, torch.zeros(n), torch.zeros(n), class_names=self.class_names)

    def predict_eps(
        self,
        x_t: Tensor,
        t: Tensor | int,
        cond: Tensor | Any | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Predict the noise in ``x_t``; guidance drops the class and keeps the camera.

        Args:
            x_t: ``(N, 1, 32, 32)`` noisy samples.
            t: ``(N,)`` integer timesteps (or one for all rows).
            cond: ``(N, D)`` or ``(D,)`` vectors (`encode_cond`), a ``(prompt, azimuth,
                elevation)`` tuple, or ``None`` (the null class seen from `null_cond`'s camera).
            guidance_scale: classifier-free guidance scale (1: the conditional prediction).

        Returns:
            ``(N, 1, 32, 32)`` predicted noise, in ``x_t``'s dtype.
        """
        s = self._validate_guidance(guidance_scale, cond)
        if s == 1.0:
            return super().predict_eps(x_t, t, cond, guidance_scale=1.0)
        x_t, t, cond = self._validate(x_t, t, cond)
        if cond is None:  # encode_cond gave None
            raise ValueError(f"guidance_scale={guidance_scale} needs conditioning, got None")
        null = null_class_cond(cond, len(self.class_names))
        eps = super().predict_eps(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, cond]), guidance_scale=1.0
        )
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + s * (eps_cond - eps_uncond)

    # ------------------------------------------------------------------ rendering

    def render_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of [`render`][carv_pyro.pipelines.render.render] that reproduce the
        teacher's training renders (``image_size``, ``n_samples``, ``shading``, ``lighting``,
        ``supersample``, ...).

        Raises:
            ValueError: if the teacher has no recorded render settings.
        """
        from ..pipelines.render import Lighting

        render = dict(self.settings.get("render") or {})
        if not render:
            raise ValueError("this shapes teacher has no recorded render settings")
        if "lighting" in render:
            render["lighting"] = Lighting(**render["lighting"])
        return render

    @property
    def elevation_range(self) -> tuple[float, float]:
        """The training cameras' elevation range in radians."""
        lo, hi = self.settings["cameras"]["elevation_deg"]
        return math.radians(lo), math.radians(hi)


def load_shapes(
    *,
    dtype: torch.dtype | None = None,
    max_batch: int | None = None,
    verify: bool = True,
    compile: bool | dict[str, Any] = False,
) -> ShapesTeacher:
    """Load the embedded shapes teacher (offline, frozen).

    Args:
        dtype: compute dtype (``None``: the input's dtype).
        max_batch: evaluate at most this many rows per network call (``None``: one call).
        verify: check every file against ``manifest.json`` first (cached per process).
        compile: compile the UNet's forward with `torch.compile`: ``True`` or a dict of its
            keyword arguments (see `DiffusersTeacher`).

    Returns:
        A `ShapesTeacher` with ``event_shape == (1, 32, 32)`` and ``cond_event_shape == (D,)``.

    Raises:
        FileNotFoundError: if the shipped folder or its manifest is missing.
        carv_pyro.teachers.manifest.TeacherFilesError: if a shipped file is missing, modified
            or invalid (the message names it).
    """
    root = SHAPES_TEACHER_DIR
    if not (root / "unet").is_dir():
        raise FileNotFoundError(
            f"the shapes teacher's weights are missing from {root}; run {_SCRIPT} to create them"
        )
    if verify:
        verify_teacher_files(root, script=_SCRIPT, what="shapes teacher")
    settings = json.loads((root / SHAPES_TEACHER_CONFIG).read_text())
    return ShapesTeacher.from_pretrained(
        root,
        class_names=tuple(settings["class_names"]),
        settings=settings,
        dtype=dtype,
        max_batch=max_batch,
        compile=compile,
    )
