"""Procedural 3D shapes with known geometry: the shapes teacher's data and the 3D ground truth.

Each class is a signed distance function (SDF) in a fixed canonical pose and size inside the
cube ``[-1, 1]^3`` (world ``(x, y, z)``, ``+z`` up, the conventions of
[`carv_pyro.pipelines.render`][carv_pyro.pipelines.render]). Because the pose is fixed, a field
carved for a class can be scored against the class's true occupancy by 3D IoU (`iou`).

Every shape fits in the ball of radius 0.95, so an orthographic view of half-width 1 (the
renderer's default) frames it from any direction, and fills a good part of the frame. The
classes (`SHAPE_CLASSES`), chosen so that their 3D form differs from most views:

| name | form | size (world units) |
| --- | --- | --- |
| ``sphere`` | ball | radius 0.7 |
| ``cube`` | axis-aligned cube | half side 0.52 |
| ``cylinder`` | solid cylinder, axis ``z`` | radius 0.55, half height 0.6 |
| ``cone`` | solid cone, apex up (``+z``) | base radius 0.68 at ``z = -0.6``, apex ``z = 0.7`` |
| ``torus`` | ring lying in the ``xy`` plane | major radius 0.58, tube radius 0.24 |
| ``pyramid`` | square pyramid, apex up, base edges along ``x`` / ``y`` | base half side 0.6 at ``z = -0.55``, apex ``z = 0.7`` |
| ``octahedron`` | regular octahedron, vertices on the axes | vertices at distance 0.9 |
| ``tube`` | hollow cylinder (open both ends), axis ``z`` | radii 0.72 / 0.46, half height 0.35 |
| ``arch`` | round-topped arch in the ``xz`` plane, opening along ``y`` | 1.32 wide, 1.32 tall, 0.56 deep |
| ``cross`` | three orthogonal bars through the centre | bar half length 0.78, half width 0.2 |
| ``mug`` | open-topped cup with a ring handle on its ``+x`` side | cup radius 0.46, half height 0.55 |
| ``lblock`` | L-shaped block: upright on ``-x``, foot toward ``+x``, extruded along ``y`` | 1.3 x 0.7 x 1.3 |

The SDFs are exact where that is simple (sphere, cube, cylinder, cone, torus, tube) and
otherwise exact inside and near faces with a lower bound on the distance outside near edges
(polytopes as intersections of half-spaces; unions and differences by ``min`` / ``max``). Only
the zero level set and the sign matter for occupancy; the density of `density_grid` uses the
SDF within a voxel or two of the surface, where all of them are (near-)exact.

Grids (`occupancy_grid`, `density_grid`) use the `VoxelField` layout: axes ``(z, y, x)``, voxel
centres ``-1 + (2 i + 1) / D``. A carved field's occupancy (`field_occupancy`) thresholds its
density at `OCCUPANCY_DENSITY`, the density at which a wall as thin as the shapes' thinnest
(`OCCUPANCY_WALL`, 0.25 world units) blocks half the light: denser regions show as solid in a
render, thinner ones as haze. `density_grid` puts exactly that density on the surface, so a
shape's own density grid has exactly the shape's occupancy.

Examples:
    >>> occ = occupancy_grid("torus", 32)
    >>> occ.shape, occ.dtype
    (torch.Size([32, 32, 32]), torch.bool)
    >>> iou(occ, occ)
    1.0
    >>> field = shape_field("cube", 32)
    >>> bool((field_occupancy(field) == occupancy_grid("cube", 32)).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .render import VoxelField

__all__ = [
    "OCCUPANCY_DENSITY",
    "OCCUPANCY_WALL",
    "SHAPE_ALBEDO",
    "SHAPE_CLASSES",
    "density_grid",
    "density_occupancy",
    "field_occupancy",
    "iou",
    "occupancy_grid",
    "sdf",
    "shape_field",
    "voxel_centers",
]

SHAPE_ALBEDO = 0.85
"""The uniform albedo of every shape in the shapes teacher's renders."""

OCCUPANCY_WALL = 0.25
"""Thickness in world units of the thinnest walls of the shapes (tube, mug, arch: 0.18-0.28),
the length scale of `OCCUPANCY_DENSITY`."""

