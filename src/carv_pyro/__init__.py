"""carv-pyro: cheaper gradients from frozen diffusion teachers, as a Pyro plugin.

The teacher objective is a Pyro model with nested plates (outer: upstream samples; inner: cheap
``(t, eps)`` resamples), [`TimestepGuide`][carv_pyro.guides.TimestepGuide] proposes timesteps by importance
sampling and stratified inverse CDF, and `CARVLoss` turns it all into an unbiased gradient
estimate for ``pyro.infer.SVI``.
"""

from . import accounting, distributed, guides, objectives, proposals, schedules, teachers
from .accounting import Accountant
from .guides import TimestepGuide
from .loss import CARVLoss, NonFiniteTeacherError
from .objectives import SDS, DenoisingLoss, ScoreDifference, TeacherObjective
from .primitives import teacher_term

__version__ = "0.1.0"

__all__ = [
    "Accountant",
    "CARVLoss",
    "NonFiniteTeacherError",
    "SDS",
    "DenoisingLoss",
    "ScoreDifference",
    "TeacherObjective",
    "TimestepGuide",
    "accounting",
    "distributed",
    "guides",
    "objectives",
    "proposals",
    "schedules",
    "teachers",
    "teacher_term",
]
