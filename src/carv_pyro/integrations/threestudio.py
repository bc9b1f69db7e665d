"""A threestudio-shaped SDS guidance on the CARV estimator.

threestudio's guidance modules are called with the rendered images and the prompt and return a
dict of named losses that the system weights by its config (``loss.lambda_sds``). `CARVGuidance`
does the same with the keys and scaling of threestudio's stock SDS guidance: ``loss_sds`` (its
gradient w.r.t. the images is the plate average of ``w(t) (eps_hat - eps)``, as
``0.5 * mse(latents, (latents - grad).detach(), reduction="sum") / batch`` gives), and
``grad_norm``; plus ``carv_K`` and ``carv_ess`` to log.

Selecting it from a threestudio config would read (the module registered under a name of your
choice, e.g. ``"carv-sds-guidance"``)::

    guidance_type: "carv-sds-guidance"
    guidance:
      estimator: "carv"       # or stratified, adaptive, ... (a preset with a fixed K)
      K: 8
      guidance_scale: 100.    # threestudio's scale, read as threestudio reads it
    loss:
      lambda_sds: 1.

The guidance scale is read in threestudio's convention by default: its stock SDS guidance
computes ``eps_c + s (eps_c - eps_u)`` (``stable_diffusion_guidance.py``), which is
``eps_u + (s + 1) (eps_c - eps_u)`` in this library's and diffusers' convention, so a config's
100 becomes [`SDS`][carv_pyro.objectives.SDS]'s 101. ``guidance_convention="diffusers"`` reads
the scale as ``eps_u + s (eps_c - eps_u)`` instead (threestudio's VSD and unified guidances, and
diffusers' pipelines, write it so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from ..infer.estimator import Estimator, resolve_estimator
from ..infer.functional import TeacherLoss
from ..objectives import SDS

__all__ = ["CONVENTIONS", "CARVGuidance"]

#: How ``CARVGuidance.guidance_scale`` is read (see the module docstring).
CONVENTIONS = ("threestudio", "diffusers")


@dataclass
class CARVGuidance:
    """SDS guidance whose gradient is estimated by CARV, threestudio-shaped.

    Attributes:
        teacher: the frozen teacher (its images are ``(N, C, H, W)`` in ``[-1, 1]``).
        estimator: preset name or [`Estimator`][carv_pyro.Estimator].
        K: inner draws per image (overrides the preset's).
        guidance_scale: classifier-free guidance scale ``s``, in ``guidance_convention``.
        guidance_convention: ``"threestudio"`` (``eps_c + s (eps_c - eps_u)``, its stock SDS
            guidance's; the default) or ``"diffusers"`` (``eps_u + s (eps_c - eps_u)``, this
            library's own).
        weighting: ``w(t)``: ``"sds"``, ``"uniform"`` or ``"fantasia3d"``.
        t_range: ``(min_step_percent, max_step_percent)``.
        seed: seeds the draws.
    """

    teacher: Any
    estimator: Estimator | str = "carv"
    K: int | None = None
    guidance_scale: float = 100.0
    guidance_convention: str = "threestudio"
    weighting: str = "sds"
    t_range: tuple[float, float] = (0.02, 0.98)
    seed: int | None = None

    def __post_init__(self) -> None:
        _checks.choice("guidance_convention", self.guidance_convention, CONVENTIONS)
        _checks.non_negative_float("guidance_scale", self.guidance_scale)
        est = resolve_estimator(self.estimator)
        if self.K is not None:
            est = est.replace(K=self.K, name=est.name)
        self.objective = SDS(
            self.teacher,
            weighting=self.weighting,
            t_range=self.t_range,
            guidance_scale=self.library_guidance_scale,
        )
        self._loss = TeacherLoss(self.objective, est, seed=self.seed)

    @property
    def library_guidance_scale(self) -> float:
        """``guidance_scale`` in this library's (and diffusers') ``eps_u + s (eps_c - eps_u)``."""
        if self.guidance_convention == "threestudio":
            return self.guidance_scale + 1.0
        return self.guidance_scale

    def __call__(
        self,
        rgb: Tensor,
        cond: Any,
        elevation: Tensor | None = None,
        azimuth: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor | float]:
        """The guidance losses of a batch of renders.

        Args:
            rgb: ``(B, H, W, C)`` renders in ``[0, 1]`` (threestudio's layout).
            cond: the prompt's conditioning for the teacher (one item, or per image); for a
                camera-conditioned teacher with ``cond`` a prompt, ``elevation`` and ``azimuth``
                (degrees, ``(B,)``, threestudio's camera batch) build it per image.
            elevation: ``(B,)`` degrees, for camera-conditioned teachers.
            azimuth: ``(B,)`` degrees.
            **kwargs: threestudio's other arguments (ignored).

        Returns:
            ``{"loss_sds", "grad_norm", "carv_K", "carv_ess"}``.
        """
        x = rgb.permute(0, 3, 1, 2) * 2.0 - 1.0  # (B, C, H, W) in [-1, 1]
        if isinstance(cond, str) and azimuth is not None and hasattr(self.teacher, "cond"):
            az = torch.deg2rad(torch.as_tensor(azimuth, dtype=x.dtype, device=x.device))
            el = torch.deg2rad(torch.as_tensor(elevation, dtype=x.dtype, device=x.device))
            cond = self.teacher.cond(cond, az, el)
        loss, info = self._loss(x, cond)
        record = self._loss.loss.last_records[0]
        with torch.no_grad():
            w = self._loss.loss.last_particle.weights[record.name].to(record.residual.dtype)
            grad = w[(...,) + (None,) * (record.residual.dim() - w.dim())] * record.residual
            grad = grad.mean(1)  # (B, C, H, W): the estimate of E[w (eps_hat - eps)] per image
        return {
            "loss_sds": loss,
            "grad_norm": grad.norm(),
            "carv_K": info["K"],
            "carv_ess": info["ess"],
        }
