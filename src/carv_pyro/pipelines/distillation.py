"""Single-step distillation (DMD-style): a one-step generator learns from a frozen teacher.

Distribution matching distillation (DMD, DMD2) trains a generator ``x = G(z, y)`` so that its
samples' distribution matches the teacher's. The gradient w.r.t. the generator's parameters is
a teacher expectation with the generator forward as the expensive upstream step:

    grad(theta) = E_{z, y} E_{t ~ p(t)} E_{eps} [ J_G(z, y)^T  h(x, t, eps, y) ],
    h = (eps_real(x_t, t, y) - eps_fake(x_t, t, y)) / mean|eps_real(x_t, t, y) - eps|,

where ``eps_real`` is the frozen teacher (with classifier-free guidance) and ``eps_fake`` a
"fake" score network of the generator's own samples, trained online with the standard denoising
loss between generator steps. ``h`` is DMD2's normalized score difference
``(x0_fake - x0_real) / mean|x - x0_real|``, written in eps-space (the ``sigma_t / alpha_t``
factors cancel). Written as a Pyro model, the latents ``(z, y)`` are the outer plate and the
teacher's ``(t, eps)`` draws the inner plate:

```python
distiller = Distiller(DistillationConfig(R=8, K=16), teacher=load_default())
model = distiller.model  # pyro.module("generator", G); plates "latents" (R) and "noise" (K)
guide = carv_pyro.TimestepGuide(model, proposal="prior", stratify="per_outer")
svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=carv_pyro.CARVLoss())
for _ in range(100):
    distiller.fake_step()  # a few denoising updates of the fake score on fresh samples
    svi.step()             # one generator step
```

`train_distillation` wraps that loop with a compute budget, progress and evaluation by
the Fréchet distance in the digit classifier's feature space (`fid_digits`), so that
estimators can be compared after equal compute. `DistillationBench` is the adapter used
by ``carv-pyro bench``: gradient estimates of every estimator at one fixed checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from einops import rearrange
from pyro.infer import SVI
from torch import Tensor, nn

from ..guides import NOISE, PROPOSALS, STRATIFY, TimestepGuide
from ..infer.loss import CARVLoss
from ..objectives import DenoisingLoss, NoisedBatch, TeacherObjective
from ..infer.primitives import teacher_term
from ..teachers.base import AbstractTeacher

__all__ = [
    "ESTIMATORS",
    "DistillationBench",
    "DistillationConfig",
    "DistillationHistory",
    "Distiller",
    "FakeScore",
    "Generator",
    "StratifiedLabels",
    "dmd_objective",
    "fid_digits",
    "frechet_distance",
    "make_model",
    "save_sample_grid",
    "tiny_digits_teacher",
    "train_distillation",
]

#: Inner draws of the ``K > 1`` estimators (the paper's DMD setting).
K_REUSE = 16

ESTIMATORS: dict[str, dict[str, Any]] = {
    "baseline": {"K": 1, "proposal": "prior", "stratify": None, "noise": "iid"},
    "reuse": {"K": K_REUSE, "proposal": "prior", "stratify": None, "noise": "iid"},
    "carv": {"K": K_REUSE, "proposal": "prior", "stratify": "per_outer", "noise": "iid"},
    "carv-is": {"K": K_REUSE, "proposal": "weighted", "stratify": "per_outer", "noise": "iid"},
}
"""The named gradient estimators of `train_distillation`.

