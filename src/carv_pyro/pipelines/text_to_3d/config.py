"""`TextTo3DConfig`: the settings of a text-to-3D run (``carv-pyro dream``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ... import _checks
from ...objectives import WEIGHTINGS
from ..base.config import PipelineConfig

__all__ = ["COMPILE_MODES", "DTYPES", "TextTo3DConfig", "compile_option"]

#: ``--dtype`` names and the teacher compute dtypes they mean.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


#: ``--compile`` modes (``torch.compile``'s): ``"default"`` is its defaults, the others its
#: ``mode=``; ``"reduce-overhead"`` and ``"max-autotune"`` capture CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_option(mode: str | None) -> bool | dict[str, Any]:
    """A config's ``compile`` mode as a teacher's ``compile=`` (``None``: eager)."""
    if mode is None:
        return False
    _checks.choice("compile", mode, COMPILE_MODES)
    return True if mode == "default" else {"mode": mode}


@dataclass
class TextTo3DConfig(PipelineConfig):
    """Settings of a `dream` run. Angles are in degrees, so the JSON summary reads well.

    Attributes:
        estimator: how the SDS expectation is estimated: a preset name (``"auto"``, the
            compute-aware estimator, by default; ``"baseline"`` is threestudio's one draw per
            view) or an [`Estimator`][carv_pyro.Estimator].
        seed: seeds the field's initial noise, the camera draws and the estimator's draws.
        prompt: the object: a shape class (``"torus"``) for the shapes teacher, a digit for
            the digits teacher.
        teacher: ``"shapes"``, ``"digits"`` or a local teacher folder.
        steps: SVI steps.
        budget_s: stop once this many seconds of training have passed (``None``: steps only).
        R: rendered views per step (the ``views`` plate).
        lr: Adam learning rate on the field's logits.
        guidance_scale: classifier-free guidance scale (``None``: the teacher's recommended).
        weighting: SDS weighting ``w(t)``: ``"sds"``, ``"uniform"`` or ``"fantasia3d"``.
        t_range: ``p(t)`` is uniform over ``int(lo T) .. int(hi T)``.
        resolution: voxels per side of the field.
        azimuth_deg: camera azimuth prior ``Uniform(low, high)``, degrees (``None``: the
            teacher's: the full circle for the shapes teacher).
        elevation_deg: camera elevation prior (``None``: the teacher's training range).
        eval_every: steps between evaluations (the last step is always evaluated).
        eval_every_s: also evaluate every this many seconds of training (``None``: by steps
            only); the race evaluates by time.
        eval_views: held-out azimuths per evaluation elevation, over the full circle.
        eval_elevations_deg: the elevations of the held-out views, degrees.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        dtype: the teacher's compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        compile: compile the teacher's network with ``torch.compile`` (``None``: eager), in one
            of `COMPILE_MODES`: ``"default"`` (its defaults) or a ``mode=`` such as
            ``"reduce-overhead"`` (CUDA graphs: fixed ``R``, ``K`` and ``max_batch`` are
            needed, or each new shape records a graph). It changes speed, not the estimator:
            the gradient is eager's to the compiler's rounding, so a resumed run may change it
            (the one field besides ``steps`` and ``budget_s`` that `resumable_from` allows to
            differ; the result then matches the uninterrupted run to rounding, not bit for bit).

    Raises:
        ValueError: naming the first invalid field.
    """

    estimator: Any = "auto"
    prompt: str = "torus"
    teacher: str = "shapes"
    steps: int = 300
    budget_s: float | None = None
    R: int = 4
    lr: float = 0.3
    guidance_scale: float | None = None
    weighting: str = "sds"
    t_range: tuple[float, float] = (0.02, 0.98)
    resolution: int = 32
    azimuth_deg: tuple[float, float] | None = None
    elevation_deg: tuple[float, float] | None = None
    eval_every: int = 25
    eval_every_s: float | None = None
    eval_views: int = 8
    eval_elevations_deg: tuple[float, ...] = (10.0, 35.0)
    device: str = "cpu"
    dtype: str = "float32"
    compile: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _checks.instance("prompt", self.prompt, str, "a prompt string")
        _checks.instance("teacher", self.teacher, str, "'shapes', 'digits' or a folder path")
        for name in ("steps", "R", "resolution", "eval_every", "eval_views"):
            _checks.positive_int(name, getattr(self, name))
        if self.resolution < 2:
            raise ValueError(f"resolution must be at least 2, got {self.resolution}")
        if self.budget_s is not None:
            _checks.positive_float("budget_s", self.budget_s)
        if self.eval_every_s is not None:
            _checks.positive_float("eval_every_s", self.eval_every_s)
        _checks.positive_float("lr", self.lr)
        if self.guidance_scale is not None:
            _checks.positive_float("guidance_scale", self.guidance_scale)
        _checks.choice("weighting", self.weighting, tuple(WEIGHTINGS))
        self.t_range = _checks.ordered_pair("t_range", self.t_range, 0.0, 1.0)
        if self.t_range[1] >= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi < 1, got {self.t_range!r}")
        if self.azimuth_deg is not None:
            self.azimuth_deg = _checks.ordered_pair("azimuth_deg", self.azimuth_deg, -360, 360)
            if self.azimuth_deg[1] - self.azimuth_deg[0] > 360.0:
                raise ValueError(f"azimuth_deg spans more than 360 degrees: {self.azimuth_deg}")
        if self.elevation_deg is not None:
            self.elevation_deg = _checks.ordered_pair("elevation_deg", self.elevation_deg, -90, 90)
        try:
            self.eval_elevations_deg = tuple(float(e) for e in self.eval_elevations_deg)
        except (TypeError, ValueError):
            raise ValueError(
                f"eval_elevations_deg must be a sequence of angles, got "
                f"{self.eval_elevations_deg!r}"
            ) from None
        if not self.eval_elevations_deg or any(abs(e) > 90 for e in self.eval_elevations_deg):
            raise ValueError(
                f"eval_elevations_deg must be non-empty angles in [-90, 90], got "
                f"{self.eval_elevations_deg}"
            )
        _checks.instance("device", self.device, str, "a device name such as 'cpu' or 'cuda'")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from None
        _checks.choice("dtype", self.dtype, tuple(DTYPES))
        if self.compile is not None:
            _checks.choice("compile", self.compile, COMPILE_MODES)
        if self.estimator.noise == "antithetic" and self.estimator.adapt:
            raise ValueError("the adapting estimator may choose an odd K: no antithetic noise")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The teacher's compute dtype."""
        return DTYPES[self.dtype]

    @property
    def teacher_compile(self) -> bool | dict[str, Any]:
        """`compile` as the teacher's ``compile=``."""
        return compile_option(self.compile)

    def resumable_from(self, saved: TextTo3DConfig) -> None:
        """Raise ``ValueError`` unless this config differs from ``saved`` only in ``steps`` and
        ``budget_s`` (the fields a resumed run may extend) and ``compile`` (speed only)."""
        a, b = saved.to_dict(), self.to_dict()
        diffs = [
            f"{k}: checkpoint {a[k]!r}, now {b[k]!r}"
            for k in a
            if k not in ("steps", "budget_s", "compile") and a[k] != b.get(k)
        ]
        if diffs:
            raise ValueError(
                "cannot resume: the run's settings differ from the checkpoint's (only steps, "
                "budget_s and compile may change):\n  " + "\n  ".join(diffs)
            )

    def replace(self, **changes: Any) -> TextTo3DConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
