"""carv-pyro: cheaper gradients from frozen diffusion teachers, as a Pyro plugin.

The teacher objective is a Pyro model with nested plates (outer: upstream samples; inner: cheap
``(t, eps)`` resamples in [`draws`][carv_pyro.draws]); an [`Estimator`][carv_pyro.Estimator] says
how the expectation is estimated and builds its [`TimestepGuide`][carv_pyro.TimestepGuide]
(importance sampling and stratified inverse CDF for timesteps, QMC noise), and `CARVLoss` turns
it all into an unbiased gradient estimate for ``pyro.infer.SVI``.
"""

from . import accounting, distributed, guides, objectives, proposals, schedules, teachers
from .accounting import Accountant
from .infer import (
    PRESETS,
    CARVLoss,
    Estimator,
    NonFiniteTeacherError,
    TimestepGuide,
    draws,
    teacher_term,
)
from .objectives import SDS, DenoisingLoss, ScoreDifference, TeacherObjective

__version__ = "0.2.0"

__all__ = [
    "PRESETS",
    "SDS",
    "Accountant",
    "CARVLoss",
    "DenoisingLoss",
    "Estimator",
    "NonFiniteTeacherError",
    "ScoreDifference",
    "TeacherObjective",
    "TimestepGuide",
    "accounting",
    "distributed",
    "draws",
    "guides",
    "objectives",
    "proposals",
    "schedules",
    "teacher_term",
    "teachers",
]