- ``"baseline"``: one ``t ~ p(t)`` per generator sample (DMD's estimator).
- ``"reuse"``: ``K = 16`` i.i.d. prior draws per sample, averaged before the generator backward.
- ``"carv"``: ``K = 16`` draws per sample, one per stratum of ``p(t)`` (stratified inverse CDF).
- ``"carv-is"``: as ``"carv"`` with ``t`` importance-sampled from ``q ∝ p(t) w(t) alpha_t``.

``"carv"`` does not importance-sample: the library's cheap heuristic ``q ∝ p w alpha`` favours
small ``t``, where DMD2's normalized residual is large, and measured 3.8-15x MORE variance than
stratification alone on the digits teacher (see `DistillationBench`).
"""


# ----------------------------------------------------------------------------- validation


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_estimator_settings(K: int, proposal: Any, stratify: Any, noise: Any) -> None:
    _positive_int("K", K)
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if stratify not in STRATIFY:
        raise ValueError(f"stratify must be one of {STRATIFY}, got {stratify!r}")
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
    if noise == "antithetic" and K % 2:
        raise ValueError(f"noise='antithetic' needs an even K, got K={K}")


def estimator_settings(name: str) -> dict[str, Any]:
    """The settings ``{K, proposal, stratify, noise}`` of a named estimator.

    Args:
        name: one of `ESTIMATORS`.

    Raises:
        ValueError: naming the unknown estimator and the known ones.
    """
    try:
        return dict(ESTIMATORS[name])
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}"
        ) from None


# ------------------------------------------------------------------------------ generator


class Generator(nn.Module):
    """A one-step, class-conditional generator ``G(z, y) -> (N, 1, 16, 16)`` in ``[-1, 1]``.

    Layout: the latent ``z`` and a label embedding go through a linear map to a
    ``(2 width, 4, 4)`` feature map, then two nearest-neighbour upsamplings with 3x3 convolutions
    (``4 -> 8 -> 16``), a last 3x3 convolution to one channel, and ``tanh``.

    Any module with the attributes ``z_dim``, ``num_classes`` (``None`` if unconditional) and
    ``event_shape`` and a ``forward(z, labels)`` works with `make_model`.

    Args:
        z_dim: size of the latent ``z ~ N(0, I)``.
        num_classes: number of class labels (10 digits); ``None`` for an unconditional generator.
        width: channels of the 8x8 and 16x16 convolutions.
        embed_dim: size of the label embedding.
        image_size: side of the output (a multiple of 4).
    """

    def __init__(
        self,
        z_dim: int = 32,
        num_classes: int | None = 10,
        width: int = 32,
        embed_dim: int = 16,
        image_size: int = 16,
    ):
        super().__init__()
        for name, value in (("z_dim", z_dim), ("width", width), ("embed_dim", embed_dim)):
            _positive_int(name, value)
        _positive_int("image_size", image_size)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if num_classes is not None:
            _positive_int("num_classes", num_classes)
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.event_shape = torch.Size([1, image_size, image_size])
        self._base = image_size // 4
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        in_dim = z_dim + (embed_dim if num_classes else 0)
        self.fc = nn.Sequential(nn.Linear(in_dim, 2 * width * self._base**2), nn.SiLU())
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Generate images.

        Args:
            z: ``(N, z_dim)`` latents.
            labels: ``(N,)`` long class labels (required iff the generator is conditional).

        Returns:
            ``(N, 1, H, W)`` images in ``[-1, 1]``.
        """
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (N, {self.z_dim}), got {tuple(z.shape)}")
        h = z
        if self.embed is not None:
            if labels is None or labels.shape != (z.shape[0],):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"labels must have shape ({z.shape[0]},), got {got}")
            h = torch.cat([z, self.embed(labels.long())], dim=1)
        h = rearrange(self.fc(h), "n (c h w) -> n c h w", h=self._base, w=self._base)
        return torch.tanh(self.up(h))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None = None,
        n: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``z ~ N(0, I)`` and generate without gradients.

        Args:
            labels: ``(N,)`` labels; default ``arange(n) % num_classes`` (balanced).
            n: number of samples when ``labels`` is None.
            generator: optional ``torch.Generator`` (CPU) for ``z``.

        Returns:
            ``(N, 1, H, W)`` images in ``[-1, 1]``.
        """
        device = next(self.parameters()).device
        if labels is None and self.num_classes is not None:
            _positive_int("n", n)
            labels = torch.arange(n) % self.num_classes
        count = n if labels is None else labels.shape[0]
        z = torch.randn(count, self.z_dim, generator=generator).to(device)
        return self(z, None if labels is None else labels.to(device))


# ------------------------------------------------------------------------------- teachers


def tiny_digits_teacher(seed: int = 0, channels: tuple[int, ...] = (8, 16)) -> Any:
    """A small RANDOMLY initialized class-conditional teacher with the default teacher's layout.

    A stand-in for [`carv_pyro.teachers.load_default`][carv_pyro.teachers.load_default] in tests and demos: a
    ``UNet2DModel`` on ``1 x 16 x 16`` images with labels 0-9 and the null class 10, and the
    linear-beta ``DDPMScheduler`` with 1000 steps. Its predictions are meaningless.

    Args:
        seed: seeds the weights.
        channels: ``block_out_channels`` (one down/up block each).

    Returns:
        A [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher].
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from ..teachers.diffusers_teacher import DiffusersTeacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=16,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(channels),
            down_block_types=("DownBlock2D",) * len(channels),
            up_block_types=("UpBlock2D",) * len(channels),
            layers_per_block=1,
            norm_num_groups=4,
            num_class_embeds=11,
        )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=1000), null_class=10)


def _default_teacher() -> Any:
    """The embedded teacher, or (with a warning) a random stand-in while its weights are missing."""
    from ..teachers import load_default

    try:
        return load_default()
    except FileNotFoundError as err:
        warnings.warn(
            f"{err}; using a randomly initialized stand-in teacher (tiny_digits_teacher): "
            f"variance numbers are indicative only and Fréchet distances meaningless",
            stacklevel=3,
        )
        return tiny_digits_teacher()


def _copy_teacher(teacher: Any, unet: nn.Module) -> Any:
    """A `DiffusersTeacher` over ``unet`` with ``teacher``'s scheduler and null class."""
    from ..teachers.diffusers_teacher import DiffusersTeacher

    return DiffusersTeacher(unet, teacher.scheduler, null_class=teacher.null_class)


def _new_fake_unet(real: Any, channels: tuple[int, ...]) -> nn.Module:
    """A fresh class-conditional ``UNet2DModel`` shaped like ``real``'s input and labels."""
    from diffusers import UNet2DModel

    cfg = real.unet.config
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=min(8, min(channels)),
        num_class_embeds=cfg.num_class_embeds,
    )


