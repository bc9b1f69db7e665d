"""Text-to-3D by score distillation: carve a digit into a voxel field with a frozen teacher.

The DreamFusion recipe at the size of a CPU: a [`VoxelField`][carv_pyro.pipelines.render.VoxelField]
is rendered from random orbit cameras (the expensive upstream step ``x = g(theta, xi)``), and the
embedded digits teacher scores every render through SDS. Written as a plain Pyro model, the
camera is a latent site drawn from its prior in the ``views`` plate and the teacher's
``(t, eps)`` draws fill the inner ``noise`` plate:

```python
field = VoxelField(16, seed=0)
objective = carv_pyro.SDS(load_default(), guidance_scale=10.0)
model = make_model(field, objective, label=3, R=4, K=8)
guide = carv_pyro.TimestepGuide(model, proposal="weighted", stratify="per_outer")
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=carv_pyro.CARVLoss())
for _ in range(200):
    svi.step()
```

`dream` wraps that loop with progress, evaluation by the digit classifier on fixed
held-out views (`quality`), pictures, a JSON summary and exact checkpoint/resume.
`estimator_preset` names the estimators compared in the paper: ``"baseline"`` (one
``t ~ p(t)`` per view, threestudio's default), ``"reuse"`` (``K`` prior draws per view) and
``"carv"`` (``K`` draws per view, importance-sampled and stratified).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from torch import Tensor, nn

from ..data import DIGIT_NAMES, parse_prompt
from ..guides import NOISE, PROPOSALS, STRATIFY, TimestepGuide
from ..infer.loss import CARVLoss
from ..objectives import SDS, WEIGHTINGS, TeacherObjective
from ..infer.primitives import teacher_term
from .render import VoxelField, render, save_turntable_png

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_AZIMUTH_DEG",
    "DEFAULT_ELEVATION_DEG",
    "ESTIMATORS",
    "EstimatorPreset",
    "Quality",
    "TextTo3DConfig",
    "check_resumable",
    "dream",
    "estimator_name",
    "estimator_preset",
    "eval_cameras",
    "load_checkpoint_config",
    "make_model",
    "quality",
]

CHECKPOINT_FILE = "checkpoint.pt"
"""Name of the checkpoint `dream` writes into its output folder."""

_CHECKPOINT_VERSION = 1

DEFAULT_AZIMUTH_DEG = (-45.0, 45.0)
"""Default camera azimuth arc in degrees: frontal (see `TextTo3DConfig`)."""

DEFAULT_ELEVATION_DEG = (-10.0, 30.0)
"""Default camera elevation range in degrees."""


# ------------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class EstimatorPreset:
    """A named gradient estimator: the inner plate size ``K`` and the timestep guide's options.

    Attributes:
        name: the preset's name.
        K: inner ``(t, eps)`` draws per rendered view.
        proposal: [`TimestepGuide`][carv_pyro.TimestepGuide] ``proposal``.
        stratify: [`TimestepGuide`][carv_pyro.TimestepGuide] ``stratify``.
        noise: [`TimestepGuide`][carv_pyro.TimestepGuide] ``noise``.
        description: one line for reports.
    """

    name: str
    K: int
    proposal: str
    stratify: str | None
    noise: str
    description: str

    def settings(self) -> dict[str, Any]:
        """The fields of `TextTo3DConfig` this preset sets (``K``, ``proposal``, ...)."""
        return {
            "K": self.K,
            "proposal": self.proposal,
            "stratify": self.stratify,
            "noise": self.noise,
        }

    def make_guide(
        self, model: Callable, generator: torch.Generator | None = None
    ) -> TimestepGuide:
        """The [`TimestepGuide`][carv_pyro.TimestepGuide] of this preset for ``model``."""
        return TimestepGuide(
            model,
            proposal=self.proposal,
            stratify=self.stratify,
            noise=self.noise,
            generator=generator,
        )


ESTIMATORS: dict[str, EstimatorPreset] = {
    "baseline": EstimatorPreset(
        "baseline",
        K=1,
        proposal="prior",
        stratify=None,
        noise="iid",
        description="one t ~ p(t) per view, no importance sampling (threestudio's default)",
    ),
    "reuse": EstimatorPreset(
        "reuse",
        K=8,
        proposal="prior",
        stratify=None,
        noise="iid",
        description="K i.i.d. prior draws per rendered view (amortization only)",
    ),
    "carv": EstimatorPreset(
        "carv",
        K=8,
        proposal="weighted",
        stratify="per_outer",
        noise="iid",
        description="K draws per view, t importance-sampled from p w alpha and stratified",
    ),
}
"""The named estimators; see `estimator_preset`."""


def estimator_preset(name: str) -> EstimatorPreset:
    """Look up a named estimator.

    Args:
        name: ``"baseline"`` (``K = 1``, ``t`` from the uniform prior, no stratification:
            threestudio's default), ``"reuse"`` (``K = 8`` prior draws per view) or ``"carv"``
            (``K = 8``, weighted proposal ``q(t) ∝ p(t) w(t) alpha_t``, stratified per view).

    Returns:
        The `EstimatorPreset`.

    Raises:
        ValueError: naming the unknown estimator and the known ones.
    """
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}"
        ) from None


def estimator_name(config: TextTo3DConfig) -> str:
    """The name of the preset whose settings ``config`` uses, or ``"custom"``."""
    ours = dict(K=config.K, proposal=config.proposal, stratify=config.stratify, noise=config.noise)
    for name, preset in ESTIMATORS.items():
        if preset.settings() == ours:
            return name
    return "custom"


# ----------------------------------------------------------------------------------- config


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _range(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not lo <= a < b <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= low < high <= {hi}, got {value!r}")
    return a, b


@dataclass
class TextTo3DConfig:
    """Settings of a `dream` run. Angles are in degrees, so the JSON summary reads well.

    Attributes:
        prompt: a digit ``"0"``..``"9"`` or its English name (``"three"``).
        steps: SVI steps.
        R: rendered views per step (the ``views`` plate).
        K: teacher ``(t, eps)`` draws per view (the ``noise`` plate).
        proposal: timestep proposal of the [`TimestepGuide`][carv_pyro.TimestepGuide].
        stratify: ``None``, ``"per_outer"`` or ``"global"``.
        noise: ``"iid"``, ``"antithetic"`` (needs an even ``K``) or ``"sobol"``.
        lr: Adam learning rate on the field's logits.
        guidance_scale: classifier-free guidance scale of the teacher.
        weighting: SDS weighting ``w(t)``: ``"sds"``, ``"uniform"`` or ``"fantasia3d"``.
        t_range: ``p(t)`` is uniform over ``int(lo T) .. int(hi T)``.
        resolution: voxels per side of the field.
        image_size: rendered pixels per side (the teacher's 16).
        n_samples: samples per ray.
        azimuth_deg: camera azimuth prior ``Uniform(low, high)``, degrees. The default is a
            frontal arc: the digits teacher has no notion of a digit's back or side, so over a
            full circle SDS settles on a rotationally symmetric blob that the classifier may
            accept from every side but no person reads as the digit; over a frontal arc it
            carves a digit in relief, seen mirrored from behind (see ``turntable.png``).
        elevation_deg: camera elevation prior ``Uniform(low, high)``, degrees.
        eval_every: steps between evaluations (the last step is always evaluated).
        eval_views: held-out azimuths per evaluation elevation, evenly spaced over
            ``azimuth_deg``.
        eval_elevations_deg: the elevations of the held-out views, degrees.
        seed: seeds the field's initial noise, the camera draws and the guide's draws.

    Raises:
        ValueError: naming the first invalid field.
    """

    prompt: str = "3"
    steps: int = 200
    R: int = 4
    K: int = 8
    proposal: str = "weighted"
    stratify: str | None = "per_outer"
    noise: str = "iid"
    lr: float = 0.1
    guidance_scale: float = 10.0
    weighting: str = "sds"
    t_range: tuple[float, float] = (0.02, 0.98)
    resolution: int = 16
    image_size: int = 16
    n_samples: int = 24
    azimuth_deg: tuple[float, float] = DEFAULT_AZIMUTH_DEG
    elevation_deg: tuple[float, float] = DEFAULT_ELEVATION_DEG
    eval_every: int = 25
    eval_views: int = 8
    eval_elevations_deg: tuple[float, ...] = (0.0, 20.0)
    seed: int = 0

    def __post_init__(self) -> None:
        self.prompt = str(self.prompt)
        parse_prompt(self.prompt)
        for name in ("steps", "R", "K", "resolution", "image_size", "n_samples"):
            _positive_int(name, getattr(self, name))
        for name in ("eval_every", "eval_views"):
            _positive_int(name, getattr(self, name))
        _positive_float("lr", self.lr)
        _positive_float("guidance_scale", self.guidance_scale)
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {self.proposal!r}")
        if self.stratify not in STRATIFY:
            raise ValueError(f"stratify must be one of {STRATIFY}, got {self.stratify!r}")
        if self.noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {self.noise!r}")
        if self.noise == "antithetic" and self.K % 2:
            raise ValueError(f"noise='antithetic' needs an even K, got K={self.K}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"weighting must be one of {sorted(WEIGHTINGS)}, got {self.weighting!r}"
            )
        self.t_range = _range("t_range", self.t_range, 0.0, 1.0)
        self.azimuth_deg = _range("azimuth_deg", self.azimuth_deg, -360.0, 360.0)
        if self.azimuth_deg[1] - self.azimuth_deg[0] > 360.0:
            raise ValueError(f"azimuth_deg spans more than 360 degrees: {self.azimuth_deg}")
        self.elevation_deg = _range("elevation_deg", self.elevation_deg, -90.0, 90.0)
        try:
            self.eval_elevations_deg = tuple(float(e) for e in self.eval_elevations_deg)
        except (TypeError, ValueError):
            raise ValueError(
                f"eval_elevations_deg must be a sequence of angles, got {self.eval_elevations_deg!r}"
            ) from None
        if not self.eval_elevations_deg or any(abs(e) > 90 for e in self.eval_elevations_deg):
            raise ValueError(
                f"eval_elevations_deg must be non-empty, in [-90, 90], got {self.eval_elevations_deg}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def label(self) -> int:
        """The class label of `prompt`."""
        return parse_prompt(self.prompt)

    @classmethod
    def from_estimator(cls, estimator: str, prompt: str = "3", **overrides: Any) -> TextTo3DConfig:
        """A config with a named estimator's settings (see `estimator_preset`).

        Args:
            estimator: ``"baseline"``, ``"reuse"`` or ``"carv"``.
            prompt: the digit prompt.
            **overrides: any other field; these win over the preset (e.g. ``K=4``).
        """
        settings = estimator_preset(estimator).settings()
        settings.update(overrides)
        return cls(prompt=prompt, **settings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextTo3DConfig:
        """Inverse of `to_dict`.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TextTo3DConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ------------------------------------------------------------------------------------ model


class _SeededUniform(dist.Uniform):
    """``Uniform(low, high)`` whose draws come from a ``torch.Generator`` (reparameterized).

    A model site with this distribution is an ordinary latent site drawn from its prior (a user
    guide may propose it instead); the generator only makes the prior draws reproducible
    without touching the global RNG.
    """

    def __init__(self, low, high, generator: torch.Generator | None = None, validate_args=None):
        self.generator = generator
        super().__init__(low, high, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_SeededUniform, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, generator=self.generator, dtype=self.low.dtype)
        return self.low + u.to(self.low.device) * (self.high - self.low)


def _field_like(field: nn.Module) -> dict[str, Any]:
    p = next(field.parameters())
    return {"dtype": p.dtype, "device": p.device}


def make_model(
    field: nn.Module,
    objective: TeacherObjective,
    label: int | Tensor | None,
    R: int,
    K: int,
    generator: torch.Generator | None = None,
    *,
    image_size: int = 16,
    n_samples: int = 24,
    azimuth_deg: tuple[float, float] = DEFAULT_AZIMUTH_DEG,
    elevation_deg: tuple[float, float] = DEFAULT_ELEVATION_DEG,
    name: str = "sds",
) -> Callable[..., None]:
    """The text-to-3D SDS objective as a plain Pyro model.

    The model registers ``field`` with ``pyro.module("field", field)`` (so ``SVI`` optimizes its
    parameters), draws ``R`` cameras in the ``views`` plate (``dim=-2``) as the latent sites
    ``"azimuth"`` and ``"elevation"`` (radians, ``(R, 1)``) from their uniform priors, renders
    them to ``(R, 1, C, H, W)`` images, and records the teacher term ``name`` with ``K`` draws
    per view in the ``noise`` plate (``dim=-1``): ``R * K`` draws in one teacher call.

    Args:
        field: a [`VoxelField`][carv_pyro.pipelines.render.VoxelField] (or any radiance field module).
        objective: the teacher objective, e.g. [`SDS`][carv_pyro.SDS]; its event shape must
            be ``(C, image_size, image_size)``.
        label: the teacher's conditioning (a class label for the digits teacher), or ``None``.
        R: default number of views per call.
        K: default number of inner draws per view.
        generator: source of the camera prior draws (global RNG if ``None``).
        image_size: pixels per side.
        n_samples: samples per ray.
        azimuth_deg: the azimuth prior's ``(low, high)`` in degrees.
        elevation_deg: the elevation prior's ``(low, high)`` in degrees.
        name: the teacher term's site name.

    Returns:
        ``model(R=R, K=K)``: the plate sizes may be changed per call (e.g. by an accountant
        that adapts ``K``).
    """
    _positive_int("R", R)
    _positive_int("K", K)
    like = _field_like(field)
    az_lo, az_hi = (torch.tensor(math.radians(a), **like) for a in azimuth_deg)
    el_lo, el_hi = (torch.tensor(math.radians(e), **like) for e in elevation_deg)
    cond = None if label is None else torch.as_tensor(label, device=like["device"])
    default_R, default_K = R, K

    def model(R: int = default_R, K: int = default_K) -> None:
        pyro.module("field", field)
        with pyro.plate("views", R, dim=-2):
            azimuth = pyro.sample("azimuth", _SeededUniform(az_lo, az_hi, generator))
            elevation = pyro.sample("elevation", _SeededUniform(el_lo, el_hi, generator))
            image = render(field, azimuth, elevation, image_size=image_size, n_samples=n_samples)
            with pyro.plate("noise", K, dim=-1):
                teacher_term(name, objective, image, cond=cond)  # image: (R, 1, C, H, W)

    return model


# ---------------------------------------------------------------------------------- quality


class Quality(NamedTuple):
    """How well a field reads as its prompt from held-out views.

    Attributes:
        accuracy: fraction of views the classifier assigns to the prompt's digit.
        mean_prob: mean classifier probability of the prompt's digit over the views.
        n_views: number of views.
    """

    accuracy: float
    mean_prob: float
    n_views: int


def eval_cameras(
    n_views: int = 8,
    elevations_deg: Sequence[float] = (0.0, 20.0),
    azimuth_deg: tuple[float, float] = DEFAULT_AZIMUTH_DEG,
) -> tuple[Tensor, Tensor]:
    """The fixed held-out cameras: ``n_views`` evenly spaced azimuths at each elevation.

    Azimuths are the midpoints of ``n_views`` equal arcs of ``azimuth_deg`` (so a full circle
    does not count its seam twice).

    Returns:
        ``(azimuth, elevation)`` in radians, each ``(len(elevations_deg) * n_views,)`` float64.
    """
    _positive_int("n_views", n_views)
    lo, hi = azimuth_deg
    az = lo + (torch.arange(n_views, dtype=torch.float64) + 0.5) * (hi - lo) / n_views
    el = torch.tensor([float(e) for e in elevations_deg], dtype=torch.float64)
    azimuth = az.repeat(el.numel())
    elevation = el.repeat_interleave(n_views)
    return torch.deg2rad(azimuth), torch.deg2rad(elevation)


@torch.no_grad()
def quality(
    field: nn.Module,
    label: int,
    classifier: nn.Module,
    n_views: int = 8,
    *,
    elevations_deg: Sequence[float] = (0.0, 20.0),
    azimuth_deg: tuple[float, float] = DEFAULT_AZIMUTH_DEG,
    image_size: int = 16,
    n_samples: int = 24,
) -> Quality:
    """Classify renders of ``field`` from fixed held-out views (see `eval_cameras`).

    The views are deterministic, so no seed is needed and a quality curve is comparable across
    runs and estimators.

    Args:
        field: the field to judge.
        label: the prompt's digit.
        classifier: ``(N, C, H, W)`` images in ``[-1, 1]`` -> ``(N, 10)`` logits (e.g.
            [`carv_pyro.classifier.load_classifier`][carv_pyro.classifier.load_classifier]), in eval mode.
        n_views: azimuths per elevation.
        elevations_deg: elevations of the views, degrees.
        azimuth_deg: the azimuth arc the views cover, degrees.
        image_size: rendered pixels per side.
        n_samples: samples per ray.

    Returns:
        A `Quality`.
    """
    azimuth, elevation = eval_cameras(n_views, elevations_deg, azimuth_deg)
    like = _field_like(field)
    images = render(
        field,
        azimuth.to(**like),
        elevation.to(**like),
        image_size=image_size,
        n_samples=n_samples,
    )  # (V, C, H, W)
    p = next(classifier.parameters(), None)
    if p is not None:
        images = images.to(dtype=p.dtype, device=p.device)
    probs = torch.softmax(classifier(images).double(), dim=-1)  # (V, 10)
    hit = probs.argmax(-1) == int(label)
    return Quality(
        accuracy=float(hit.double().mean()),
        mean_prob=float(probs[:, int(label)].mean()),
        n_views=int(images.shape[0]),
    )


# ------------------------------------------------------------------------------------ dream


@dataclass
class _Run:
    """Everything `dream` builds; its state is what the checkpoint holds."""

    config: TextTo3DConfig
    field: VoxelField
    model: Callable
    guide: TimestepGuide
    svi: SVI
    camera_generator: torch.Generator
    guide_generator: torch.Generator
    step: int = 0
    wall_s: float = 0.0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pending_losses: list[float] = dataclasses.field(default_factory=list)


def _build(config: TextTo3DConfig, teacher: Any) -> _Run:
    """Fresh field, model, guide and SVI, seeded from ``config.seed`` (clears the param store)."""
    objective = SDS(
        teacher,
        weighting=config.weighting,
        t_range=config.t_range,
        guidance_scale=config.guidance_scale,
    )
    channels, height, width = (int(s) for s in objective.event_shape)
    if height != config.image_size or width != config.image_size:
        raise ValueError(
            f"the teacher takes {height}x{width} images but image_size={config.image_size}"
        )
    # Three independent seeded streams: the field's initial noise, the cameras, the guide.
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    field = VoxelField(config.resolution, channels, seed=config.seed)
    camera_generator = torch.Generator().manual_seed(config.seed + 1)
    guide_generator = torch.Generator().manual_seed(config.seed + 2)
    model = make_model(
        field,
        objective,
        config.label,
        config.R,
        config.K,
        camera_generator,
        image_size=config.image_size,
        n_samples=config.n_samples,
        azimuth_deg=config.azimuth_deg,
        elevation_deg=config.elevation_deg,
    )
    guide = TimestepGuide(
        model,
        proposal=config.proposal,
        stratify=config.stratify,
        noise=config.noise,
        generator=guide_generator,
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": config.lr}), loss=CARVLoss())
    return _Run(config, field, model, guide, svi, camera_generator, guide_generator)


def _save_checkpoint(run: _Run, path: Path) -> None:
    state = {
        "version": _CHECKPOINT_VERSION,
        "config": run.config.to_dict(),
        "step": run.step,
        "wall_s": run.wall_s,
        "history": run.history,
        "pending_losses": run.pending_losses,
        "param_store": pyro.get_param_store().get_state(),
        "optimizer": run.svi.optim.get_state(),
        "rng": {
            "pyro": pyro.util.get_rng_state(),
            "cameras": run.camera_generator.get_state(),
            "guide": run.guide_generator.get_state(),
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    # The checkpoint holds Pyro's param store (with constraint objects) and Python / NumPy RNG
    # states, which are pickled: only load checkpoints you wrote yourself.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a carv-pyro text-to-3D checkpoint (version 1)")
    return state


def load_checkpoint_config(out_dir: str | os.PathLike[str]) -> TextTo3DConfig | None:
    """The config stored in ``out_dir``'s checkpoint, or ``None`` if there is no checkpoint."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return TextTo3DConfig.from_dict(_read_checkpoint(path)["config"])


def check_resumable(saved: TextTo3DConfig, config: TextTo3DConfig) -> None:
    """Raise ``ValueError`` if ``config`` differs from ``saved`` in anything but ``steps``."""
    a, b = saved.to_dict(), config.to_dict()
    diffs = [f"{k}: checkpoint {a[k]!r}, now {b[k]!r}" for k in a if k != "steps" and a[k] != b[k]]
    if diffs:
        raise ValueError(
            "cannot resume: the run's settings differ from the checkpoint's (only steps may "
            "change):\n  " + "\n  ".join(diffs)
        )


def _restore(run: _Run, state: dict[str, Any]) -> None:
    store = pyro.get_param_store()
    store.clear()
    store.set_state(state["param_store"])
    # Point the field at the restored tensors, so that its gradients reach the optimizer.
    pyro.module("field", run.field, update_module_params=True)
    run.svi.optim.set_state(state["optimizer"])
    pyro.util.set_rng_state(state["rng"]["pyro"])
    run.camera_generator.set_state(state["rng"]["cameras"])
    run.guide_generator.set_state(state["rng"]["guide"])
    run.step = int(state["step"])
    run.wall_s = float(state["wall_s"])
    run.history = list(state["history"])
    run.pending_losses = list(state["pending_losses"])


def _save_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    steps = [h["step"] for h in history]
    wall = [h["wall_s"] for h in history]
    acc = [h["accuracy"] for h in history]
    prob = [h["mean_prob"] for h in history]
    loss = [h["loss"] for h in history]
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = fig.subplots(2, 2)
    for col, (xs, xlabel) in enumerate(((steps, "step"), (wall, "wall-clock (s, training)"))):
        ax = axes[0, col]
        ax.plot(xs, acc, "o-", label="views classified as the prompt")
        ax.plot(xs, prob, "s--", label="mean p(prompt)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("quality")
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[1, col]
        xl = [x for x, v in zip(xs, loss) if v is not None]
        ax.plot(xl, [v for v in loss if v is not None], ".-")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SDS loss (mean over eval interval)")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def dream(
    config: TextTo3DConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    checkpoint_every: int | None = None,
    resume: bool = False,
    teacher: Any = None,
    classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Carve ``config.prompt`` into a voxel field by SDS and save what came out.

    Writes into ``out_dir``: ``turntable.png`` (8 views around the field), ``curves.png``
    (quality and loss against step and training wall-clock), ``summary.json`` (config, initial
    and final quality, wall time, the per-evaluation history) and ``checkpoint.pt`` (param store,
    optimizer state, step, history and every RNG state: the global ones and the camera and
    guide generators). A run resumed from its checkpoint ends with the same field, bit for bit,
    as an uninterrupted run of the same config. On ``KeyboardInterrupt`` the last completed step
    is checkpointed before the exception propagates.

    Note:
        ``dream`` owns Pyro's global state while it runs: it clears the param store and seeds
        the global RNGs (``pyro.set_rng_seed(config.seed)``).

    Args:
        config: the run's settings.
        out_dir: output folder (created if needed).
        progress: show a tqdm progress bar.
        checkpoint_every: also checkpoint every this many steps (the final step always is).
        resume: continue from ``out_dir/checkpoint.pt``; ``config`` may differ from the
            checkpoint's only in ``steps``.
        teacher: the teacher (default: [`carv_pyro.teachers.load_default`][carv_pyro.teachers.load_default]).
        classifier: the judge for `quality` (default:
            [`carv_pyro.classifier.load_classifier`][carv_pyro.classifier.load_classifier]).

    Returns:
        The summary dict that is also written to ``summary.json``.

    Raises:
        FileNotFoundError: ``resume=True`` without a checkpoint in ``out_dir``.
        ValueError: a checkpoint whose settings differ from ``config``.
    """
    from tqdm.auto import tqdm

    if checkpoint_every is not None:
        _positive_int("checkpoint_every", checkpoint_every)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_FILE
    state = None
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT_FILE} in {out}")
        state = _read_checkpoint(ckpt_path)
        check_resumable(TextTo3DConfig.from_dict(state["config"]), config)
    if teacher is None:
        from ..teachers import load_default

        teacher = load_default()
    if classifier is None:
        from ..classifier import load_classifier

        classifier = load_classifier()
    classifier.eval()

    run = _build(config, teacher)
    if state is not None:
        _restore(run, state)
    resumed_from = run.step if state is not None else None
    label = config.label
    name = estimator_name(config)

    def evaluate(loss: float | None) -> dict[str, Any]:
        q = quality(
            run.field,
            label,
            classifier,
            config.eval_views,
            elevations_deg=config.eval_elevations_deg,
            azimuth_deg=config.azimuth_deg,
            image_size=config.image_size,
            n_samples=config.n_samples,
        )
        entry = {
            "step": run.step,
            "loss": loss,
            "accuracy": q.accuracy,
            "mean_prob": q.mean_prob,
            "wall_s": run.wall_s,
            "teacher_draws": run.step * config.R * config.K,
        }
        run.history.append(entry)
        return entry

    if not run.history:
        evaluate(None)
    bar = tqdm(
        total=config.steps,
        initial=min(run.step, config.steps),
        disable=not progress,
        desc=f"dream {config.prompt!r} [{name}]",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while run.step < config.steps:
            start = time.perf_counter()
            run.pending_losses.append(run.svi.step())
            run.wall_s += time.perf_counter() - start
            run.step += 1
            bar.update(1)
            # The loss of an evaluation is the mean over the steps since the last regular one
            # (a multiple of eval_every), so an extra evaluation at a stop changes nothing.
            regular = run.step % config.eval_every == 0
            if regular or run.step == config.steps:
                entry = evaluate(sum(run.pending_losses) / len(run.pending_losses))
                if regular:
                    run.pending_losses = []
                bar.set_postfix(loss=f"{entry['loss']:.3g}", acc=f"{entry['accuracy']:.2f}")
            if checkpoint_every and run.step % checkpoint_every == 0:
                _save_checkpoint(run, ckpt_path)
    except KeyboardInterrupt:
        _save_checkpoint(run, ckpt_path)
        raise
    finally:
        bar.close()
    _save_checkpoint(run, ckpt_path)

    digit = DIGIT_NAMES[label]
    files = {
        "turntable": str(out / "turntable.png"),
        "curves": str(out / "curves.png"),
        "summary": str(out / "summary.json"),
        "checkpoint": str(ckpt_path),
    }
    save_turntable_png(
        run.field,
        files["turntable"],
        n_views=8,
        elevation=math.radians(sum(config.elevation_deg) / 2),
        image_size=config.image_size,
        n_samples=config.n_samples,
    )
    _save_curves(
        run.history,
        Path(files["curves"]),
        f"{digit!r} ({name}: R={config.R}, K={config.K}, proposal={config.proposal}, "
        f"stratify={config.stratify})",
    )
    final, initial = run.history[-1], run.history[0]
    summary = {
        "prompt": config.prompt,
        "label": label,
        "estimator": name,
        "config": config.to_dict(),
        "steps": run.step,
        "wall_s": run.wall_s,
        "sec_per_step": run.wall_s / max(run.step, 1),
        "initial_quality": {k: initial[k] for k in ("accuracy", "mean_prob")},
        "final_quality": {k: final[k] for k in ("accuracy", "mean_prob")},
        "eval_views": config.eval_views * len(config.eval_elevations_deg),
        "resumed_from": resumed_from,
        "history": run.history,
        "files": files,
    }
    Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
