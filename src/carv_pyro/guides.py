"""The timestep guide under its stable public path, ``carv_pyro.guides.TimestepGuide``.

It lives in [`carv_pyro.infer.guide`][carv_pyro.infer.guide]; the noise designs in
[`carv_pyro.infer.samplers`][carv_pyro.infer.samplers].
"""

from .infer.guide import TimestepGuide
from .infer.proposals import PROPOSALS
from .infer.samplers import (
    NOISE,
    STRATIFY,
    AbstractNoiseSampler,
    AntitheticNoise,
    IIDNoise,
    SobolNoise,
)

__all__ = [
    "NOISE",
    "PROPOSALS",
    "STRATIFY",
    "AbstractNoiseSampler",
    "AntitheticNoise",
    "IIDNoise",
    "SobolNoise",
    "TimestepGuide",
]