class FakeScore:
    """The "fake" score network of DMD: a diffusers teacher of the generator's own samples.

    The network is a [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher] (frozen, never a Pyro
    parameter) that the DMD objective queries like any teacher. Between generator steps
    `update` trains it with its own torch optimizer on fresh generator samples, using the
    standard denoising loss ([`DenoisingLoss`][carv_pyro.objectives.DenoisingLoss], eps-space MSE) with
    ``t`` from the DMD objective's prior; the network is unfrozen only inside `update`.

    Args:
        teacher: the fake network as a ``DiffusersTeacher`` (same schedule as the real teacher).
        lr: AdamW learning rate.
        t_range: ``(lo, hi)`` of the timesteps it is trained on.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        teacher: Any,
        lr: float = 1e-3,
        t_range: tuple[float, float] = (0.02, 0.98),
        weight_decay: float = 0.0,
    ):
        _positive_float("fake lr", lr)
        self.teacher = teacher
        self.loss = DenoisingLoss(teacher, weighting="uniform", t_range=t_range, reduction="mean")
        self.optimizer = torch.optim.AdamW(
            teacher.unet.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=weight_decay
        )
        self.updates = 0

    def update(self, x0: Tensor, labels: Tensor | None) -> float:
        """One denoising step of the fake network on clean samples ``x0``.

        Args:
            x0: ``(N, *event)`` generator samples (detached here).
            labels: ``(N,)`` their class labels, or ``None`` for an unconditional network.

        Returns:
            The step's denoising loss.
        """
        x0 = x0.detach()
        n = x0.shape[0]
        t = self.loss.prior.sample((n,)).to(x0.device)
        eps = torch.randn_like(x0)
        self.teacher.requires_grad = True
        self.teacher.unet.train()
        try:
            out = self.loss.evaluate(x0, t, eps, labels)
            loss = out.surrogate.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.teacher.unet.eval()
            self.teacher.requires_grad = False  # frozen again (and its cast cache dropped)
        self.updates += 1
        return float(loss.detach())


# ------------------------------------------------------------------------------ objective


def dmd_objective(
    real: AbstractTeacher,
    fake: AbstractTeacher,
    *,
    guidance_scale: float = 1.0,
    t_range: tuple[float, float] = (0.02, 0.98),
    normalize: bool = True,
    weighting: str | Callable = "uniform",
    floor: float = 1e-6,
) -> TeacherObjective:
    """The DMD distribution-matching objective, declared as a `TeacherObjective`.

    The residual is the descent direction of ``KL(p_generator || p_real)`` w.r.t. a sample:

    - ``normalize=True`` (DMD2): ``(eps_real - eps_fake) / mean|eps_real - eps|`` per draw,
      which equals DMD2's ``(x0_fake - x0_real) / mean|x - x0_real|``;
    - ``normalize=False``: ``eps_real - eps_fake`` (times ``weighting``).

    ``eps_real`` uses classifier-free guidance at ``guidance_scale``; the fake network is asked
    without guidance. Note the sign: SGD on ``x`` descends along ``+residual`` (the library's
    convention, as for SDS whose residual is ``eps_real - eps``).

    Args:
        real: the frozen teacher of the data.
        fake: the score network of the generator's samples (may change between steps).
        guidance_scale: classifier-free guidance of ``real``.
        t_range: ``p(t)`` uniform over ``int(lo T) .. int(hi T)``.
        normalize: DMD2's per-draw normalization.
        weighting: ``w(t)`` (``"uniform"``, ``"sds"``, ``"fantasia3d"`` or a callable).
        floor: lower bound of the normalizer ``mean|eps_real - eps|``.

    Returns:
        A residual [`TeacherObjective`][carv_pyro.objectives.TeacherObjective] over ``real``.

    Raises:
        ValueError: if ``fake``'s event shape differs from ``real``'s, or on bad parts.
    """
    if not isinstance(fake, AbstractTeacher):
        raise ValueError(f"fake must be an AbstractTeacher, got {type(fake).__name__}")
    if tuple(fake.event_shape) != tuple(real.event_shape):
        raise ValueError(
            f"fake teacher takes {tuple(fake.event_shape)} but real takes {tuple(real.event_shape)}"
        )
    floor = _positive_float("floor", floor)

    def dmd_residual(batch: NoisedBatch) -> Tensor:
        eps_real = batch.eps_hat()
        diff = eps_real - batch.eps_hat(fake, guidance_scale=1.0)
        if normalize:
            scale = (eps_real - batch.eps).abs().flatten(1).mean(1).clamp_min(floor)
            diff = diff / scale.reshape((-1,) + (1,) * (diff.dim() - 1))
        return diff

    objective = TeacherObjective(
        real,
        residual=dmd_residual,
        weighting=weighting,
        t_range=t_range,
        guidance_scale=guidance_scale,
    )
    objective.fake = fake
    return objective


# ---------------------------------------------------------------------------------- model


class StratifiedLabels(dist.Categorical):
    """Uniform class labels, drawn stratified across the plate (marginally exactly uniform).

    ``log_prob`` is the uniform ``Categorical``'s, and every single draw is uniform over the
    ``C`` classes, but the ``n`` draws of one call are spread evenly: draw ``i`` takes
    ``floor(C u_i)`` with ``u_i = (pi_i + U_i) / n`` for a random permutation ``pi`` (one ``u`` per
    stratum of ``[0, 1)``), so every class appears ``floor(n / C)`` or about ``ceil(n / C)``
    times. An estimator that averages per-sample terms stays unbiased (linearity), while the
    between-sample variance due to the labels shrinks. The draws come from ``generator``
    (global RNG when ``None``).

    Args:
        num_classes: ``C``.
        device: where the labels live.
        generator: optional ``torch.Generator`` (CPU) of the draws.
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        validate_args=None,
    ):
        self.generator = generator
        super().__init__(
            logits=torch.zeros(num_classes, device=device), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StratifiedLabels, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape)
        strata = torch.argsort(torch.rand(n, generator=self.generator)).to(torch.float64)
        u = (strata + torch.rand(n, dtype=torch.float64, generator=self.generator)) / n
        labels = (u * self._num_events).floor().long().clamp_max(self._num_events - 1)
        return labels.reshape(shape).to(self.logits.device)


LABEL_SAMPLING = ("iid", "stratified")


