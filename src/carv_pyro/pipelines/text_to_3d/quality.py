"""How good a carved object is: 3D IoU against the true shape, and held-out views as judged.

- ``iou``: the soft 3D IoU of the field against the prompt's procedural shape at the field's
  resolution, ``sum min(a, b) / sum max(a, b)`` over voxels, with ``a = min(1, sigma /
  sigma_solid)`` how solid a voxel is (``sigma_solid``: the density at which
  [`field_occupancy`][carv_pyro.pipelines.shapes.field_occupancy] calls it solid) and ``b`` the
  true occupancy; the true shape scores 1. It is
  tied to ground truth and does not saturate: it rises as opacity fills the true shape's voxels
  and falls for haze outside it, from the first steps on, so a blob that a classifier might
  accept scores low, and an early, half-transparent carving already scores above zero.
- ``iou_hard``: the thresholded IoU of
  [`field_occupancy`][carv_pyro.pipelines.shapes.field_occupancy] (solid or not), which stays at
  zero until the carving is opaque.
- ``p`` and ``accuracy``: the teacher's classifier's mean probability of the prompt, and the
  fraction of views it assigns to the prompt, over fixed held-out views spread over the full
  circle (deterministic, so curves compare across runs and estimators).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ... import _checks
from ..render import render
from .scene import Scene

__all__ = ["eval_cameras", "quality", "soft_iou"]


@torch.no_grad()
def soft_iou(field: nn.Module, truth: Tensor) -> float:
    """``sum min(a, b) / sum max(a, b)``: how solid each voxel of the field is, ``a = min(1,
    sigma / sigma_solid)``, against the true ``(D, D, D)`` occupancy ``b`` (the field's layout)."""
    from ..shapes import OCCUPANCY_DENSITY

    density = field.density().detach().double().cpu()
    if density.shape != truth.shape:
        raise ValueError(
            f"the true occupancy has shape {tuple(truth.shape)}, the field {tuple(density.shape)}"
        )
    a = (density / OCCUPANCY_DENSITY).clamp(0.0, 1.0)
    b = truth.double()
    return float(torch.minimum(a, b).sum() / torch.maximum(a, b).sum().clamp_min(1e-12))


def eval_cameras(
    n_views: int = 8,
    elevations_deg: Sequence[float] = (10.0, 35.0),
    azimuth_deg: tuple[float, float] = (-180.0, 180.0),
) -> tuple[Tensor, Tensor]:
    """The fixed held-out cameras: ``n_views`` evenly spaced azimuths at each elevation.

    Azimuths are the midpoints of ``n_views`` equal arcs of ``azimuth_deg`` (so a full circle
    does not count its seam twice), offset from the training draws' grid by construction.

    Returns:
        ``(azimuth, elevation)`` in radians, each ``(len(elevations_deg) * n_views,)`` float64.
    """
    _checks.positive_int("n_views", n_views)
    lo, hi = azimuth_deg
    az = lo + (torch.arange(n_views, dtype=torch.float64) + 0.5) * (hi - lo) / n_views
    el = torch.tensor([float(e) for e in elevations_deg], dtype=torch.float64)
    return torch.deg2rad(az.repeat(el.numel())), torch.deg2rad(el.repeat_interleave(n_views))


@torch.no_grad()
def quality(
    field: nn.Module,
    scene: Scene,
    *,
    n_views: int = 8,
    elevations_deg: Sequence[float] = (10.0, 35.0),
    true_occupancy: Tensor | None = None,
) -> dict[str, float]:
    """The carved field's quality.

    Args:
        field: the field (a `VoxelField`).
        scene: the teacher and prompt.
        n_views: held-out azimuths per elevation, over the full circle.
        elevations_deg: their elevations.
        true_occupancy: the true shape's ``(D, D, D)`` occupancy (default: the scene's).

    Returns:
        ``{"iou", "iou_hard", "p", "accuracy"}`` (the IoUs only where the scene knows the true
        shape).
    """
    from ..shapes import field_occupancy, iou

    out: dict[str, float] = {}
    truth = true_occupancy if true_occupancy is not None else None
    if truth is None and hasattr(field, "resolution"):
        truth = scene.true_occupancy(int(field.resolution))
    if truth is not None:
        truth = truth.cpu()
        out["iou"] = soft_iou(field, truth)
        out["iou_hard"] = float(iou(field_occupancy(field).cpu(), truth))
    azimuth, elevation = eval_cameras(n_views, elevations_deg)
    p = next(field.parameters())
    images = render(
        field, azimuth.to(p.device, p.dtype), elevation.to(p.device, p.dtype), **scene.render_kwargs
    )
    out.update(scene.judge(images))
    return out
