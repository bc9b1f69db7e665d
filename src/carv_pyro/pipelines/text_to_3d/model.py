"""The text-to-3D SDS objective as a plain Pyro model.

```python
field = VoxelField(32, seed=0)
scene = make_scene("shapes", "torus")
sds = carv_pyro.SDS(scene.teacher, guidance_scale=scene.guidance_scale)
model = make_model(field, scene, sds, R=4, K=4)
estimator = carv_pyro.Estimator.preset("carv", K=4)
svi = SVI(model, estimator.guide(model), pyro.optim.Adam({"lr": 0.05}), loss=estimator.loss())
```

The camera is an ordinary latent site drawn from its prior in the ``views`` plate (a user guide
may propose it instead); the teacher's ``(t, eps)`` draws fill the reserved inner plate
([`carv_pyro.draws`][carv_pyro.draws]), whose size the estimator sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ... import _checks
from ...infer.primitives import draws, teacher_term
from ...layout import to_device
from ...objectives import TeacherObjective
from ..render import render
from .scene import Scene

__all__ = ["SeededUniform", "make_model"]


class SeededUniform(dist.Uniform):
    """``Uniform(low, high)`` whose draws come from a ``torch.Generator`` (reparameterized).

    A model site with this distribution is an ordinary latent site drawn from its prior; the
    generator only makes the prior draws reproducible without touching the global RNG.
    """

    def __init__(self, low, high, generator: torch.Generator | None = None, validate_args=None):
        self.generator = generator
        super().__init__(low, high, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SeededUniform, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        device = self.generator.device if self.generator is not None else self.low.device
        u = torch.rand(shape, generator=self.generator, dtype=self.low.dtype, device=device)
        # drawn where the generator lives, then queued to the device (no host sync)
        return self.low + to_device(u, self.low.device) * (self.high - self.low)


def make_model(
    field: nn.Module,
    scene: Scene,
    objective: TeacherObjective,
    R: int,
    K: int,
    generator: torch.Generator | None = None,
    *,
    azimuth_deg: tuple[float, float] | None = None,
    elevation_deg: tuple[float, float] | None = None,
    name: str = "sds",
) -> Callable[..., None]:
    """The text-to-3D SDS objective as a plain Pyro model.

    The model registers ``field`` with ``pyro.module("field", field)`` (so ``SVI`` optimizes its
    parameters), draws ``R`` cameras in the ``views`` plate (``dim=-2``) as the latent sites
    ``"azimuth"`` and ``"elevation"`` (radians, ``(R, 1)``) from their uniform priors, renders
    them as the scene's teacher expects (``(R, 1, C, H, W)``), and records the teacher term
    ``name`` with ``K`` draws per view in the reserved ``draws`` plate (``dim=-1``), conditioned
    on the scene's prompt (and, for the shapes teacher, on each view's camera).

    Args:
        field: a [`VoxelField`][carv_pyro.pipelines.render.VoxelField] (or any radiance field).
        scene: the teacher and prompt (see [`make_scene`][carv_pyro.pipelines.text_to_3d.make_scene]).
        objective: the SDS objective over ``scene.teacher``.
        R: default number of views per call.
        K: default inner draws per view (an estimator with ``K`` set overrides it).
        generator: source of the camera prior draws (global RNG if ``None``).
        azimuth_deg: the azimuth prior's ``(low, high)`` in degrees (default: the scene's).
        elevation_deg: the elevation prior's ``(low, high)`` (default: the scene's).
        name: the teacher term's site name.

    Returns:
        ``model(R=R, K=K)``.
    """
    _checks.positive_int("R", R)
    _checks.positive_int("K", K)
    p = next(field.parameters())
    like = {"dtype": p.dtype, "device": p.device}
    az = azimuth_deg if azimuth_deg is not None else scene.azimuth_deg
    el = elevation_deg if elevation_deg is not None else scene.elevation_deg
    az_lo, az_hi = (torch.tensor(math.radians(a), **like) for a in az)
    el_lo, el_hi = (torch.tensor(math.radians(e), **like) for e in el)
    render_kwargs = dict(scene.render_kwargs)
    default_R, default_K = R, K

    def model(R: int = default_R, K: int = default_K) -> None:
        pyro.module("field", field)
        # Pyro's argument and support validation read values back from the device (a host
        # sync on a GPU): it runs where host checks do (the CPU, or CARVLoss(checks=True))
        check = None if _checks.host_checks(az_lo.device) else False
        with pyro.plate("views", R, dim=-2):
            azimuth = pyro.sample("azimuth", SeededUniform(az_lo, az_hi, generator, check))
            elevation = pyro.sample("elevation", SeededUniform(el_lo, el_hi, generator, check))
            image = render(field, azimuth, elevation, **render_kwargs)  # (R, 1, C, H, W)
            cond = scene.cond(azimuth, elevation)
            with draws(K, "draws", dim=-1):
                teacher_term(name, objective, image, cond=cond)

    return model