OCCUPANCY_DENSITY = math.log(2.0) / OCCUPANCY_WALL
"""Density (per unit length, ``4 ln 2 = 2.77``) above which a point counts as occupied.

A wall of thickness `OCCUPANCY_WALL` at this density lets half the light through. What a
render shows is the optical depth through the object, so a score-distilled field, which only
has to look solid, settles at interior densities of a few times this value (not at the
training data's `density_grid` peak, 8 times it): a threshold at the scale of the object's
walls reads such a field as the solid it looks like, and the haze around it as empty. It is a
world-unit density, the same at every resolution, so every carved field is judged alike.
"""


# ------------------------------------------------------------------------------ primitives


def _box(p: Tensor, half: Tensor | tuple[float, float, float]) -> Tensor:
    """Exact SDF of the axis-aligned box ``|p_k| <= half_k``."""
    q = p.abs() - torch.as_tensor(half, dtype=p.dtype, device=p.device)
    return q.clamp_min(0.0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0.0)


def _rect(u: Tensor, v: Tensor, hu: float, hv: float) -> Tensor:
    """Exact 2D SDF of the rectangle ``|u| <= hu, |v| <= hv``."""
    du, dv = u.abs() - hu, v.abs() - hv
    outside = torch.stack([du.clamp_min(0.0), dv.clamp_min(0.0)], -1).norm(dim=-1)
    return outside + torch.maximum(du, dv).clamp_max(0.0)


def _extrude(d2: Tensor, w: Tensor, half: float) -> Tensor:
    """Exact SDF of a 2D shape (SDF ``d2``) extruded over ``|w| <= half``."""
    return _rect_from(d2, w.abs() - half)


def _rect_from(du: Tensor, dv: Tensor) -> Tensor:
    outside = torch.stack([du.clamp_min(0.0), dv.clamp_min(0.0)], -1).norm(dim=-1)
    return outside + torch.maximum(du, dv).clamp_max(0.0)


def _radial(p: Tensor) -> Tensor:
    """Distance from the ``z`` axis."""
    return p[..., :2].norm(dim=-1)


def _capped_cone(p: Tensor, half_height: float, r_bottom: float, r_top: float) -> Tensor:
    """Exact SDF of a cone frustum on the ``z`` axis, ``|z| <= half_height`` (Quilez)."""
    qx, qy = _radial(p), p[..., 2]
    h = half_height
    k1 = (r_top, h)
    k2 = (r_top - r_bottom, 2.0 * h)
    ca_x = qx - torch.minimum(qx, torch.where(qy < 0, r_bottom, r_top).to(p.dtype))
    ca_y = qy.abs() - h
    k2_sq = k2[0] ** 2 + k2[1] ** 2
    tt = (((k1[0] - qx) * k2[0] + (k1[1] - qy) * k2[1]) / k2_sq).clamp(0.0, 1.0)
    cb_x = qx - k1[0] + k2[0] * tt
    cb_y = qy - k1[1] + k2[1] * tt
    inside = (cb_x < 0) & (ca_y < 0)
    dist = torch.minimum(ca_x**2 + ca_y**2, cb_x**2 + cb_y**2).sqrt()
    return torch.where(inside, -dist, dist)


def _planes(p: Tensor, normals: list[tuple[float, float, float]], offsets: list[float]) -> Tensor:
    """``max_k (n_k . p - d_k)`` over unit normals: a convex polytope's SDF (bound outside)."""
    n = torch.tensor(normals, dtype=p.dtype, device=p.device)
    n = n / n.norm(dim=-1, keepdim=True)
    d = torch.tensor(offsets, dtype=p.dtype, device=p.device)
    return (p @ n.T - d).amax(dim=-1)


# ---------------------------------------------------------------------------------- shapes


def _sphere(p: Tensor) -> Tensor:
    return p.norm(dim=-1) - 0.7


def _cube(p: Tensor) -> Tensor:
    return _box(p, (0.52, 0.52, 0.52))


def _cylinder(p: Tensor) -> Tensor:
    return _rect_from(_radial(p) - 0.55, p[..., 2].abs() - 0.6)


