"""The estimator, shaped like ``pyro.infer``: primitives, samplers, proposals, guide, loss.

- [`primitives`][carv_pyro.infer.primitives]: `teacher_term` and the reserved inner plate `draws`;
- [`samplers`][carv_pyro.infer.samplers]: seedable base samples and the stratified / QMC designs;
- [`proposals`][carv_pyro.infer.proposals]: timestep proposals ``q(t)`` and their registry;
- [`outer`][carv_pyro.infer.outer]: outer-plate designs of the upstream latents (stratified,
  antithetic, scrambled Sobol);
- [`guide`][carv_pyro.infer.guide]: `TimestepGuide`, an effect-based Pyro guide;
- [`estimator`][carv_pyro.infer.estimator]: `Estimator`, the validated estimator object;
- [`loss`][carv_pyro.infer.loss]: `CARVLoss` and its observer protocol;
- [`distributed`][carv_pyro.infer.distributed]: the outer plate sharded over processes.
"""

from .estimator import PRESETS, Estimator, resolve_estimator
from .guide import TimestepGuide
from .loss import CARVLoss, LossObserver, NonFiniteTeacherError, StepReport
from .primitives import TermRecord, draws, teacher_term

__all__ = [
    "PRESETS",
    "CARVLoss",
    "Estimator",
    "LossObserver",
    "NonFiniteTeacherError",
    "StepReport",
    "TermRecord",
    "TimestepGuide",
    "draws",
    "resolve_estimator",
    "teacher_term",
]
