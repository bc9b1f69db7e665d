"""carv-pyro: cheaper gradients from frozen diffusion teachers, as a Pyro plugin.

The teacher objective is a Pyro model with nested plates (outer: upstream samples; inner: cheap
``(t, eps)`` resamples in [`draws`][carv_pyro.draws]); an [`Estimator`][carv_pyro.Estimator] says
how the expectation is estimated and builds its [`TimestepGuide`][carv_pyro.TimestepGuide]
(importance sampling and stratified inverse CDF for timesteps, QMC noise), and `CARVLoss` turns
it all into an unbiased gradient estimate for ``pyro.infer.SVI``.

The names below are imported on first use (torch and Pyro take seconds to import, and the
``carv-pyro`` command's ``--help`` should not wait for them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_NAMES = {
    "PRESETS": ".infer.estimator",
    "Estimator": ".infer.estimator",
    "CARVLoss": ".infer.loss",
    "NonFiniteTeacherError": ".infer.loss",
    "TimestepGuide": ".infer.guide",
    "draws": ".infer.primitives",
    "teacher_term": ".infer.primitives",
    "Accountant": ".accounting",
    "TeacherLoss": ".infer.functional",
    "teacher_loss": ".infer.functional",
    "SDS": ".objectives",
    "DenoisingLoss": ".objectives",
    "ScoreDifference": ".objectives",
    "TeacherObjective": ".objectives",
}
_MODULES = (
    "accounting",
    "distributed",
    "guides",
    "infer",
    "layout",
    "measure",
    "objectives",
    "pipelines",
    "proposals",
    "schedules",
    "teachers",
    "timesteps",
)

__all__ = [
    "PRESETS",
    "SDS",
    "Accountant",
    "CARVLoss",
    "DenoisingLoss",
    "Estimator",
    "NonFiniteTeacherError",
    "ScoreDifference",
    "TeacherLoss",
    "TeacherObjective",
    "TimestepGuide",
    "accounting",
    "distributed",
    "draws",
    "guides",
    "infer",
    "layout",
    "measure",
    "objectives",
    "pipelines",
    "proposals",
    "schedules",
    "teacher_loss",
    "teacher_term",
    "teachers",
    "timesteps",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from . import (
        accounting,
        distributed,
        guides,
        infer,
        layout,
        measure,
        objectives,
        pipelines,
        proposals,
        schedules,
        teachers,
        timesteps,
    )
    from .accounting import Accountant
    from .infer.estimator import PRESETS, Estimator
    from .infer.functional import TeacherLoss, teacher_loss
    from .infer.guide import TimestepGuide
    from .infer.loss import CARVLoss, NonFiniteTeacherError
    from .infer.primitives import draws, teacher_term
    from .objectives import SDS, DenoisingLoss, ScoreDifference, TeacherObjective


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