def _cone(p: Tensor) -> Tensor:
    # base z = -0.6, apex z = 0.7: a frustum of half height 0.65 centred at z = 0.05
    shifted = p - torch.tensor([0.0, 0.0, 0.05], dtype=p.dtype, device=p.device)
    return _capped_cone(shifted, 0.65, 0.68, 0.0)


def _torus(p: Tensor) -> Tensor:
    return torch.stack([_radial(p) - 0.58, p[..., 2]], -1).norm(dim=-1) - 0.24


def _pyramid(p: Tensor) -> Tensor:
    base, half, apex = -0.55, 0.6, 0.7
    slope = half / (apex - base)  # the side faces: |x| (or |y|) = half - slope (z - base)
    normals = [(1.0, 0.0, slope), (-1.0, 0.0, slope), (0.0, 1.0, slope), (0.0, -1.0, slope)]
    norm = math.sqrt(1.0 + slope**2)
    offsets = [(half + slope * base) / norm] * 4
    return torch.maximum(_planes(p, normals, offsets), base - p[..., 2])


def _octahedron(p: Tensor) -> Tensor:
    return (p.abs().sum(dim=-1) - 0.9) / math.sqrt(3.0)


def _tube(p: Tensor) -> Tensor:
    r = _radial(p)
    return _rect_from((r - 0.59).abs() - 0.13, p[..., 2].abs() - 0.35)


def _arch(p: Tensor) -> Tensor:
    x, z = p[..., 0], p[..., 2]
    # outer: a 1.32 x 0.66 block under a half disc of radius 0.66 (z from -0.66 to 0.66)
    outer = torch.minimum(
        _rect(x, z + 0.33, 0.66, 0.33), torch.stack([x, z], -1).norm(dim=-1) - 0.66
    )
    # opening: a 0.64 wide passage under a half disc of radius 0.32
    hole = torch.minimum(_rect(x, z + 0.5, 0.32, 0.5), torch.stack([x, z], -1).norm(dim=-1) - 0.32)
    return _extrude(torch.maximum(outer, -hole), p[..., 1], 0.28)


def _cross(p: Tensor) -> Tensor:
    long, thin = 0.78, 0.2
    bars = [
        _box(p, (long, thin, thin)),
        _box(p, (thin, long, thin)),
        _box(p, (thin, thin, long)),
    ]
    return torch.stack(bars).amin(dim=0)


def _mug(p: Tensor) -> Tensor:
    body_centre = torch.tensor([-0.14, 0.0, 0.0], dtype=p.dtype, device=p.device)
    q = p - body_centre
    body = _rect_from(_radial(q) - 0.46, q[..., 2].abs() - 0.55)
    # the cavity: radius 0.36, from z = -0.41 up through the open top
    cavity = _rect_from(_radial(q) - 0.36, (q[..., 2] - 0.32).abs() - 0.73)
    cup = torch.maximum(body, -cavity)
    # the handle: a ring in the xz plane (axis y) on the +x side
    hx, hz = p[..., 0] - 0.34, p[..., 2] - 0.02
    ring = torch.stack([torch.stack([hx, hz], -1).norm(dim=-1) - 0.27, p[..., 1]], -1)
    handle = ring.norm(dim=-1) - 0.09
    return torch.minimum(cup, handle)


def _lblock(p: Tensor) -> Tensor:
    offset = lambda x, z: torch.tensor([x, 0.0, z], dtype=p.dtype, device=p.device)
    upright = _box(p - offset(-0.4, 0.0), (0.25, 0.35, 0.65))
    foot = _box(p - offset(0.0, -0.4), (0.65, 0.35, 0.25))
    return torch.minimum(upright, foot)


_SDFS: dict[str, Callable[[Tensor], Tensor]] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "pyramid": _pyramid,
    "octahedron": _octahedron,
    "tube": _tube,
    "arch": _arch,
    "cross": _cross,
    "mug": _mug,
    "lblock": _lblock,
}

SHAPE_CLASSES: tuple[str, ...] = tuple(_SDFS)
"""The shape classes, in the order of the shapes teacher's class labels."""


