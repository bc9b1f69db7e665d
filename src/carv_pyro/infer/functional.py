"""The estimator from a plain-PyTorch loop: a loss whose gradient is the CARV estimate.

Most SDS, DMD and attribution loops are plain PyTorch (threestudio on Lightning, DMD2 on
Accelerate). `TeacherLoss` puts the same estimator behind one call: given the upstream output
``x`` of shape ``(R, *event)`` (a batch of renders, generator samples...), it draws the inner
plate (``K`` timesteps and noises per row, by the estimator's proposal, stratification and noise
design), calls the teacher once on all ``R K`` draws, and returns a scalar loss whose gradient
w.r.t. everything ``x`` depends on is the unbiased CARV estimate of ``E[J^T h]``:

```python
sds_loss = carv.TeacherLoss(carv.SDS(teacher, guidance_scale=7.5), carv.Estimator.preset("carv"))
for step in range(n):
    x = render(params, cameras())            # (R, C, H, W), differentiable
    loss, info = sds_loss(x, cond=prompt)    # info: K, ess, value
    loss.backward()
    optimizer.step(); optimizer.zero_grad()
```

Pyro runs underneath (a two-plate model over ``x``, in a private param store) and the same
unbiasedness tests hold: ``tests/test_functional.py`` drives it from a hand-written loop against a
closed form. The loss value is threestudio's convention for SDS, ``0.5 ||w r||^2`` per draw,
averaged; its gradient is the plate average of ``<x, (w r).detach()>``, i.e. threestudio's
``0.5 * mse(x, (x - grad).detach(), reduction="sum") / batch``.
"""

from __future__ import annotations

from typing import Any

import pyro
from torch import Tensor

from .. import _checks
from ..objectives import TeacherObjective
from .estimator import Estimator, resolve_estimator
from .primitives import draws, teacher_term

__all__ = ["TeacherLoss", "teacher_loss"]


class TeacherLoss:
    """A callable loss for plain-PyTorch loops: ``loss, info = teacher_loss(x, cond)``.

    Args:
        objective: the teacher objective (e.g. [`SDS`][carv_pyro.SDS]).
        estimator: an [`Estimator`][carv_pyro.Estimator] or a preset name with a fixed ``K``
            (draws per row). An adapting estimator (``"auto"``) is refused: its accountant
            measures ``V_b``, ``V_w`` and the upstream's cost as gradients and times of the
            parameters upstream of ``x``, which this loss never sees; choose ``K`` with
            [`measure`][carv_pyro.measure.measure] or run the model through
            [`CARVLoss`][carv_pyro.CARVLoss]. Learning proposals (``"adaptive"``) and control
            variates learn across calls.
        seed: seeds the estimator's draws (reproducible per device); ``None``: torch's global
            generators.
        name: the teacher term's name (``"sds"``).

    Raises:
        TypeError / ValueError: naming a bad argument.
    """

    def __init__(
        self,
        objective: TeacherObjective,
        estimator: Estimator | str = "carv",
        *,
        seed: int | None = None,
        name: str = "sds",
    ):
        _checks.instance("objective", objective, TeacherObjective, "a TeacherObjective")
        self.objective = objective
        self.estimator = resolve_estimator(estimator)
        if self.estimator.K is None:
            raise ValueError("estimator must set K (draws per row of x) for a TeacherLoss")
        if self.estimator.adapt:
            raise ValueError(
                f"estimator {self.estimator.name!r} adapts K from gradients and costs of the "
                f"parameters upstream of x, which a TeacherLoss never sees; pass an estimator "
                f"with a fixed K (e.g. Estimator.preset('carv', K=4), K chosen with "
                f"carv_pyro.measure.measure), or write the upstream into a Pyro model for CARVLoss"
            )
        self.guide = self.estimator.guide(seed=seed)
        self.loss = self.estimator.loss()
        self.name = _checks.instance("name", name, str, "a string")
        self._store: dict[str, Any] = {"params": {}, "constraints": {}}

    def __call__(self, x: Tensor, cond: Any = None) -> tuple[Tensor, dict[str, float]]:
        """The loss of one batch.

        Args:
            x: ``(R, *event)`` upstream outputs (floating point, differentiable).
            cond: the teacher's conditioning: one item for all rows, or ``(R, ...)`` per row.

        Returns:
            ``(loss, info)``: a scalar whose ``backward()`` accumulates the CARV estimate into
            whatever ``x`` depends on, and ``{"K", "ess", "value"}``.

        Raises:
            TypeError / ValueError: on an ``x`` of the wrong type or shape.
        """
        _checks.instance("x", x, Tensor, "a torch.Tensor of shape (R, *event)")
        event = tuple(self.objective.event_shape)
        if x.dim() != len(event) + 1 or tuple(x.shape[1:]) != event or x.shape[0] == 0:
            raise ValueError(
                f"x must have shape (R, {', '.join(map(str, event))}) with R >= 1 rows for this "
                f"teacher, got {tuple(x.shape)}"
            )
        R = x.shape[0]
        rows = x.unsqueeze(1)  # (R, 1, *event): one upstream sample per row of the outer plate
        if (
            cond is not None
            and isinstance(cond, Tensor)
            and cond.dim() > len(self.objective.teacher.cond_event_shape or ())
        ):
            cond = cond.unsqueeze(1)  # (R, 1, ...) broadcasts over the draws
        name, objective, K = self.name, self.objective, self.estimator.K

        def model() -> None:
            with pyro.plate("rows", R, dim=-2), draws(K, "draws", dim=-1):
                teacher_term(name, objective, rows, cond=cond)

        with pyro.get_param_store().scope(self._store):
            loss = self.loss.differentiable_loss(model, self.guide)
            # learning proposals and control variates learn from each call's draws (they shape
            # the next call's draws only, so every estimate stays unbiased)
            self.guide.update(self.loss.last_records)
        d = self.loss.diagnostics[name]
        info = {"K": float(self.loss.last_records[0].n_inner), "ess": d.ess, "value": d.value}
        return loss, info


def teacher_loss(
    objective: TeacherObjective,
    x: Tensor,
    cond: Any = None,
    *,
    estimator: Estimator | str = "carv",
    seed: int | None = None,
) -> Tensor:
    """One call of a fresh `TeacherLoss` (for loops that keep no state): the loss only.

    Args:
        objective: the teacher objective.
        x: ``(R, *event)`` upstream outputs.
        cond: the conditioning.
        estimator: an estimator or preset name with a fixed ``K``.
        seed: seeds the draws.
    """
    return TeacherLoss(objective, estimator, seed=seed)(x, cond)[0]