def make_model(
    generator: nn.Module,
    objective: TeacherObjective,
    R: int,
    K: int,
    *,
    labels: str = "iid",
    name: str = "dmd",
    module_name: str = "generator",
) -> Callable[..., None]:
    """The DMD objective as a plain Pyro model.

    ``model(R=R, K=K)`` registers the generator with ``pyro.module(module_name, generator)``,
    draws ``R`` latents in the ``latents`` plate (``dim=-2``): ``z`` ``(R, 1, z_dim)`` from
    ``N(0, I)`` and, for a conditional generator, ``label`` ``(R, 1)`` uniform over the classes
    (i.i.d., or stratified across the plate with `StratifiedLabels`); generates ``x = G(z, label)`` of shape ``(R, 1, *event)`` (the upstream step) and records the
    teacher term ``name`` with ``K`` draws per sample in the ``noise`` plate (``dim=-1``),
    conditioned on the label: ``R * K`` draws in one batched teacher call.

    Args:
        generator: a `Generator` (or a module with ``z_dim``, ``num_classes`` and
            ``forward(z, labels)``) whose output shape is the objective's event shape.
        objective: the DMD objective (`dmd_objective`).
        R: default number of generator samples per call.
        K: default number of ``(t, eps)`` draws per sample.
        labels: ``"iid"`` (DMD's sampling) or ``"stratified"`` (each draw still uniform, the
            ``R`` labels spread evenly over the classes: lower between-sample variance).
        name: the teacher term's site name.
        module_name: the generator's name in the param store.

    Returns:
        ``model(R=R, K=K)``.

    Raises:
        ValueError: if ``R`` or ``K`` is not a positive integer (also when passed to the model),
            or ``labels`` is unknown.
    """
    _positive_int("R", R)
    _positive_int("K", K)
    if labels not in LABEL_SAMPLING:
        raise ValueError(f"labels must be one of {LABEL_SAMPLING}, got {labels!r}")
    num_classes = getattr(generator, "num_classes", None)
    z_dim = _positive_int("generator.z_dim", getattr(generator, "z_dim", None))
    default_R, default_K = R, K

    def model(R: int = default_R, K: int = default_K) -> None:
        _positive_int("R", R)
        _positive_int("K", K)
        pyro.module(module_name, generator)
        p = next(generator.parameters())
        zeros = torch.zeros(z_dim, dtype=p.dtype, device=p.device)
        with pyro.plate("latents", R, dim=-2):
            z = pyro.sample("z", dist.Normal(zeros, 1.0).to_event(1))  # (R, 1, z_dim)
            label = None
            if num_classes is not None:
                if labels == "stratified":
                    label_dist = StratifiedLabels(num_classes, device=p.device)
                else:
                    label_dist = dist.Categorical(logits=torch.zeros(num_classes, device=p.device))
                label = pyro.sample("label", label_dist)  # (R, 1)
            flat_label = None if label is None else rearrange(label, "r 1 -> r")
            x = generator(rearrange(z, "r 1 d -> r d"), flat_label)  # (R, *event)
            x = rearrange(x, "r ... -> r 1 ...")  # (R, 1, *event)
            with pyro.plate("noise", K, dim=-1):
                teacher_term(name, objective, x, cond=label)

    return model


# ---------------------------------------------------------------------- Fréchet distance


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})``, computed in
    float64 with symmetric eigendecompositions (negative eigenvalues from round-off are clipped),
    so it is stable for singular covariances. Covariances are unbiased (``n - 1``).

    Args:
        feats_a: ``(N_a, F)`` features (tensor or array), ``N_a >= 2``.
        feats_b: ``(N_b, F)`` features, ``N_b >= 2``.

    Returns:
        The distance (``>= 0`` up to round-off).

    Raises:
        ValueError: on non-2-D inputs, fewer than 2 rows, mismatched ``F`` or non-finite values.
    """
    a = torch.as_tensor(feats_a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(feats_b).detach().to("cpu", torch.float64)
    for nm, f in (("feats_a", a), ("feats_b", b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{nm} must have shape (N, F) with N >= 2, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{nm} must be finite")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: feats_a has {a.shape[1]}, feats_b {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    vals, vecs = torch.linalg.eigh(0.5 * (cov_a + cov_a.T))
    sqrt_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * cross
    return float(fd)


@lru_cache(maxsize=4)
def _real_features(split: str, device: str) -> Tensor:
    from ..classifier import load_classifier
    from ..data import load_digits_images

    images, _ = load_digits_images(size=16, split=split)
    classifier = load_classifier().to(device)
    with torch.no_grad():
        return classifier.features(images.to(device)).cpu()


@lru_cache(maxsize=2)
def _classifier(device: str) -> nn.Module:
    from ..classifier import load_classifier

    return load_classifier().to(device)


@torch.no_grad()
def fid_digits(
    generator: nn.Module,
    n: int = 1000,
    *,
    real_split: str = "all",
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Fréchet distance of a generator's samples to real digits in the classifier's features.

    The embedding is the penultimate layer of the shipped digit classifier
    ([`carv_pyro.classifier.DigitClassifier.features`][carv_pyro.classifier.DigitClassifier.features]); the real set is scikit-learn's
    digits ([`carv_pyro.data.load_digits_images`][carv_pyro.data.load_digits_images]). Samples use balanced labels
    ``arange(n) % 10`` and latents from a ``torch.Generator`` seeded with ``seed``, so repeated
    evaluations of one generator agree exactly. The value depends on ``n``: compare at equal ``n``.

    Args:
        generator: a class-conditional `Generator`.
        n: number of generated samples (``>= 2``).
        real_split: ``"all"`` (1797 images), ``"train"`` or ``"test"``.
        seed: seeds the latents.
        batch_size: samples per generator and classifier call.

    Returns:
        The Fréchet distance.
    """
    _positive_int("n", n)
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    _positive_int("batch_size", batch_size)
    device = next(generator.parameters()).device
    classifier = _classifier(str(device))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % (generator.num_classes or 10)
    feats = []
    was_training = generator.training
    generator.eval()
    try:
        for i in range(0, n, batch_size):
            x = generator.sample(labels[i : i + batch_size], generator=g)
            feats.append(classifier.features(x).cpu())
    finally:
        generator.train(was_training)
    return frechet_distance(torch.cat(feats), _real_features(real_split, str(device)))


