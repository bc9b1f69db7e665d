"""`dmd_objective`: DMD's distribution-matching gradient, declared as a teacher objective."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ... import _checks
from ...objectives import NoisedBatch, TeacherObjective
from ...teachers.base import AbstractTeacher

__all__ = ["dmd_objective"]


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
        A residual [`TeacherObjective`][carv_pyro.objectives.TeacherObjective] over ``real``, with
        the fake teacher as its ``fake`` attribute. Its residual on a flat batch of ``N`` draws
        is ``(N, *event)``.

    Raises:
        ValueError: if ``fake``'s event shape differs from ``real``'s, or on bad parts.
        TypeError: if ``fake`` is not a teacher.
    """
    _checks.instance("fake", fake, AbstractTeacher, "an AbstractTeacher")
    if tuple(fake.event_shape) != tuple(real.event_shape):
        raise ValueError(
            f"fake teacher takes {tuple(fake.event_shape)} but real takes {tuple(real.event_shape)}"
        )
    floor = _checks.positive_float("floor", floor)
    _checks.choice("normalize", normalize, (True, False))

    def dmd_residual(batch: NoisedBatch) -> Tensor:
        eps_real = batch.eps_hat()  # (N, *event)
        diff = eps_real - batch.eps_hat(fake, guidance_scale=1.0)
        if normalize:
            scale = (eps_real - batch.eps).abs().flatten(1).mean(1).clamp_min(floor)  # (N,)
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
