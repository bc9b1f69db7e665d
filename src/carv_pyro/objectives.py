"""Declarative teacher objectives.

A teacher objective is the integrand of a diffusion-teacher expectation, declared from parts:

- a timestep prior ``p(t)`` (by default uniform over ``int(lo T) .. int(hi T)``),
- a weighting ``w(t)`` (``"sds"``, ``"uniform"``, ``"fantasia3d"`` or a callable),
- either a *residual* ``r(batch)`` in x-space (the gradient w.r.t. ``x`` is ``w(t) r``, as in
  SDS, VSD and DMD) or a per-draw *loss* ``l(batch)`` whose own gradient is wanted (as in the
  denoising loss behind data attribution).

The estimator code (plates, proposals, importance weights, stratification) never changes: a
new objective is a new set of parts. For example, SDS with its residual declared by hand:

```python
def eps_residual(batch):
    return batch.eps_hat() - batch.eps

my_sds = TeacherObjective(teacher, residual=eps_residual, weighting="sds", guidance_scale=7.5)
```
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _checks
from .schedules import DiscreteSchedule
from .teachers.base import AbstractTeacher
from .timesteps import AbstractTimestepDistribution, UniformTimesteps

__all__ = [
    "NoisedBatch",
    "TermOutput",
    "TeacherObjective",
    "SDS",
    "ScoreDifference",
    "DenoisingLoss",
    "WEIGHTINGS",
    "RESIDUAL_HOOK",
    "eps_control_variate",
    "eps_residual",
]

#: The one hook of control variates: while an estimator applies them (see
#: [`carv_pyro.infer.control_variates`][carv_pyro.infer.control_variates]) it holds a callable
#: ``hook(objective, batch, r) -> r'`` that `TeacherObjective.evaluate` calls on the residual of
#: an objective that declares control variates; ``None`` otherwise (the residual as declared).
RESIDUAL_HOOK: ContextVar[Callable | None] = ContextVar("carv_residual_hook", default=None)


def _w_sds(schedule: DiscreteSchedule, t: Tensor) -> Tensor:
    return schedule.sigma(t, like=torch.empty((), dtype=torch.float64)) ** 2


def _w_uniform(schedule: DiscreteSchedule, t: Tensor) -> Tensor:
    return torch.ones(t.shape, dtype=torch.float64, device=t.device)


def _w_fantasia3d(schedule: DiscreteSchedule, t: Tensor) -> Tensor:
    f64 = torch.empty((), dtype=torch.float64)
    return schedule.alpha(t, like=f64) * schedule.sigma(t, like=f64) ** 2


#: Named weightings ``w(t)`` as in threestudio: ``sds`` is ``1 - alphabar_t`` (DreamFusion),
#: ``uniform`` is 1, ``fantasia3d`` is ``sqrt(alphabar_t) (1 - alphabar_t)``.
WEIGHTINGS: dict[str, Callable[[DiscreteSchedule, Tensor], Tensor]] = {
    "sds": _w_sds,
    "uniform": _w_uniform,
    "fantasia3d": _w_fantasia3d,
}


@dataclass
class NoisedBatch:
    """What a residual or loss sees: a flat batch of ``N`` noised draws.

    Attributes:
        x: ``(N, *event)`` clean samples (detached for residual objectives).
        t: ``(N,)`` integer timesteps.
        eps: ``(N, *event)`` standard normal noise.
        x_t: ``(N, *event)`` noised samples ``alpha_t x + sigma_t eps``.
        alpha: ``(N, 1, ..., 1)`` signal scales, broadcastable against ``x``.
        sigma: ``(N, 1, ..., 1)`` noise scales.
        cond: ``(N, *cond_event)`` teacher conditioning or ``None``.
        teacher: the objective's teacher.
        guidance_scale: the classifier-free guidance scale.
    """

    x: Tensor
    t: Tensor
    eps: Tensor
    x_t: Tensor
    alpha: Tensor
    sigma: Tensor
    cond: Tensor | None
    teacher: AbstractTeacher
    guidance_scale: float
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def eps_hat(
        self,
        teacher: AbstractTeacher | None = None,
        cond: Any = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """The teacher's noise prediction at ``(x_t, t)``: ``(N, *event)``, cached.

        Args:
            teacher: another teacher to ask (e.g. a "fake" score network); default the
                objective's teacher.
            cond: conditioning for that teacher (default: the batch's).
            guidance_scale: default: the objective's for its own teacher, 1 for another.
        """
        other = teacher is not None and teacher is not self.teacher
        teacher = self.teacher if teacher is None else teacher
        cond = self.cond if cond is None else cond
        scale = (
            (1.0 if other else self.guidance_scale) if guidance_scale is None else guidance_scale
        )
        key = f"{id(teacher)}:{id(cond)}:{scale}"
        if key not in self._cache:
            self._cache[key] = teacher.predict_eps(self.x_t, self.t, cond, guidance_scale=scale)
        return self._cache[key]


@dataclass
class TermOutput:
    """Per-draw output of an objective on a flat batch.

    Attributes:
        value: ``(N,)`` the reported per-draw loss (``0.5 ||w r||^2`` for residual objectives,
            as threestudio reports SDS).
        surrogate: ``(N,)`` a differentiable per-draw surrogate whose gradient is the per-draw
            gradient estimate (``<x, (w r).detach()>`` for residual objectives).
        residual: ``(N, *event)`` the weighted residual ``w(t) r`` (detached), or ``None`` for
            loss objectives.
        nonfinite: ``(N,)`` bool, draws whose residual or loss is NaN or infinite. Their
            residual, value and surrogate are zeroed so that the gradient of the others stays
            finite; the loss decides whether to raise or to drop them.
    """

    value: Tensor
    surrogate: Tensor
    residual: Tensor | None
    nonfinite: Tensor


def eps_residual(batch: NoisedBatch) -> Tensor:
    """The SDS residual ``eps_hat(x_t, t, y) - eps``."""
    return batch.eps_hat() - batch.eps


def eps_control_variate(batch: NoisedBatch) -> Tensor:
    """The control variate ``eps``: ``(N, *event)``, zero-mean given ``x`` and ``t`` (SDS
    subtracts it with coefficient one; an estimator with control variates tunes the coefficient
    per timestep)."""
    return batch.eps


def _check_weighting(
    fn: Callable[[DiscreteSchedule, Tensor], Tensor],
    schedule: DiscreteSchedule,
    prior: AbstractTimestepDistribution,
) -> None:
    """Call a weighting callable once on the prior's support and check what it returns.

    A weighting is ``w(schedule, t) -> (N,)`` real, finite and non-negative for ``(N,)`` integer
    ``t``. Calling it once here turns a wrong signature or output into an error at construction
    instead of a Python error deep inside the first step.

    Raises:
        TypeError: if the call fails or returns something that is not a real tensor of ``t``'s
            shape.
        ValueError: if a weight is negative or not finite.
    """
    t = torch.nonzero(prior.probs() > 0).reshape(-1)
    expected = "a callable (schedule, t) -> w, with w a real tensor of t's shape (N,)"
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        w = fn(schedule, t)
    except Exception as error:  # noqa: BLE001 - any failure here is a wrong weighting
        raise TypeError(
            f"weighting {name!r} failed when called as weighting(schedule, t) with t an ({len(t)},) "
            f"long tensor of the prior's support ({type(error).__name__}: {error}); a weighting "
            f"must be {expected}"
        ) from error
    try:
        w = torch.as_tensor(w)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"weighting {name!r} returned {type(w).__name__}; it must be {expected}"
        ) from None
    if w.dtype == torch.bool or w.dtype.is_complex or tuple(w.shape) != tuple(t.shape):
        raise TypeError(
            f"weighting {name!r} returned a {w.dtype} tensor of shape {tuple(w.shape)} for t of "
            f"shape {tuple(t.shape)}; it must be {expected}"
        )
    w = w.double()
    if not torch.isfinite(w).all() or (w < 0).any():
        bad = t[~(torch.isfinite(w) & (w >= 0))]
        raise ValueError(
            f"weighting {name!r} must be finite and non-negative on the prior's support, got "
            f"{w[~(torch.isfinite(w) & (w >= 0))][:3].tolist()} at t = {bad[:3].tolist()}"
        )


def _nonfinite_rows(h: Tensor) -> Tensor:
    """``(N,)`` bool: rows of ``h`` holding a NaN or an infinity.

    ``max |h|`` over a row is NaN or infinite exactly when the row holds a NaN or an infinity
    (``amax`` propagates NaN), and it is one reduction instead of an elementwise ``isfinite``
    and an ``all`` (three times cheaper on the CPU).
    """
    flat = h.flatten(1)
    if flat.shape[1] == 0:
        return torch.zeros(flat.shape[0], dtype=torch.bool, device=h.device)
    return ~(flat.abs().amax(1) < float("inf"))


class TeacherObjective:
    """A teacher objective declared from a prior, a weighting and a residual (or a loss).

    Args:
        teacher: the frozen teacher.
        residual: ``callable(NoisedBatch) -> (N, *event)`` residual in x-space; the per-draw
            gradient w.r.t. ``x`` is ``w(t) * residual``. Give this or ``loss``.
        loss: ``callable(NoisedBatch) -> (N,)`` differentiable per-draw loss (gradients flow
            wherever it depends on parameters, e.g. the teacher's weights for attribution).
        weighting: ``"sds"``, ``"uniform"``, ``"fantasia3d"`` or ``callable(schedule, t) -> w``.
        prior: a timestep prior; default ``UniformTimesteps(T, t_range)``.
        t_range: ``(lo, hi)`` in ``[0, 1)`` for the default prior.
        guidance_scale: classifier-free guidance scale passed to the teacher.
        control_variates: zero-mean terms of a residual objective, each a callable
            ``(NoisedBatch) -> (N, *event)`` whose mean given ``x`` and ``t`` is zero (e.g.
            `eps_control_variate`, or a
            [`SteinControlVariate`][carv_pyro.infer.control_variates.SteinControlVariate]). They
            change nothing by themselves: an estimator with ``control_variates=True`` fits their
            coefficients online and subtracts them from the residual (the objective is kept).
            Settable later as the ``control_variates`` attribute.

    Raises:
        ValueError: on an unknown weighting, both or neither of ``residual`` / ``loss``, a bad
            ``t_range``, a ``guidance_scale`` that is not finite and positive, or a weighting
            callable whose weights on the prior's support are negative or not finite.
        TypeError: on a teacher, prior, residual or loss of the wrong type, or a weighting
            callable of the wrong signature (it is called once here, on the prior's support,
            and must return a real tensor of ``t``'s shape).
    """

    def __init__(
        self,
        teacher: AbstractTeacher,
        *,
        residual: Callable[[NoisedBatch], Tensor] | None = None,
        loss: Callable[[NoisedBatch], Tensor] | None = None,
        weighting: str | Callable[[DiscreteSchedule, Tensor], Tensor] = "uniform",
        prior: AbstractTimestepDistribution | None = None,
        t_range: tuple[float, float] = (0.02, 0.98),
        guidance_scale: float = 1.0,
        control_variates: Sequence[Callable[[NoisedBatch], Tensor]] = (),
    ):
        if not isinstance(teacher, AbstractTeacher):
            raise TypeError(f"teacher must be an AbstractTeacher, got {type(teacher).__name__}")
        if (residual is None) == (loss is None):
            raise ValueError("give exactly one of `residual` (x-space) or `loss` (per draw)")
        for arg, fn in (("residual", residual), ("loss", loss)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"{arg} must be a callable (NoisedBatch) -> Tensor, got "
                    f"{type(fn).__name__} ({fn!r:.80})"
                )
        if isinstance(weighting, str):
            if weighting not in WEIGHTINGS:
                raise ValueError(
                    f"unknown weighting {weighting!r}; expected one of {sorted(WEIGHTINGS)} "
                    f"or a callable (schedule, t) -> w"
                )
            weighting_name = weighting
            weighting_fn = WEIGHTINGS[weighting]
        elif callable(weighting):
            weighting_name = getattr(weighting, "__name__", "custom")
            weighting_fn = weighting
        else:
            raise ValueError(f"weighting must be a name or a callable, got {weighting!r}")
        if isinstance(guidance_scale, numbers.Real) and not isinstance(guidance_scale, bool):
            guidance_scale = float(guidance_scale)  # numpy scalars too
        guidance_scale = _checks.positive_float("guidance_scale", guidance_scale)
        if prior is not None and not isinstance(prior, AbstractTimestepDistribution):
            raise TypeError(
                f"prior must be an AbstractTimestepDistribution (e.g. "
                f"carv_pyro.timesteps.UniformTimesteps) or None, got {type(prior).__name__}"
            )
        schedule = teacher.schedule
        prior = prior if prior is not None else UniformTimesteps(schedule.num_timesteps, t_range)
        if prior.num_timesteps != schedule.num_timesteps:
            raise ValueError(
                f"prior has {prior.num_timesteps} timesteps but the teacher's schedule "
                f"{schedule.num_timesteps}"
            )
        if weighting_fn is not WEIGHTINGS.get(weighting_name):
            _check_weighting(weighting_fn, schedule, prior)
        self.weighting_name = weighting_name
        self._weighting = weighting_fn
        self.teacher = teacher
        self.schedule = schedule
        self.prior = prior
        self.residual_fn = residual
        self.loss_fn = loss
        self.guidance_scale = guidance_scale
        self.control_variates = control_variates

    @property
    def control_variates(self) -> tuple[Callable[[NoisedBatch], Tensor], ...]:
        """The declared control variates (see the class docstring)."""
        return self._control_variates

    @control_variates.setter
    def control_variates(self, cvs: Sequence[Callable[[NoisedBatch], Tensor]]) -> None:
        if callable(cvs) or isinstance(cvs, (str, bytes)) or not isinstance(cvs, Sequence):
            raise TypeError(
                f"control_variates must be a sequence of callables (NoisedBatch) -> Tensor, got "
                f"{cvs!r:.80}"
            )
        for cv in cvs:
            if not callable(cv):
                raise TypeError(
                    f"control_variates must hold callables (NoisedBatch) -> Tensor, got {cv!r:.80}"
                )
        if cvs and self.residual_fn is None:
            raise ValueError("control_variates apply to residual objectives, not loss objectives")
        self._control_variates = tuple(cvs)

    @property
    def event_shape(self) -> torch.Size:
        """Shape of one clean sample ``x`` the teacher takes."""
        return torch.Size(self.teacher.event_shape)

    @property
    def is_residual(self) -> bool:
        """Whether the objective is declared by an x-space residual (else by a loss)."""
        return self.residual_fn is not None

    def weight(self, t: Tensor) -> Tensor:
        """``w(t)`` as float64 with the shape of ``t``."""
        return torch.as_tensor(self._weighting(self.schedule, t), dtype=torch.float64)

    def noised(self, x: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None) -> NoisedBatch:
        """Noise a flat batch: ``x_t = alpha_t x + sigma_t eps``.

        Args:
            x: ``(N, *event)``; t: ``(N,)``; eps: ``(N, *event)``; cond: ``(N, ...)`` or None.
        """
        return self._noised(x, self.schedule.check_timesteps(t), eps, cond)

    def _noised(self, x: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None) -> NoisedBatch:
        """`noised` for ``t`` already checked by the schedule's ``check_timesteps``."""
        view = (-1,) + (1,) * (x.dim() - 1)
        alpha = self.schedule.lookup("alpha", t, x.dtype).reshape(view)
        sigma = self.schedule.lookup("sigma", t, x.dtype).reshape(view)
        return NoisedBatch(
            x=x,
            t=t,
            eps=eps,
            x_t=alpha * x + sigma * eps,
            alpha=alpha,
            sigma=sigma,
            cond=cond,
            teacher=self.teacher,
            guidance_scale=self.guidance_scale,
        )

    def _weight_of(self, t: Tensor) -> Tensor:
        """`weight` for checked ``t``; a named weighting is one gather from its table over all
        timesteps, made once per device (named weightings are elementwise in ``t``, so the
        table's entries are exactly the weights; a user's callable is called as declared)."""
        if self._weighting is not WEIGHTINGS.get(self.weighting_name):
            return self.weight(t)
        cache = self.__dict__.setdefault("_weight_tables", {})
        key = (t.device, self._weighting, id(self.schedule))
        hit = cache.get(key)
        if hit is None or hit[0] is not self.schedule:
            steps = torch.arange(self.schedule.num_timesteps, device=t.device)
            hit = cache[key] = (self.schedule, self.weight(steps))
        return hit[1][t]

    def evaluate(self, x: Tensor, t: Tensor, eps: Tensor, cond: Tensor | None = None) -> TermOutput:
        """Per-draw value and surrogate on a flat batch (one batched teacher call).

        Args:
            x: ``(N, *event)`` clean samples (may require grad).
            t: ``(N,)`` integer timesteps.
            eps: ``(N, *event)`` noise.
            cond: ``(N, *cond_event)`` conditioning or ``None``.
        """
        view = (-1,) + (1,) * (x.dim() - 1)
        t = self.schedule.check_timesteps(t)  # once here, not per table lookup
        w = self._weight_of(t).to(x.dtype).to(x.device)
        if self.residual_fn is not None:
            with torch.no_grad():
                batch = self._noised(x.detach(), t, eps, cond)
                r = self.residual_fn(batch)
                if r.shape != x.shape:
                    raise ValueError(
                        f"the residual returned shape {tuple(r.shape)}; expected {tuple(x.shape)}"
                    )
                hook = RESIDUAL_HOOK.get()
                if hook is not None and self._control_variates:
                    r = hook(self, batch, r)
                h = w.reshape(view) * r
            nonfinite = _nonfinite_rows(h)
            # on the CPU reading the flag is free and the masking pass is not; on an accelerator
            # the mask is applied unconditionally, so there is no host round trip
            if h.device.type != "cpu" or bool(nonfinite.any()):
                h = torch.where(nonfinite.reshape(view), h.new_zeros(()), h)
            flat = h.flatten(1)
            value = 0.5 * (flat * flat).sum(1)
            surrogate = (x.flatten(1) * flat).sum(1)
            return TermOutput(value=value, surrogate=surrogate, residual=h, nonfinite=nonfinite)
        batch = self._noised(x, t, eps, cond)
        loss = w * self.loss_fn(batch)
        if loss.shape != t.shape:
            raise ValueError(
                f"the loss returned shape {tuple(loss.shape)}; expected {tuple(t.shape)}"
            )
        nonfinite = ~torch.isfinite(loss.detach())
        loss = torch.where(nonfinite, loss.new_zeros(()), loss)
        return TermOutput(value=loss.detach(), surrogate=loss, residual=None, nonfinite=nonfinite)

    def __repr__(self) -> str:
        kind = "residual" if self.is_residual else "loss"
        return (
            f"{type(self).__name__}({kind}, weighting={self.weighting_name!r}, "
            f"prior={self.prior!r}, guidance_scale={self.guidance_scale})"
        )


class SDS(TeacherObjective):
    """Score distillation sampling (DreamFusion): residual ``w(t) (eps_hat - eps)``.

    The guided prediction is ``eps_hat = eps_u + s (eps_c - eps_u)`` with ``s = guidance_scale``
    (``s = 1``: the conditional prediction, no guidance), the convention of diffusers'
    ``StableDiffusionPipeline``: its ``guidance_scale=7.5`` is ``7.5`` here. Other tools count
    from zero instead, ``eps_c + s (eps_c - eps_u) = eps_u + (s + 1) (eps_c - eps_u)``, and their
    scale is one more here:

    - DreamFusion's ``(1 + w) eps_c - w eps_u`` with ``w = 100``: ``guidance_scale=101``;
    - threestudio's stock ``stable-diffusion-guidance`` (``guidance_scale: 100.`` in
      ``configs/dreamfusion-sd.yaml``) and ``deep-floyd-guidance`` (``20.``): ``101`` and ``21``.

    threestudio is not uniform: its ``stable-diffusion-vsd-guidance`` ("aligned with diffusers,
    but different from other guidance", says its source), ``stable-diffusion-unified-guidance``
    and the perp-neg branch of the stock guidance use ``eps_u + s (eps_c - eps_u)``, so their
    scale carries over unchanged.

    Args:
        teacher: the frozen teacher.
        weighting: ``"sds"`` (``1 - alphabar_t``), ``"uniform"`` or ``"fantasia3d"``.
        t_range: ``p(t)`` is uniform over the integer steps ``int(lo T) .. int(hi T)``.
        guidance_scale: ``s`` in ``eps_u + s (eps_c - eps_u)`` (diffusers' convention; add one to
            a DreamFusion or stock-threestudio scale, see above).
        prior: ``p(t)`` itself, instead of the uniform one over ``t_range``.
    """

    def __init__(
        self,
        teacher: AbstractTeacher,
        weighting: str | Callable[[DiscreteSchedule, Tensor], Tensor] = "sds",
        t_range: tuple[float, float] = (0.02, 0.98),
        guidance_scale: float = 1.0,
        prior: AbstractTimestepDistribution | None = None,
    ):
        super().__init__(
            teacher,
            residual=eps_residual,
            weighting=weighting,
            prior=prior,
            t_range=t_range,
            guidance_scale=guidance_scale,
            control_variates=(eps_control_variate,),
        )


class ScoreDifference(TeacherObjective):
    """Score difference of a real and a fake teacher: residual ``w(t) (eps_real - eps_fake)``.

    The sign is the descent direction, as for SDS (``eps_hat - eps``): the fake score is the
    student's own, so ``s_fake - s_real = (eps_real - eps_fake) / sigma_t`` is the gradient of
    ``KL(p_fake || p_real)`` w.r.t. the sample.

    The VSD (ProlificDreamer) and DMD distribution-matching gradient; ``fake`` is a score model of
    the student's own samples, trained alongside.

    Args:
        real: the frozen teacher of the data.
        fake: the score network of the generated distribution (may change between steps).
        weighting: as in `SDS`.
        t_range: as in `SDS`.
        guidance_scale: classifier-free guidance scale for ``real`` (``fake`` runs unguided).
        prior: an explicit timestep prior instead of ``t_range``.
    """

    def __init__(
        self,
        real: AbstractTeacher,
        fake: AbstractTeacher,
        weighting: str | Callable[[DiscreteSchedule, Tensor], Tensor] = "sds",
        t_range: tuple[float, float] = (0.02, 0.98),
        guidance_scale: float = 1.0,
        prior: AbstractTimestepDistribution | None = None,
    ):
        for arg, teacher in (("real", real), ("fake", fake)):
            if not isinstance(teacher, AbstractTeacher):
                raise TypeError(f"{arg} must be an AbstractTeacher, got {type(teacher).__name__}")
        if tuple(fake.event_shape) != tuple(real.event_shape):
            raise ValueError(
                f"fake teacher takes {tuple(fake.event_shape)} but real takes "
                f"{tuple(real.event_shape)}"
            )
        self.fake = fake

        def score_difference(batch: NoisedBatch) -> Tensor:
            return batch.eps_hat() - batch.eps_hat(self.fake, guidance_scale=1.0)

        super().__init__(
            real,
            residual=score_difference,
            weighting=weighting,
            prior=prior,
            t_range=t_range,
            guidance_scale=guidance_scale,
        )


class DenoisingLoss(TeacherObjective):
    """The teacher's own denoising loss ``w(t) ||eps_hat(x_t, t) - eps||^2`` per draw.

    Its gradient w.r.t. the teacher's weights (set ``teacher.requires_grad = True``) is the
    per-example feature behind TRAK-style data attribution (D-TRAK).

    Args:
        teacher: the teacher whose loss is taken.
        weighting: as in `TeacherObjective` (default ``"uniform"``).
        t_range: the prior's range.
        reduction: ``"sum"`` or ``"mean"`` over the event dimensions.
    """

    def __init__(
        self,
        teacher: AbstractTeacher,
        weighting: str | Callable[[DiscreteSchedule, Tensor], Tensor] = "uniform",
        t_range: tuple[float, float] = (0.0, 0.999),
        reduction: str = "mean",
        prior: AbstractTimestepDistribution | None = None,
    ):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

        def denoising_loss(batch: NoisedBatch) -> Tensor:
            sq = (batch.eps_hat() - batch.eps).flatten(1) ** 2
            return sq.sum(1) if self.reduction == "sum" else sq.mean(1)

        super().__init__(
            teacher, loss=denoising_loss, weighting=weighting, prior=prior, t_range=t_range
        )