def save_sample_grid(
    generators: dict[str, nn.Module], path: str, n_per_class: int = 8, seed: int = 0
) -> str:
    """Save a PNG with one panel of samples per generator (rows: digits 0-9).

    Args:
        generators: ``{title: generator}``; all get the same latents.
        path: the PNG file.
        n_per_class: columns per panel.
        seed: seeds the latents.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _positive_int("n_per_class", n_per_class)
    fig, axes = plt.subplots(1, len(generators), figsize=(3.2 * len(generators), 4.2))
    axes = [axes] if len(generators) == 1 else list(axes)
    for ax, (title, gen) in zip(axes, generators.items()):
        classes = gen.num_classes or 1
        labels = torch.arange(classes).repeat_interleave(n_per_class)
        x = gen.sample(labels, generator=torch.Generator().manual_seed(seed)).cpu()
        grid = rearrange(x, "(r c) 1 h w -> (r h) (c w)", r=classes, c=n_per_class)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- config


@dataclass
class DistillationConfig:
    """Settings of a DMD run.

    Attributes:
        R: generator samples per generator step (the ``latents`` plate).
        K: teacher ``(t, eps)`` draws per sample (the ``noise`` plate).
        proposal: timestep proposal of the [`TimestepGuide`][carv_pyro.TimestepGuide].
        stratify: ``None``, ``"per_outer"`` or ``"global"``.
        noise: ``"iid"``, ``"antithetic"`` (even ``K``) or ``"sobol"``.
        guidance_scale: classifier-free guidance of the real teacher.
        t_range: ``p(t)`` uniform over ``int(lo T) .. int(hi T)``.
        normalize: DMD2's per-draw normalization of the score difference.
        labels: ``"iid"`` or ``"stratified"`` class labels across the ``R`` samples (see
            `StratifiedLabels`).
        lr: generator Adam learning rate.
        betas: generator Adam betas.
        fake_lr: fake network AdamW learning rate.
        fake_updates: fake updates per generator step (DMD2's two-time-scale rule uses 5).
        fake_batch: generator samples per fake update.
        fake_warmup: fake updates before the first generator step.
        fake_init: ``"real"`` (copy the real teacher's UNet, as DMD does) or ``"scratch"`` (a
            fresh UNet with ``fake_channels``).
        fake_channels: ``block_out_channels`` of a ``"scratch"`` fake network.
        z_dim: generator latent size.
        width: generator channels.
        fd_samples: generated samples per Fréchet-distance evaluation.
        seed: seeds the networks' initialization and the run's draws.

    Raises:
        ValueError: naming the first invalid field.
    """

    R: int = 8
    K: int = 16
    proposal: str = "prior"
    stratify: str | None = "per_outer"
    noise: str = "iid"
    guidance_scale: float = 1.0
    t_range: tuple[float, float] = (0.02, 0.98)
    normalize: bool = True
    labels: str = "iid"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.99)
    fake_lr: float = 1e-3
    fake_updates: int = 2
    fake_batch: int = 32
    fake_warmup: int = 50
    fake_init: str = "real"
    fake_channels: tuple[int, ...] = (16, 32)
    z_dim: int = 32
    width: int = 32
    fd_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("R", self.R)
        _check_estimator_settings(self.K, self.proposal, self.stratify, self.noise)
        _positive_float("guidance_scale", self.guidance_scale)
        try:
            lo, hi = (float(v) for v in self.t_range)
        except (TypeError, ValueError):
            raise ValueError(f"t_range must be a pair (lo, hi), got {self.t_range!r}") from None
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo <= hi < 1, got {self.t_range!r}")
        self.t_range = (lo, hi)
        _positive_float("lr", self.lr)
        _positive_float("fake_lr", self.fake_lr)
        try:
            b1, b2 = (float(v) for v in self.betas)
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair, got {self.betas!r}") from None
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas!r}")
        self.betas = (b1, b2)
        _non_negative_int("fake_updates", self.fake_updates)
        _positive_int("fake_batch", self.fake_batch)
        _non_negative_int("fake_warmup", self.fake_warmup)
        if self.fake_init not in ("real", "scratch"):
            raise ValueError(f"fake_init must be 'real' or 'scratch', got {self.fake_init!r}")
        self.fake_channels = tuple(self.fake_channels)
        for c in self.fake_channels:
            _positive_int("fake_channels", c)
        _positive_int("z_dim", self.z_dim)
        _positive_int("width", self.width)
        _positive_int("fd_samples", self.fd_samples)
        if self.fd_samples < 2:
            raise ValueError(f"fd_samples must be at least 2, got {self.fd_samples}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.labels not in LABEL_SAMPLING:
            raise ValueError(f"labels must be one of {LABEL_SAMPLING}, got {self.labels!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    def with_estimator(self, estimator: str) -> DistillationConfig:
        """A copy with a named estimator's ``K``, proposal, stratification and noise."""
        return dataclasses.replace(self, **estimator_settings(estimator))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


# ---------------------------------------------------------------------------------- state


class Distiller:
    """The state of a DMD run: real teacher, generator, fake score and the DMD objective.

    Args:
        config: the run's settings.
        teacher: the frozen real teacher (default: the embedded digits teacher, or a random
            stand-in with a warning while its weights are missing).
        device: where the networks live.
        generator: an initial generator (default: a new `Generator` seeded by
            ``config.seed``); used as is, not copied.
        fake: an initial `FakeScore` (default: built from ``config.fake_init``).

    Attributes:
        real: the real teacher.
        generator: the generator (registered as ``pyro.module("generator", ...)`` by the model).
        fake: the `FakeScore`.
        objective: the DMD objective (`dmd_objective`).
        model: ``model(R, K)`` from `make_model` with the config's sizes.
    """

    def __init__(
        self,
        config: DistillationConfig | None = None,
        teacher: Any = None,
        device: str | torch.device = "cpu",
        *,
        generator: nn.Module | None = None,
        fake: FakeScore | None = None,
    ):
        config = DistillationConfig() if config is None else config
        if not isinstance(config, DistillationConfig):
            raise ValueError(f"config must be a DistillationConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(device)
        real = _default_teacher() if teacher is None else teacher
        if not isinstance(real, AbstractTeacher) or not hasattr(real, "unet"):
            raise ValueError(
                f"teacher must be a class-conditional DiffusersTeacher, got {type(real).__name__}"
            )
        if getattr(real, "num_class_embeds", None) is None:
            raise ValueError(
                "teacher must be class-conditional (UNet2DModel with num_class_embeds)"
            )
        self.real = real.to(self.device)
        self.num_classes = int(real.null_class if real.null_class is not None else 10)
        if generator is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                generator = Generator(
                    z_dim=config.z_dim,
                    num_classes=self.num_classes,
                    width=config.width,
                    image_size=int(real.event_shape[-1]),
                )
        if tuple(generator.event_shape) != tuple(real.event_shape):
            raise ValueError(
                f"generator makes {tuple(generator.event_shape)} but the teacher takes "
                f"{tuple(real.event_shape)}"
            )
        self.generator = generator.to(self.device)
        if fake is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                unet = (
                    copy.deepcopy(real.unet)
                    if config.fake_init == "real"
                    else _new_fake_unet(real, config.fake_channels)
                )
            fake = FakeScore(
                _copy_teacher(real, unet.to(self.device)), config.fake_lr, config.t_range
            )
        self.fake = fake
        self.objective = dmd_objective(
            self.real,
            self.fake.teacher,
            guidance_scale=config.guidance_scale,
            t_range=config.t_range,
            normalize=config.normalize,
        )
        self.model = make_model(
            self.generator, self.objective, config.R, config.K, labels=config.labels
        )

    def fake_step(self, updates: int | None = None) -> float:
        """Train the fake score on fresh generator samples.

        Args:
            updates: number of updates (default ``config.fake_updates``).

        Returns:
            The mean denoising loss of the updates (``nan`` for none).
        """
        n = self.config.fake_updates if updates is None else _non_negative_int("updates", updates)
        losses = []
        for _ in range(n):
            labels = torch.randint(0, self.num_classes, (self.config.fake_batch,))
            x0 = self.generator.sample(labels)
            losses.append(self.fake.update(x0, labels.to(self.device)))
        return sum(losses) / len(losses) if losses else math.nan

    def guide(self, K: int, proposal: str, stratify: str | None, noise: str) -> TimestepGuide:
        """A [`TimestepGuide`][carv_pyro.TimestepGuide] for `model` (options validated)."""
        _check_estimator_settings(K, proposal, stratify, noise)
        return TimestepGuide(self.model, proposal=proposal, stratify=stratify, noise=noise)

    def parameters(self) -> list[Tensor]:
        """The generator's trainable parameters (the ``theta`` of the gradient)."""
        return [p for p in self.generator.parameters() if p.requires_grad]

    def gradient(self, R: int, K: int, guide: TimestepGuide) -> Tensor:
        """ONE gradient estimate at the current parameters, nothing stepped.

        Runs ``CARVLoss().loss_and_grads`` in a private param-store scope with the generator's
        gradients zeroed first; the generator's ``.grad`` are cleared again afterwards.

        Returns:
            ``(P,)`` float64 CPU tensor: the flattened generator gradient.
        """
        _positive_int("R", R)
        _positive_int("K", K)
        params = self.parameters()
        with pyro.get_param_store().scope():
            for p in params:
                p.grad = None
            CARVLoss().loss_and_grads(self.model, guide, R=R, K=K)
            grads = [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
            ]
            flat = torch.cat(grads).detach().to("cpu", torch.float64)
            for p in params:
                p.grad = None
        return flat

    def clone(self, config: DistillationConfig | None = None) -> Distiller:
        """An independent copy of the generator and fake network (and the fake's optimizer).

        Args:
            config: the copy's config (default: this one's); the networks are copied as they are.
        """
        generator = copy.deepcopy(self.generator)
        unet = copy.deepcopy(self.fake.teacher.unet)
        fake = FakeScore(
            _copy_teacher(self.real, unet),
            self.config.fake_lr,
            self.config.t_range,
        )
        fake.optimizer.load_state_dict(self.fake.optimizer.state_dict())
        fake.updates = self.fake.updates
        return Distiller(
            config or self.config, self.real, self.device, generator=generator, fake=fake
        )


# -------------------------------------------------------------------------------- training


class _Clock:
    """Seconds of compute: process CPU time on CPUs (robust to other load), wall time on GPUs."""

    def __init__(self, kind: str, device: torch.device):
        if kind not in ("auto", "process", "wall"):
            raise ValueError(f"clock must be 'auto', 'process' or 'wall', got {kind!r}")
        if kind == "auto":
            kind = "wall" if device.type == "cuda" else "process"
        self.kind = kind
        self.device = device
        self.total = 0.0
        self._start: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "process" else time.perf_counter()

    def start(self) -> None:
        self._start = self._now()

    def pause(self) -> float:
        if self._start is not None:
            self.total += self._now() - self._start
            self._start = None
        return self.total


@dataclass
class DistillationHistory:
    """What `train_distillation` returns.

    Attributes:
        config: the run's config (with the estimator's settings applied).
        estimator: the estimator's name (or ``"custom"``).
        clock: ``"process"`` (CPU seconds of this process) or ``"wall"``.
        step: generator steps done, per record.
        seconds: compute seconds (excluding evaluation) at each record.
        loss: DMD value per generator step.
        fake_loss: mean fake denoising loss per generator step.
        evals: ``[{"step", "seconds", "fd"}]`` Fréchet-distance evaluations.
        distiller: the trained `Distiller`.
    """

    config: DistillationConfig
    estimator: str
    clock: str
    step: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fake_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    distiller: Distiller | None = None

    @property
    def final_fd(self) -> float:
        """The last evaluated Fréchet distance (``nan`` if none)."""
        return self.evals[-1]["fd"] if self.evals else math.nan

    @property
    def steps(self) -> int:
        """Generator steps done."""
        return self.step[-1] if self.step else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the networks)."""
        return {
            "config": self.config.to_dict(),
            "estimator": self.estimator,
            "clock": self.clock,
            "steps": self.steps,
            "seconds": self.seconds[-1] if self.seconds else 0.0,
            "final_fd": self.final_fd,
            "evals": list(self.evals),
            "loss": list(self.loss),
            "fake_loss": list(self.fake_loss),
        }


def _estimator_name(config: DistillationConfig) -> str:
    ours = {"K": config.K, "proposal": config.proposal, "stratify": config.stratify}
    ours["noise"] = config.noise
    for name, settings in ESTIMATORS.items():
        if settings == ours:
            return name
    return "custom"


def train_distillation(
    config: DistillationConfig | None = None,
    estimator: str | None = None,
    *,
    steps: int | None = None,
    budget_seconds: float | None = None,
    teacher: Any = None,
    init: Distiller | None = None,
    device: str | torch.device = "cpu",
    eval_every: int | None = None,
    evaluate: bool = True,
    fake_warmup: int | None = None,
    clock: str = "auto",
    progress: bool = True,
) -> DistillationHistory:
    """Train a one-step generator by DMD for a number of steps or a compute budget.

    Each generator step is ``config.fake_updates`` fake-score updates on fresh generator samples
    followed by one ``SVI`` step of the generator with [`CARVLoss`][carv_pyro.CARVLoss] and a
    [`TimestepGuide`][carv_pyro.TimestepGuide] set by the estimator. Before the first step the fake score
    gets ``fake_warmup`` updates (counted in the budget). The budget counts all of it and
    excludes evaluation; with ``clock="auto"`` it is this process's CPU time on a CPU (so other
    load on the machine does not shrink it) and wall time on a GPU. Runs inside a private Pyro
    param-store scope; seeds the global RNGs with ``config.seed``.

    Args:
        config: the settings (default `DistillationConfig`).
        estimator: a name from `ESTIMATORS` whose ``K``, proposal, stratification and
            noise replace the config's; ``None`` keeps the config's.
        steps: stop after this many generator steps.
        budget_seconds: stop once the compute spent reaches this (checked after each step).
        teacher: the real teacher (default: embedded); ignored when ``init`` is given.
        init: start from a copy of this checkpoint (its generator, fake and teacher).
        device: where to train (ignored when ``init`` is given).
        eval_every: evaluate the Fréchet distance every this many steps (and at the end).
        evaluate: evaluate at the end (and every ``eval_every`` steps); ``False`` skips it.
        fake_warmup: fake updates before the first generator step (default:
            ``config.fake_warmup`` from scratch, 0 from a checkpoint ``init``).
        clock: ``"auto"``, ``"process"`` or ``"wall"``.
        progress: show a tqdm progress bar.

    Returns:
        A `DistillationHistory`.

    Raises:
        ValueError: on an unknown estimator, neither ``steps`` nor ``budget_seconds``, or
            non-positive values.
    """
    from tqdm.auto import tqdm

    config = DistillationConfig() if config is None else config
    if not isinstance(config, DistillationConfig):
        raise ValueError(f"config must be a DistillationConfig, got {type(config).__name__}")
    if estimator is not None:
        config = config.with_estimator(estimator)
    if steps is None and budget_seconds is None:
        raise ValueError("give steps or budget_seconds (or both) to bound the run")
    if steps is not None:
        _positive_int("steps", steps)
    if budget_seconds is not None:
        budget_seconds = _positive_float("budget_seconds", budget_seconds)
    if eval_every is not None:
        _positive_int("eval_every", eval_every)
    if fake_warmup is None:
        fake_warmup = config.fake_warmup if init is None else 0
    _non_negative_int("fake_warmup", fake_warmup)

    pyro.set_rng_seed(config.seed)
    if init is not None:
        distiller = init.clone(config)
    else:
        distiller = Distiller(config, teacher=teacher, device=device)
    timer = _Clock(clock, distiller.device)
    history = DistillationHistory(config, estimator or _estimator_name(config), timer.kind)
    history.distiller = distiller
    guide = distiller.guide(config.K, config.proposal, config.stratify, config.noise)
    optim = pyro.optim.Adam({"lr": config.lr, "betas": config.betas})
    loss = CARVLoss()

    def run_eval(step: int) -> None:
        fd = fid_digits(distiller.generator, config.fd_samples, seed=config.seed)
        history.evals.append({"step": step, "seconds": timer.total, "fd": fd})

    total = steps if budget_seconds is None else budget_seconds
    unit = "step" if budget_seconds is None else "s"
    bar_format = None
    if budget_seconds is not None:
        bar_format = "{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}{postfix}]"
    bar = tqdm(
        total=total,
        unit=unit,
        disable=not progress,
        desc=f"dmd {history.estimator}",
        leave=False,
        bar_format=bar_format,
    )
    with pyro.get_param_store().scope():
        svi = SVI(distiller.model, guide, optim, loss=loss)
        timer.start()
        distiller.fake_step(fake_warmup)
        step = 0
        while True:
            fake_loss = distiller.fake_step()
            value = svi.step(R=config.R, K=config.K)
            step += 1
            spent = timer.pause()
            history.step.append(step)
            history.seconds.append(spent)
            history.loss.append(float(value))
            history.fake_loss.append(float(fake_loss))
            bar.update(1 if budget_seconds is None else min(spent, total) - bar.n)
            done = (steps is not None and step >= steps) or (
                budget_seconds is not None and spent >= budget_seconds
            )
            if evaluate and (done or (eval_every is not None and step % eval_every == 0)):
                run_eval(step)
                bar.set_postfix(fd=f"{history.final_fd:.2f}", step=step)
            if done:
                break
            timer.start()
    bar.close()
    return history


# ------------------------------------------------------------------------------------ bench


def _bench_configs(R: int) -> list[dict[str, Any]]:
    rows = [
        ("baseline", 1, "prior", None, "iid"),
        ("baseline+strat", 1, "prior", "global", "iid"),
        ("reuse", K_REUSE, "prior", None, "iid"),
        ("reuse+strat", K_REUSE, "prior", "per_outer", "iid"),
        ("reuse+IS+strat", K_REUSE, "weighted", "per_outer", "iid"),
        ("reuse+strat+QMC", K_REUSE, "prior", "per_outer", "sobol"),
    ]
    return [
        {"method": m, "R": R, "K": K, "proposal": p, "stratify": s, "noise": n}
        for m, K, p, s, n in rows
    ]


class DistillationBench:
    """Benchmark adapter: DMD gradient estimates at one fixed, realistic checkpoint.

    At construction it builds the real teacher, a generator and a fake score and trains them
    briefly by DMD (fake warm-up, then generator steps with the ``"carv"`` estimator) so that
    ``theta`` is a mid-training checkpoint whose fake score tracks the generator. Every
    `estimate` is then ONE gradient of the generator's parameters at that checkpoint;
    nothing is stepped.

    The between-sample share of the variance (different latents ``z`` give different expected
    gradients) depends strongly on the checkpoint, so the ``(R, 1) -> (R, 16)`` ratio does too:
    on one H200 at R = 8 the stratified cut was 10.9x right after the fake warm-up, 4.9x after
    100 steps and 5.9x after 400, against ceilings ``(V_b + V_w) / V_b`` of 56x, 4.8x and 6.7x
    (``benchmarks/distillation_h200.md``). Pass ``pretrain_steps`` to choose the checkpoint.

    Args:
        quick: small sizes (``R = 4``, 10 pretraining steps, about 10 CPU-seconds with the
            embedded teacher) instead of the paper's ``R = 8`` and 100 pretraining steps.
        seed: seeds everything.
        device: ``"cpu"`` or ``"cuda"``.
        teacher: the real teacher (default: the embedded one; a random stand-in with a warning
            while its weights are missing).
        pretrain_steps: generator steps of pretraining (default: 10 quick, 100 full).
        config: overrides of `DistillationConfig` fields (e.g. ``{"fake_warmup": 5}``).
    """

    name = "distillation"

    def __init__(
        self,
        quick: bool,
        seed: int,
        device: str = "cpu",
        *,
        teacher: Any = None,
        pretrain_steps: int | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.quick = bool(quick)
        self.seed = int(seed)
        settings: dict[str, Any] = {"R": 8, "seed": self.seed, "fd_samples": 1000}
        if self.quick:
            settings.update(R=4, fake_batch=16, fake_warmup=20, fd_samples=500)
        settings.update(config or {})
        self.config = DistillationConfig(**settings).with_estimator("carv")
        if pretrain_steps is None:
            pretrain_steps = 10 if self.quick else 100
        _non_negative_int("pretrain_steps", pretrain_steps)
        self.pretrain_steps = pretrain_steps
        if pretrain_steps:
            history = train_distillation(
                self.config,
                steps=pretrain_steps,
                teacher=teacher,
                device=device,
                evaluate=False,
                progress=False,
            )
            self.distiller = history.distiller
        else:
            pyro.set_rng_seed(self.seed)
            self.distiller = Distiller(self.config, teacher=teacher, device=device)
            self.distiller.fake_step(self.config.fake_warmup)
        self.R = self.config.R
        self._theta = [p.detach().clone() for p in self.distiller.parameters()]

    def configs(self) -> list[dict[str, Any]]:
        """The rows to measure: ``dict(method, R, K, proposal, stratify, noise)``."""
        return _bench_configs(self.R)

    def estimate(self, config: dict[str, Any]) -> Tensor:
        """ONE gradient estimate at the fixed checkpoint for a row of `configs`.

        Args:
            config: ``dict(R=int, K=int, proposal=str, stratify=None|str, noise=str)``
                (``method`` and other keys are ignored).

        Returns:
            ``(P,)`` float64 CPU tensor: the flattened generator gradient.

        Raises:
            ValueError: on non-positive ``R`` / ``K`` or unknown options.
        """
        try:
            R, K = config["R"], config["K"]
        except (KeyError, TypeError):
            raise ValueError(f"config must hold 'R' and 'K', got {config!r}") from None
        _positive_int("R", R)
        guide = self.distiller.guide(
            K, config.get("proposal", "prior"), config.get("stratify"), config.get("noise", "iid")
        )
        return self.distiller.gradient(R, K, guide)

    def reference(self, n: int) -> Tensor:
        """A high-sample reference gradient: the mean of ``n`` estimates at ``R = 8 R_bench``,
        ``K = 16``, stratified per sample (prior proposal).

        Returns:
            ``(P,)`` float64 CPU tensor.
        """
        _positive_int("n", n)
        guide = self.distiller.guide(K_REUSE, "prior", "per_outer", "iid")
        total = None
        for _ in range(n):
            g = self.distiller.gradient(8 * self.R, K_REUSE, guide)
            total = g if total is None else total + g
        return total / n

    def extras(self, budget_seconds: float | None = None) -> dict[str, Any]:
        """Fréchet distance after an equal compute budget, baseline vs CARV, from the checkpoint.

        Args:
            budget_seconds: compute per run (default: 10 quick, 120 full), process CPU seconds
                on a CPU.

        Returns:
            ``{"fd_baseline", "fd_carv", "fd_checkpoint", "budget_s", "steps_baseline",
            "steps_carv", "clock", "fd_samples"}``.
        """
        budget = (10.0 if self.quick else 120.0) if budget_seconds is None else budget_seconds
        budget = _positive_float("budget_seconds", budget)
        out: dict[str, Any] = {"budget_s": budget, "fd_samples": self.config.fd_samples}
        out["fd_checkpoint"] = fid_digits(
            self.distiller.generator, self.config.fd_samples, seed=self.seed
        )
        for name in ("baseline", "carv"):
            history = train_distillation(
                self.config,
                name,
                budget_seconds=budget,
                init=self.distiller,
                progress=False,
            )
            out[f"fd_{name}"] = history.final_fd
            out[f"steps_{name}"] = history.steps
            out["clock"] = history.clock
        return out

    def checkpoint_unchanged(self) -> bool:
        """Whether the generator still holds the checkpoint's parameters."""
        return all(torch.equal(a, b) for a, b in zip(self._theta, self.distiller.parameters()))