def _check_name(name: str) -> str:
    if name not in _SDFS:
        raise ValueError(f"unknown shape {name!r}; expected one of {SHAPE_CLASSES}")
    return name


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    return resolution


# -------------------------------------------------------------------------------- public API


def sdf(name: str, points: Tensor) -> Tensor:
    """Signed distance from points to a shape's surface: negative inside.

    Args:
        name: one of `SHAPE_CLASSES`.
        points: ``(..., 3)`` world ``(x, y, z)`` points (floating point).

    Returns:
        ``(...)`` signed distances, in ``points``' dtype.

    Raises:
        ValueError: on an unknown ``name`` or ``points`` without a trailing axis of 3.
    """
    _check_name(name)
    points = torch.as_tensor(points)
    if points.shape[-1:] != (3,) or not points.is_floating_point():
        raise ValueError(
            f"points must be a floating tensor of shape (..., 3), got {tuple(points.shape)} "
            f"({points.dtype})"
        )
    return _SDFS[name](points)


def voxel_centers(
    resolution: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """World coordinates of the voxel centres of a ``D^3`` grid on ``[-1, 1]^3``.

    The same points as [`VoxelField.voxel_centers`][carv_pyro.pipelines.render.VoxelField.voxel_centers].

    Args:
        resolution: ``D``, voxels per side (at least 2).
        dtype: floating dtype.
        device: device.

    Returns:
        ``(D, D, D, 3)``: entry ``[k, j, i]`` is ``(x_i, y_j, z_k)``, ``x_i = -1 + (2 i + 1) / D``.
    """
    resolution = _check_resolution(resolution)
    ticks = (2.0 * torch.arange(resolution, dtype=dtype, device=device) + 1.0) / resolution - 1
    z, y, x = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def occupancy_grid(
    name: str, resolution: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Which voxel centres lie inside a shape (``sdf < 0``).

    Args:
        name: one of `SHAPE_CLASSES`.
        resolution: ``D``, voxels per side.
        device: device of the result.

    Returns:
        ``(D, D, D)`` bool, axes ``(z, y, x)`` as in `VoxelField`.
    """
    centres = voxel_centers(resolution, dtype=torch.float64, device=device)
    return sdf(name, centres) < 0


def density_occupancy(density: Tensor, threshold: float = OCCUPANCY_DENSITY) -> Tensor:
    """Occupancy of a density volume: ``density >= threshold``.

    Args:
        density: ``(..., D, D, D)`` non-negative densities, axes ``(z, y, x)``.
        threshold: per unit length; default `OCCUPANCY_DENSITY`.

    Returns:
        ``(..., D, D, D)`` bool.
    """
    if density.dim() < 3 or not density.shape[-1] == density.shape[-2] == density.shape[-3]:
        raise ValueError(f"density must have shape (..., D, D, D), got {tuple(density.shape)}")
    return density >= threshold


def field_occupancy(field: VoxelField, threshold: float = OCCUPANCY_DENSITY) -> Tensor:
    """Occupancy of a carved `VoxelField`: its voxel densities thresholded (`density_occupancy`).

    Args:
        field: the field.
        threshold: per unit length; default `OCCUPANCY_DENSITY`.

    Returns:
        ``(D, D, D)`` bool, detached, axes ``(z, y, x)``.
    """
    with torch.no_grad():
        return density_occupancy(field.density(), threshold)


def density_grid(
    name: str,
    resolution: int,
    sharpness: float | None = None,
    *,
    peak: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """A smooth density volume of a shape, renderable like a `VoxelField`.

    ``density = peak * sigmoid(offset - sharpness * sdf)`` at the voxel centres, with the
    offset ``logit(OCCUPANCY_DENSITY / peak)`` that puts exactly `OCCUPANCY_DENSITY` on the
    surface: so ``density_occupancy(density_grid(name, D)) == occupancy_grid(name, D)``. The
    density rises to ``peak`` inside and vanishes outside over a shell of a few
    ``1 / sharpness``.

    Args:
        name: one of `SHAPE_CLASSES`.
        resolution: ``D``, voxels per side.
        sharpness: slope of the surface profile per unit length; default ``D`` (the logit
            changes by 2 per voxel), which the trilinear interpolation of a ``D^3`` field can
            follow and its central differences turn into smooth normals.
        peak: the density inside, per unit length, above `OCCUPANCY_DENSITY`; default
            ``8 * OCCUPANCY_DENSITY = 22.2`` (half the light through 1/32 of a unit; through
            the thinnest walls an optical depth of 5: opaque).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(D, D, D)`` densities, axes ``(z, y, x)``.
    """
    resolution = _check_resolution(resolution)
    sharpness = float(resolution if sharpness is None else sharpness)
    if not math.isfinite(sharpness) or sharpness <= 0:
        raise ValueError(f"sharpness must be a positive number, got {sharpness!r}")
    peak = 8.0 * OCCUPANCY_DENSITY if peak is None else float(peak)
    if not math.isfinite(peak) or peak <= OCCUPANCY_DENSITY:
        raise ValueError(
            f"peak must be a number above OCCUPANCY_DENSITY = {OCCUPANCY_DENSITY:.3f}, got {peak!r}"
        )
    offset = math.log(OCCUPANCY_DENSITY / (peak - OCCUPANCY_DENSITY))  # logit(tau / peak)
    centres = voxel_centers(resolution, dtype=torch.float64, device=device)
    density = peak * torch.sigmoid(offset - sharpness * sdf(name, centres))
    return density.to(dtype)


def shape_field(
    name: str,
    resolution: int,
    sharpness: float | None = None,
    *,
    albedo: float = SHAPE_ALBEDO,
    peak: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> VoxelField:
    """A `VoxelField` holding a shape: `density_grid` and a uniform albedo.

    This is how the shapes teacher's training renders are made, so a `VoxelField` of the same
    resolution can reproduce them exactly.

    Args:
        name: one of `SHAPE_CLASSES`.
        resolution: ``D``.
        sharpness: see `density_grid`.
        albedo: the uniform albedo in ``(0, 1)`` (default `SHAPE_ALBEDO`).
        peak: see `density_grid`.
        dtype: parameter dtype.
        device: parameter device.

    Returns:
        A one-channel `VoxelField` (its parameters set to the shape, ``requires_grad`` on as
        for any field).
    """
    if not 0.0 < float(albedo) < 1.0:
        raise ValueError(f"albedo must lie in (0, 1), got {albedo!r}")
    density = density_grid(name, resolution, sharpness, peak=peak, dtype=torch.float64)
    field = VoxelField(resolution, 1, noise_std=0.0, init_albedo=float(albedo), dtype=dtype)
    # inverse softplus; densities below 1e-12 (far outside) are floored to keep it finite
    density = density.clamp_min(1e-12)
    logits = density + torch.log(-torch.expm1(-density))
    with torch.no_grad():
        field.density_logits.copy_(logits.to(dtype))
    return field.to(device) if device is not None else field


def iou(pred: Tensor, true: Tensor) -> float | Tensor:
    """Intersection over union of occupancy grids.

    Args:
        pred: ``(..., D, D, D)`` bool (e.g. `field_occupancy`).
        true: ``(D, D, D)`` bool, broadcastable against ``pred`` (e.g. `occupancy_grid`).

    Returns:
        ``|pred & true| / |pred | true|`` over the last three axes: a Python float for single
        grids, a ``(...)`` float tensor for batches. Two empty grids have IoU 1.

    Raises:
        ValueError: if the inputs are not bool or their grid shapes differ.
    """
    pred, true = torch.as_tensor(pred), torch.as_tensor(true)
    if pred.dtype != torch.bool or true.dtype != torch.bool:
        raise ValueError(f"pred and true must be bool grids, got {pred.dtype} and {true.dtype}")
    if pred.dim() < 3 or pred.shape[-3:] != true.shape[-3:]:
        raise ValueError(
            f"pred and true must end in the same (D, D, D) grid shape, got {tuple(pred.shape)} "
            f"and {tuple(true.shape)}"
        )
    inter = (pred & true).flatten(-3).sum(-1).double()
    union = (pred | true).flatten(-3).sum(-1).double()
    out = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
    return float(out) if out.dim() == 0 else out
