"""A differentiable emission-absorption volume renderer of a voxel grid.

This is the expensive *upstream* step ``x = g(theta, xi)`` of the text-to-3D pipeline: the
parameters ``theta`` are the logits of a `VoxelField`, the upstream randomness ``xi`` is a
camera pose ``(azimuth, elevation)``, and the output is an image in the teacher's data range.

Conventions (shared by every function in this module):

* **World.** Right-handed ``(x, y, z)`` coordinates, world up is ``+z``. A `VoxelField`
  spans the cube ``[-1, 1]^3``.
* **Voxel layout.** ``density_logits[k, j, i]`` (and ``albedo_logits[c, k, j, i]``) is the value
  at the voxel centre ``(x_i, y_j, z_k)`` with ``x_i = -1 + (2 i + 1) / D``: the tensor axes are
  ``(z, y, x)``. This is exactly the ``(D, H, W)`` layout that
  `torch.nn.functional.grid_sample` expects for a 5-D input when the last axis of its
  ``grid`` holds ``(x, y, z)`` (``x`` indexes ``W``, ``y`` indexes ``H``, ``z`` indexes ``D``), so
  world points are passed to ``grid_sample`` unchanged. ``align_corners=False``: ``+-1`` are the
  outer *faces* of the corner voxels, not their centres.
* **Between and beyond voxel centres.** Density and albedo are trilinearly interpolated between
  voxel centres and held constant over the half voxel between the outermost centres and the
  faces (``padding_mode="border"``). The density is zero outside the closed cube, so a field
  renders the same whether rays are clipped to the cube or not.
* **Cameras.** An orbit camera at azimuth ``phi`` and elevation ``theta`` (radians) sits at
  ``radius * (cos theta cos phi, cos theta sin phi, sin theta)`` and looks at the origin.
  Azimuth ``0`` is on the ``+x`` axis and grows counter-clockwise seen from ``+z``; positive
  elevation is above the ``xy`` plane. The image's right vector is ``(-sin phi, cos phi, 0)``
  and its up vector ``(-sin theta cos phi, -sin theta sin phi, cos theta)`` (both well defined at
  the poles). Row ``0`` of an image is its top, column ``0`` its left: at ``phi = theta = 0``
  the image shows the ``yz`` plane with ``+y`` to the right and ``+z`` up.
* **Images.** Renders lie in ``[-1, 1]`` like the teachers' data (white on a black
  background). Unshaded (``shading="none"``, the default, the digits teacher's emission
  model) a pixel is ``sum_i w_i (2 c_i - 1) + T * background`` with albedo ``c_i in [0, 1]``,
  so a fully opaque white surface gives ``+1`` and empty space gives the background, ``-1``
  (black) by default.
* **Shading.** With ``shading="lambertian"`` (the shapes teacher's renders) a pixel is
  ``sum_i w_i (2 c_i s_i - 1) + T * background`` with the Lambertian factor
  ``s_i = ambient + diffuse * max(0, n_i . l)`` in ``[0, 1]``. The normal is
  ``n = -grad(density) / sqrt(|grad(density)|^2 + normal_eps^2)`` (it points out of the
  object, where the density falls); for a `VoxelField` the gradient is the trilinear
  interpolation of the density volume's central differences, sampled in the same
  ``grid_sample`` call as density and albedo (first-order differentiable w.r.t. the logits, no
  double backward). The key light ``l`` is fixed to the camera (see `Lighting`: by default
  from the upper left, in front), so a view's shading depends on the shape only.
* **Anti-aliasing.** ``supersample=s`` renders ``s * image_size`` pixels per side and averages
  each ``s x s`` block (the pixel is the mean over a regular grid of ``s^2`` rays inside it).

Examples:
    >>> field = VoxelField(resolution=16, seed=0)
    >>> azimuth, elevation = random_cameras((4, 1), generator=torch.Generator().manual_seed(0))
    >>> render(field, azimuth, elevation).shape  # a plate of 4 views at dim -2
    torch.Size([4, 1, 1, 16, 16])
    >>> render(field, azimuth, elevation, shading="lambertian", supersample=2).shape
    torch.Size([4, 1, 1, 16, 16])
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from einops import pack, rearrange, reduce, unpack
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Cameras",
    "Lighting",
    "RadianceField",
    "RayRender",
    "VoxelField",
    "emission_absorption",
    "random_cameras",
    "ray_box_intersection",
    "render",
    "render_rays",
    "save_turntable_png",
    "turntable",
]

# Smallest |direction component| used by the slab test (avoids 0 * inf = nan).
_TINY_DIRECTION = 1e-12

SHADINGS = ("none", "lambertian")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return out


def _inverse_softplus(y: Tensor) -> Tensor:
    """``x`` with ``softplus(x) = y`` for ``y > 0``."""
    return y + torch.log(-torch.expm1(-y))


@runtime_checkable
class RadianceField(Protocol):
    """Anything `render_rays` can render: a callable from points to density and albedo.

    A field maps points ``(..., 3)`` in world coordinates to a non-negative density ``(...)``
    (extinction per unit length) and an albedo ``(..., C)`` in ``[0, 1]``. `VoxelField`
    is one; an MLP or hash-grid NeRF with the same call signature renders unchanged.

    Shaded renders need the density's gradient. A field may provide it with a method
    ``density_albedo_gradient(points) -> (density, albedo, gradient)`` (shapes ``(...)``,
    ``(..., C)``, ``(..., 3)``), as `VoxelField` does; otherwise it is taken by central finite
    differences of the field's density (six more evaluations per point, step
    `Lighting.finite_difference_step`).
    """

    def __call__(self, points: Tensor) -> tuple[Tensor, Tensor]: ...


class VoxelField(nn.Module):
    """A learnable density and albedo grid on the cube ``[-1, 1]^3``.

    Densities are ``softplus(density_logits)`` and albedos ``sigmoid(albedo_logits)``; points are
    sampled trilinearly (see the module docstring for the axis convention and padding).

    The initial field is a faint isotropic Gaussian blob at the centre,
    ``density(x) = floor + peak * exp(-|x|^2 / (2 blob_std^2))``, on a uniform grey albedo, plus
    i.i.d. ``N(0, noise_std^2)`` noise on both sets of logits. With the defaults the centre ray
    has optical depth ``peak * blob_std * sqrt(2 pi) ~ 0.88`` (opacity ~0.58), so the first
    renders are a soft grey disc that gradients can shape in any direction.

    Args:
        resolution: ``D``, voxels per side (at least 2).
        channels: ``C``, albedo channels (1 for the grayscale digits teacher, 3 for RGB).
        peak_density: ``peak`` of the initial blob, per unit length.
        blob_std: standard deviation of the initial blob, in world units.
        floor_density: initial density far from the blob (must be positive).
        init_albedo: initial albedo, in ``(0, 1)``.
        noise_std: standard deviation of the noise added to the initial logits.
        generator: CPU generator for the noise; the noise is drawn on the CPU, so a seed gives the
            same field on every device.
        seed: shorthand for ``generator=torch.Generator().manual_seed(seed)``. Give at most one of
            ``generator`` and ``seed``; with neither the global RNG is used.
        dtype: parameter dtype (default: torch's default dtype).
        device: parameter device.

    Attributes:
        density_logits: ``(D, D, D)`` parameter, axes ``(z, y, x)``.
        albedo_logits: ``(C, D, D, D)`` parameter, axes ``(c, z, y, x)``.

    Examples:
        >>> field = VoxelField(resolution=8, channels=3, seed=0)
        >>> density, albedo = field(torch.zeros(5, 2, 3))
        >>> density.shape, albedo.shape
        (torch.Size([5, 2]), torch.Size([5, 2, 3]))
    """

    def __init__(
        self,
        resolution: int = 16,
        channels: int = 1,
        *,
        peak_density: float = 1.0,
        blob_std: float = 0.35,
        floor_density: float = 1e-3,
        init_albedo: float = 0.5,
        noise_std: float = 0.01,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        resolution = _check_positive_int("resolution", resolution)
        if resolution < 2:
            raise ValueError(f"resolution must be at least 2, got {resolution}")
        channels = _check_positive_int("channels", channels)
        peak_density = float(peak_density)
        if not math.isfinite(peak_density) or peak_density < 0:
            raise ValueError(f"peak_density must be finite and >= 0, got {peak_density!r}")
        blob_std = _check_positive_float("blob_std", blob_std)
        floor_density = _check_positive_float("floor_density", floor_density)
        if not 0.0 < float(init_albedo) < 1.0:
            raise ValueError(f"init_albedo must lie in (0, 1), got {init_albedo!r}")
        noise_std = float(noise_std)
        if not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be finite and >= 0, got {noise_std!r}")
        if generator is not None and seed is not None:
            raise ValueError("give at most one of generator and seed")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))

        self.resolution = resolution
        self.channels = channels
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        centers = self._centers(resolution, torch.float64)
        density = floor_density + peak_density * torch.exp(
            -centers.square().sum(-1) / (2.0 * blob_std**2)
        )
        density_logits = _inverse_softplus(density)
        albedo_logits = torch.full(
            (channels, resolution, resolution, resolution),
            math.log(init_albedo / (1.0 - init_albedo)),
            dtype=torch.float64,
        )
        shape = (1 + channels, resolution, resolution, resolution)
        noise = noise_std * torch.randn(shape, generator=generator, dtype=torch.float64)
        self.density_logits = nn.Parameter(
            (density_logits + noise[0]).to(dtype=dtype, device=device)
        )
        self.albedo_logits = nn.Parameter(
            (albedo_logits + noise[1:]).to(dtype=dtype, device=device)
        )

    @staticmethod
    def _centers(resolution: int, dtype: torch.dtype, device: Any = None) -> Tensor:
        ticks = (2.0 * torch.arange(resolution, dtype=dtype, device=device) + 1.0) / resolution - 1
        z, y, x = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
        return torch.stack([x, y, z], dim=-1)

    def voxel_centers(self) -> Tensor:
        """World coordinates of the voxel centres.

        Returns:
            ``(D, D, D, 3)``: entry ``[k, j, i]`` is ``(x_i, y_j, z_k)``, the point where
            ``density_logits[k, j, i]`` is attained.
        """
        p = self.density_logits
        return self._centers(self.resolution, p.dtype, p.device)

    def density(self) -> Tensor:
        """Voxel densities ``softplus(density_logits)``, shape ``(D, D, D)``, axes ``(z, y, x)``."""
        return F.softplus(self.density_logits)

    def albedo(self) -> Tensor:
        """Voxel albedos ``sigmoid(albedo_logits)``, shape ``(C, D, D, D)``, in ``[0, 1]``."""
        return torch.sigmoid(self.albedo_logits)

    def density_gradient(self) -> Tensor:
        """Central differences of the voxel densities, in world units.

        Entry ``[k, j, i]`` approximates ``grad(density)`` at the voxel centre
        ``(x_i, y_j, z_k)``: ``(rho[.., i + 1] - rho[.., i - 1]) / (2 h)`` with the voxel size
        ``h = 2 / D`` inside, one-sided differences on the outermost voxels. It is a linear map
        of `density`, so it costs one pass over the grid and is differentiable w.r.t. the
        logits like the density itself.

        Returns:
            ``(3, D, D, D)``: channels ``(d/dx, d/dy, d/dz)``, voxel axes ``(z, y, x)``.
        """
        h = 2.0 / self.resolution
        d_dz, d_dy, d_dx = torch.gradient(self.density(), spacing=h, edge_order=1)
        return torch.stack([d_dx, d_dy, d_dz])

    def _sample(self, points: Tensor, with_gradient: bool) -> tuple[Tensor, ...]:
        if points.shape[-1:] != (3,):
            raise ValueError(
                f"points must have a trailing axis of size 3, got {tuple(points.shape)}"
            )
        p = self.density_logits
        flat, ps = pack([points.to(dtype=p.dtype, device=p.device)], "* xyz")
        # grid_sample on 5-D input: grid (N, D_out, H_out, W_out, 3) with (x, y, z) -> (W, H, D).
        grid = rearrange(flat, "n xyz -> 1 n 1 1 xyz")
        parts = [self.density()[None], self.albedo()]
        if with_gradient:
            parts.append(self.density_gradient())
        volume = torch.cat(parts, dim=0)  # (1 + C [+ 3], D, D, D)
        values = F.grid_sample(
            volume[None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        values = rearrange(values, "1 c n 1 1 -> n c")
        inside = (flat.abs() <= 1.0).all(dim=-1)
        density = torch.where(inside, values[:, 0], torch.zeros_like(values[:, 0]))
        [density] = unpack(density, ps, "*")
        [albedo] = unpack(values[:, 1 : 1 + self.channels], ps, "* c")
        if not with_gradient:
            return density, albedo
        gradient = values[:, 1 + self.channels :] * inside[:, None]
        [gradient] = unpack(gradient, ps, "* xyz")
        return density, albedo, gradient

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Trilinearly interpolated density and albedo at world points.

        Args:
            points: ``(..., 3)`` world ``(x, y, z)`` coordinates; cast to the field's dtype.

        Returns:
            ``(density, albedo)`` of shapes ``(...)`` and ``(..., C)``.
        """
        return self._sample(points, with_gradient=False)

    def density_albedo_gradient(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Density, albedo and density gradient at world points, in one ``grid_sample``.

        The gradient is the trilinear interpolation of `density_gradient` (central differences
        of the voxel densities), so it is smooth between voxels and its derivative w.r.t. the
        logits needs no double backward. Like the density it is zero outside the cube.

        Args:
            points: ``(..., 3)`` world ``(x, y, z)`` coordinates; cast to the field's dtype.

        Returns:
            ``(density, albedo, gradient)`` of shapes ``(...)``, ``(..., C)`` and ``(..., 3)``.
        """
        return self._sample(points, with_gradient=True)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, channels={self.channels}"


class Cameras:
    """Orbit cameras looking at the origin, with world up ``+z``.

    See the module docstring for the pose convention. ``azimuth`` and ``elevation`` broadcast
    against each other to the camera batch shape ``B...``; for example ``(R, 1)`` tensors drawn
    in a Pyro plate at ``dim=-2``.

    Args:
        azimuth: radians, any shape (or a Python number).
        elevation: radians, broadcastable against ``azimuth``.
        radius: distance of every camera from the origin.
        fov: full field of view in radians, in ``(0, pi)``, for a perspective camera; ``None``
            (default) for an orthographic one.
        ortho_half_width: half the side of an orthographic image, in world units (``1.0``
            frames the cube ``[-1, 1]^3`` exactly when seen along an axis). Ignored when ``fov``
            is given.

    Raises:
        ValueError: on shapes that do not broadcast or non-positive / out-of-range sizes.

    Examples:
        >>> cams = Cameras(torch.zeros(2, 1), torch.zeros(2, 1))
        >>> origins, directions = cams.rays(16)
        >>> origins.shape
        torch.Size([2, 1, 16, 16, 3])
    """

    def __init__(
        self,
        azimuth: Tensor | float,
        elevation: Tensor | float,
        *,
        radius: float = 3.0,
        fov: float | None = None,
        ortho_half_width: float = 1.0,
    ):
        azimuth = torch.as_tensor(azimuth)
        elevation = torch.as_tensor(elevation)
        if not azimuth.is_floating_point():
            azimuth = azimuth.to(torch.get_default_dtype())
        if not elevation.is_floating_point():
            elevation = elevation.to(azimuth.dtype)
        try:
            shape = torch.broadcast_shapes(azimuth.shape, elevation.shape)
        except RuntimeError:
            raise ValueError(
                f"azimuth and elevation shapes must broadcast, got azimuth "
                f"{tuple(azimuth.shape)} and elevation {tuple(elevation.shape)}"
            ) from None
        dtype = torch.promote_types(azimuth.dtype, elevation.dtype)
        self.azimuth = azimuth.to(dtype).expand(shape)
        self.elevation = elevation.to(dtype=dtype, device=azimuth.device).expand(shape)
        self.radius = _check_positive_float("radius", radius)
        if fov is not None:
            fov = float(fov)
            if not 0.0 < fov < math.pi:
                raise ValueError(f"fov must lie in (0, pi) radians, got {fov!r}")
        self.fov = fov
        self.ortho_half_width = _check_positive_float("ortho_half_width", ortho_half_width)

    @property
    def batch_shape(self) -> torch.Size:
        """``B...``, the broadcast shape of azimuth and elevation."""
        return self.azimuth.shape

    def frames(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Camera positions and orthonormal frames.

        Returns:
            ``(position, forward, right, up)``, each ``(*B, 3)``; ``forward`` points from the
            camera to the origin, ``right x up = -forward``.
        """
        ca, sa = torch.cos(self.azimuth), torch.sin(self.azimuth)
        ce, se = torch.cos(self.elevation), torch.sin(self.elevation)
        outward = torch.stack([ce * ca, ce * sa, se], dim=-1)
        right = torch.stack([-sa, ca, torch.zeros_like(sa)], dim=-1)
        up = torch.stack([-se * ca, -se * sa, ce], dim=-1)
        return self.radius * outward, -outward, right, up

    def rays(self, image_size: int) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions through the pixel centres.

        Args:
            image_size: ``H = W``, pixels per side.

        Returns:
            ``(origins, directions)``, each ``(*B, H, W, 3)``. Orthographic rays start on the
            plane through the camera position perpendicular to ``forward``; perspective rays all
            start at the camera position.
        """
        size = _check_positive_int("image_size", image_size)
        position, forward, right, up = self.frames()
        ticks = (2.0 * torch.arange(size, dtype=position.dtype, device=position.device) + 1) / size
        u = ticks - 1.0  # left -> right
        v = 1.0 - ticks  # top -> bottom
        vv, uu = torch.meshgrid(v, u, indexing="ij")  # (H, W)
        expand = lambda t: rearrange(t, "... xyz -> ... 1 1 xyz")
        offset = uu[..., None] * expand(right) + vv[..., None] * expand(up)  # (*B, H, W, 3)
        if self.fov is None:
            origins = expand(position) + self.ortho_half_width * offset
            directions = expand(forward).expand_as(origins)
        else:
            directions = expand(forward) + math.tan(self.fov / 2.0) * offset
            directions = directions / directions.norm(dim=-1, keepdim=True)
            origins = expand(position).expand_as(directions)
        return origins, directions


@dataclass(frozen=True)
class Lighting:
    """Lambertian shading: a key light fixed to the camera, plus ambient light.

    A sample's shading factor is ``s = ambient + diffuse * max(0, n . l)`` (see the module
    docstring for the normal ``n``), so with ``ambient + diffuse <= 1`` it lies in ``[0, 1]``
    and a shaded pixel stays in ``[-1, 1]``. The light direction ``l`` is given in the camera's
    frame, so every view is lit the same way relative to the viewer: the picture of an object
    changes with the camera only through the object's own geometry (a centred sphere looks the
    same from every side).

    Attributes:
        ambient: light reaching every surface, ``>= 0``.
        diffuse: strength of the key light, ``>= 0``; ``ambient + diffuse <= 1``.
        light_right: component of ``l`` along the image's right vector (negative: from the left).
        light_up: component of ``l`` along the image's up vector.
        light_back: component of ``l`` toward the camera (``-forward``; positive: the light is
            on the viewer's side). The three components are normalised; the default
            ``(-0.5, 0.6, 0.62)`` is a key light from the upper left, in front.
        normal_eps: softening of the normal, ``n = -g / sqrt(|g|^2 + normal_eps^2)`` for the
            density gradient ``g`` (densities per unit length per unit length): where the field
            is flat (empty space, deep inside) the normal fades to zero and ``s`` to
            ``ambient``, and its derivative stays finite.
        finite_difference_step: step of the central differences that give ``g`` for fields
            without a ``density_albedo_gradient`` method, in world units.

    Raises:
        ValueError: naming the attribute, on negative terms, ``ambient + diffuse > 1``, a zero
            light direction or non-positive ``normal_eps`` / ``finite_difference_step``.

    Examples:
        >>> cams = Cameras(torch.zeros(2), torch.zeros(2))
        >>> Lighting().direction(cams).shape
        torch.Size([2, 3])
    """

    ambient: float = 0.3
    diffuse: float = 0.7
    light_right: float = -0.5
    light_up: float = 0.6
    light_back: float = 0.62
    normal_eps: float = 1e-3
    finite_difference_step: float = 1e-2

    def __post_init__(self) -> None:
        for name in ("ambient", "diffuse"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        if self.ambient + self.diffuse > 1.0 + 1e-12:
            raise ValueError(
                f"ambient + diffuse must be <= 1 (so shaded pixels stay in [-1, 1]), got "
                f"ambient={self.ambient!r}, diffuse={self.diffuse!r}"
            )
        components = (self.light_right, self.light_up, self.light_back)
        if not all(math.isfinite(float(c)) for c in components) or not any(components):
            raise ValueError(
                f"light direction (light_right, light_up, light_back) must be finite and "
                f"non-zero, got {components!r}"
            )
        _check_positive_float("normal_eps", self.normal_eps)
        _check_positive_float("finite_difference_step", self.finite_difference_step)

    def direction(self, cameras: Cameras) -> Tensor:
        """The key light's unit direction in world coordinates, one per camera.

        Args:
            cameras: the cameras whose frames the light is attached to.

        Returns:
            ``(*B, 3)``: unit vectors from the surface toward the light.
        """
        _, forward, right, up = cameras.frames()
        light = self.light_right * right + self.light_up * up - self.light_back * forward
        return light / light.norm(dim=-1, keepdim=True)


def random_cameras(
    shape: Sequence[int] | torch.Size | int,
    generator: torch.Generator | None = None,
    elevation_range: tuple[float, float] = (math.radians(-10.0), math.radians(30.0)),
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw camera poses: azimuth uniform on ``[-pi, pi)``, elevation uniform on a range.

    Args:
        shape: camera batch shape ``B...``.
        generator: source of randomness (the global RNG if ``None``); must live on ``device``.
        elevation_range: ``(low, high)`` in radians, ``-pi/2 <= low <= high <= pi/2``.
        dtype: floating dtype (default: torch's default dtype).
        device: device of the returned tensors.

    Returns:
        ``(azimuth, elevation)``, each of shape ``B...``.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in shape):
        raise ValueError(f"shape must be a sequence of non-negative integers, got {shape!r}")
    low, high = (float(e) for e in elevation_range)
    if not -math.pi / 2 <= low <= high <= math.pi / 2:
        raise ValueError(
            f"elevation_range must satisfy -pi/2 <= low <= high <= pi/2, got {elevation_range!r}"
        )
    kw = dict(generator=generator, dtype=dtype, device=device)
    azimuth = math.pi * (2.0 * torch.rand(shape, **kw) - 1.0)
    elevation = low + (high - low) * torch.rand(shape, **kw)
    return azimuth, elevation


def ray_box_intersection(
    origins: Tensor, directions: Tensor, half_size: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Where rays enter and leave the cube ``[-half_size, half_size]^3`` (slab method).

    Args:
        origins: ``(..., 3)``.
        directions: ``(..., 3)``, unit length so that distances are world distances.
        half_size: half the side of the axis-aligned cube centred at the origin.

    Returns:
        ``(near, far)``, each ``(...)``, with ``0 <= near <= far``; a ray that misses the cube
        (or whose cube lies behind it) gets ``near == far``, an empty interval.
    """
    safe = torch.where(
        directions.abs() < _TINY_DIRECTION,
        torch.full_like(directions, _TINY_DIRECTION),
        directions,
    )
    t0 = (-half_size - origins) / safe
    t1 = (half_size - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    return near, torch.maximum(far, near)


def emission_absorption(density: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """Quadrature weights of the emission-absorption model along rays.

    With optical depths ``tau_i = sigma_i delta_i`` and opacities ``alpha_i = 1 - exp(-tau_i)``,
    the weights are ``w_i = T_i alpha_i`` with the exclusive transmittance
    ``T_i = prod_{j<i} (1 - alpha_j)``. ``T_i`` is computed as ``exp(-sum_{j<i} tau_j)`` (the same
    number, without the division in ``cumprod``'s backward), so ``w_i >= 0`` and
    ``sum_i w_i = 1 - T_final <= 1`` up to rounding.

    Args:
        density: ``(..., S)`` non-negative densities at the samples, ordered near to far.
        deltas: ``(..., S)`` non-negative lengths of the segments the samples represent.

    Returns:
        ``(weights, transmittance)``: ``(..., S)`` weights and the ``(...)`` transmittance past
        the last sample, ``T_final = exp(-sum_i tau_i)``.
    """
    tau = density * deltas
    depth = torch.cumsum(tau, dim=-1)
    exclusive = F.pad(depth[..., :-1], (1, 0))
    weights = torch.exp(-exclusive) * -torch.expm1(-tau)
    return weights, torch.exp(-depth[..., -1])


class RayRender(NamedTuple):
    """What `render_rays` returns for ``N...`` rays and ``S`` samples per ray.

    Attributes:
        color: ``(*N, C)`` pixel values in ``[-1, 1]``, background included.
        weights: ``(*N, S)`` emission-absorption weights.
        transmittance: ``(*N,)`` light that passes every sample (the background's weight).
        depths: ``(*N, S)`` distances of the samples along the rays.
    """

    color: Tensor
    weights: Tensor
    transmittance: Tensor
    depths: Tensor


def _bound(value: float | Tensor | None, default: Tensor, batch_shape: Any, name: str) -> Tensor:
    """A ray-interval bound: ``default`` ``(n,)`` if ``value`` is None, else ``value`` flattened."""
    if value is None:
        return default
    value = torch.as_tensor(value, dtype=default.dtype, device=default.device)
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    try:
        return value.expand(batch_shape).reshape(-1)
    except RuntimeError:
        raise ValueError(
            f"{name} must broadcast to the ray shape {tuple(batch_shape)}, got {tuple(value.shape)}"
        ) from None


def render_rays(
    field: RadianceField,
    origins: Tensor,
    directions: Tensor,
    *,
    n_samples: int = 32,
    near: float | Tensor | None = None,
    far: float | Tensor | None = None,
    background: float | Tensor = -1.0,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    light: Tensor | None = None,
    lighting: Lighting | None = None,
) -> RayRender:
    """Render rays through a field by emission-absorption quadrature.

    Each ray's interval ``[near, far]`` is split into ``n_samples`` equal bins of width
    ``delta``; the field is evaluated at each bin's midpoint (deterministic, the default) or at a
    uniform point inside it (``stratified=True``), and the bin's optical depth is
    ``sigma * delta``. The pixel is ``sum_i w_i (2 c_i - 1) + T_final * background``, or with a
    ``light`` ``sum_i w_i (2 c_i s_i - 1) + T_final * background`` with the Lambertian factor
    ``s_i`` of `Lighting`.

    Memory: the intermediates are ``O(N * S * (C + 4))`` numbers. With ``chunk_size`` the rays
    are processed ``chunk_size`` at a time and, when autograd is recording, each chunk is
    recomputed in the backward pass (activation checkpointing), so only the chunks' outputs (colours
    and weights), not the field's intermediates, are kept between the passes.

    Args:
        field: a `RadianceField`, e.g. a `VoxelField`.
        origins: ``(*N, 3)`` ray origins.
        directions: ``(*N, 3)`` unit ray directions.
        n_samples: ``S``, samples per ray.
        near: start of the interval: a number or a tensor broadcastable to ``N...``; ``None``
            (default) for the entry point into the cube ``[-1, 1]^3``.
        far: end of the interval, likewise; ``None`` for the exit point from the cube. Rays that
            miss the cube (or with ``far <= near``) render the background.
        background: value in ``[-1, 1]`` seen through empty space: a number or a ``(C,)`` tensor.
        stratified: jitter the samples inside their bins (an unbiased estimate of each bin's
            optical depth) instead of taking the midpoints.
        generator: randomness for ``stratified=True`` (the global RNG if ``None``).
        chunk_size: rays per chunk, or ``None`` for all at once.
        light: ``None`` (default) for unshaded rendering, or the unit world direction toward
            the key light, broadcastable to ``(*N, 3)`` (`render` derives it from the camera
            and `Lighting.direction`).
        lighting: ambient and diffuse strengths and the normal's settings for a ``light``
            (default `Lighting()`); ignored without one.

    Returns:
        A `RayRender` with leading shape ``N...``.
    """
    n_samples = _check_positive_int("n_samples", n_samples)
    if lighting is not None and not isinstance(lighting, Lighting):
        raise ValueError(f"lighting must be a Lighting or None, got {type(lighting).__name__}")
    if light is not None and lighting is None:
        lighting = Lighting()
    if chunk_size is not None:
        chunk_size = _check_positive_int("chunk_size", chunk_size)
    if generator is not None and not stratified:
        raise ValueError("generator is only used with stratified=True")
    if origins.shape[-1:] != (3,) or origins.shape != directions.shape:
        raise ValueError(
            f"origins and directions must both have shape (..., 3), got origins "
            f"{tuple(origins.shape)} and directions {tuple(directions.shape)}"
        )
    flat_o, ps = pack([origins], "* xyz")
    flat_d, _ = pack([directions], "* xyz")
    flat_l = None
    if light is not None:
        light = torch.as_tensor(light, dtype=origins.dtype, device=origins.device)
        try:
            light = light.expand(origins.shape)
        except RuntimeError:
            raise ValueError(
                f"light must broadcast to the ray shape {tuple(origins.shape)}, got "
                f"{tuple(light.shape)}"
            ) from None
        flat_l, _ = pack([light], "* xyz")
    box_near, box_far = ray_box_intersection(flat_o, flat_d)
    t_near = _bound(near, box_near, ps[0], "near")
    t_far = _bound(far, box_far, ps[0], "far")
    length = (t_far - t_near).clamp_min(0.0)  # (n,)

    shape = (flat_o.shape[0], n_samples)
    like = dict(dtype=flat_o.dtype, device=flat_o.device)
    if stratified:
        offsets = torch.rand(shape, generator=generator, **like)
    else:
        offsets = torch.full(shape, 0.5, **like)
    bins = torch.arange(n_samples, dtype=flat_o.dtype, device=flat_o.device)
    depths = t_near[:, None] + (bins + offsets) / n_samples * length[:, None]  # (n, S)
    deltas = (length / n_samples)[:, None].expand_as(depths)

    def shade(
        o: Tensor, d: Tensor, t: Tensor, dt: Tensor, lt: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        o, d = (rearrange(v, "n xyz -> n 1 xyz") for v in (o, d))
        points = o + rearrange(t, "n s -> n s 1") * d  # (n, S, 3)
        if lt is None:
            density, albedo = field(points)  # (n, S), (n, S, C)
            emitted = 2.0 * albedo - 1.0
        else:
            density, albedo, gradient = _density_albedo_gradient(
                field, points, lighting.finite_difference_step
            )
            scale = torch.rsqrt(gradient.square().sum(-1) + lighting.normal_eps**2)  # (n, S)
            cosine = -torch.einsum("nsx,nx->ns", gradient, lt.to(gradient.dtype)) * scale
            factor = lighting.ambient + lighting.diffuse * cosine.clamp_min(0.0)
            emitted = 2.0 * albedo * factor[..., None] - 1.0
        weights, transmittance = emission_absorption(density, dt.to(density.dtype))
        color = torch.einsum("ns,nsc->nc", weights, emitted)
        return color, weights, transmittance

    if chunk_size is None or chunk_size >= flat_o.shape[0]:
        color, weights, transmittance = shade(flat_o, flat_d, depths, deltas, flat_l)
    else:
        recompute = torch.is_grad_enabled()
        pieces = []
        for start in range(0, flat_o.shape[0], chunk_size):
            args = (flat_o, flat_d, depths, deltas) + (() if flat_l is None else (flat_l,))
            args = tuple(a[start : start + chunk_size] for a in args)
            if recompute:
                pieces.append(checkpoint(shade, *args, use_reentrant=False))
            else:
                pieces.append(shade(*args))
        color, weights, transmittance = (torch.cat(p, dim=0) for p in zip(*pieces, strict=True))

    if isinstance(background, (int, float)):
        # a fill on the device: no host-to-device copy (and no host synchronisation) per render
        bg = torch.full((), float(background), dtype=color.dtype, device=color.device)
    else:
        bg = torch.as_tensor(background, dtype=color.dtype, device=color.device)
    if bg.dim() > 1 or (bg.dim() == 1 and bg.shape[0] not in (1, color.shape[-1])):
        raise ValueError(
            f"background must be a number or a ({color.shape[-1]},) tensor, got shape "
            f"{tuple(bg.shape)}"
        )
    color = color + transmittance[:, None] * bg
    [color] = unpack(color, ps, "* c")
    [weights] = unpack(weights, ps, "* s")
    [transmittance] = unpack(transmittance, ps, "*")
    [depths] = unpack(depths, ps, "* s")
    return RayRender(color, weights, transmittance, depths)


def _density_albedo_gradient(
    field: RadianceField, points: Tensor, step: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(density, albedo, gradient)`` at ``points (..., 3)``: the field's own, or central differences."""
    method = getattr(field, "density_albedo_gradient", None)
    if callable(method):
        return method(points)
    offsets = step * torch.eye(3, dtype=points.dtype, device=points.device)  # (3, xyz)
    offsets = offsets.view(3, *([1] * (points.dim() - 1)), 3)
    shifted = torch.cat([points[None], points + offsets, points - offsets])  # (7, ..., 3)
    density, albedo = field(shifted)
    gradient = (density[1:4] - density[4:7]) / (2.0 * step)  # (xyz, ...)
    return density[0], albedo[0], rearrange(gradient, "xyz ... -> ... xyz")


def render(
    field: RadianceField,
    azimuth: Tensor | float,
    elevation: Tensor | float,
    *,
    image_size: int = 16,
    n_samples: int = 32,
    radius: float = 3.0,
    fov: float | None = None,
    ortho_half_width: float = 1.0,
    background: float | Tensor = -1.0,
    near: float | None = None,
    far: float | None = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    shading: str = "none",
    lighting: Lighting | None = None,
    supersample: int = 1,
) -> Tensor:
    """Render a field from orbit cameras.

    Args:
        field: a `RadianceField`, e.g. a `VoxelField`.
        azimuth: ``B...`` radians (any batch shape, e.g. ``(R, 1)`` from a plate at ``dim=-2``).
        elevation: radians, broadcastable against ``azimuth``.
        image_size: ``H = W``, pixels per side (default 16, the digits teacher's size).
        n_samples: samples per ray.
        radius: camera distance from the origin.
        fov: perspective field of view in radians; ``None`` (default) for orthographic.
        ortho_half_width: half the side of an orthographic image in world units.
        background: value in ``[-1, 1]`` behind the field: a number or a ``(C,)`` tensor. The
            default ``-1`` is the black background of the digits data.
        near: distance from the ray origin where sampling starts; ``None`` (default) clips each
            ray to the cube ``[-1, 1]^3``.
        far: distance where sampling stops; ``None`` clips to the cube.
        stratified: jitter samples within their bins (see `render_rays`); off by default,
            so rendering is deterministic.
        generator: randomness for ``stratified=True``.
        chunk_size: rays per chunk (see `render_rays`).
        shading: ``"none"`` (default): emission only, ``sum_i w_i (2 c_i - 1)``, the digits
            teacher's model; ``"lambertian"``: ``sum_i w_i (2 c_i s_i - 1)`` with the
            Lambertian factor of ``lighting``, a key light fixed to the camera (the shapes
            teacher's renders; see the module docstring).
        lighting: the `Lighting` of ``shading="lambertian"`` (default `Lighting()`).
        supersample: anti-aliasing factor ``s``: render ``s * image_size`` pixels per side and
            average each ``s x s`` block (cost ``s^2``; 1, the default, for none).

    Returns:
        ``(*B, C, H, W)`` images in ``[-1, 1]``.

    Raises:
        ValueError: naming the offending argument (non-positive ``image_size`` / ``n_samples`` /
            ``supersample``, an unknown ``shading``, azimuth / elevation shapes that do not
            broadcast, ...).
    """
    image_size = _check_positive_int("image_size", image_size)
    n_samples = _check_positive_int("n_samples", n_samples)
    supersample = _check_positive_int("supersample", supersample)
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    if lighting is not None and shading != "lambertian":
        raise ValueError("lighting is only used with shading='lambertian'")
    cameras = Cameras(azimuth, elevation, radius=radius, fov=fov, ortho_half_width=ortho_half_width)
    origins, directions = cameras.rays(image_size * supersample)  # (*B, sH, sW, 3)
    light = None
    if shading == "lambertian":
        lighting = Lighting() if lighting is None else lighting
        if not isinstance(lighting, Lighting):
            raise ValueError(f"lighting must be a Lighting, got {type(lighting).__name__}")
        light = rearrange(lighting.direction(cameras), "... xyz -> ... 1 1 xyz")
    out = render_rays(
        field,
        origins,
        directions,
        n_samples=n_samples,
        near=near,
        far=far,
        background=background,
        stratified=stratified,
        generator=generator,
        chunk_size=chunk_size,
        light=light,
        lighting=lighting,
    )
    image = rearrange(out.color, "... h w c -> ... c h w")
    if supersample > 1:
        s = supersample
        image = reduce(image, "... c (h s1) (w s2) -> ... c h w", "mean", s1=s, s2=s)
    return image


def turntable(
    field: RadianceField,
    n_views: int = 8,
    elevation: float = math.radians(15.0),
    *,
    azimuth_offset: float = 0.0,
    **render_kwargs: Any,
) -> Tensor:
    """Render equally spaced views around the ``z`` axis.

    Args:
        field: the field to render.
        n_views: number of views; view ``k`` is at azimuth ``azimuth_offset + 2 pi k / n_views``.
        elevation: common elevation in radians.
        azimuth_offset: azimuth of the first view.
        **render_kwargs: forwarded to `render` (``image_size``, ``n_samples``, ...).

    Returns:
        ``(n_views, C, H, W)`` images in ``[-1, 1]``.
    """
    n_views = _check_positive_int("n_views", n_views)
    dtype = _field_dtype(field)
    azimuth = azimuth_offset + 2.0 * math.pi * torch.arange(n_views, dtype=dtype) / n_views
    device = _field_device(field)
    if device is not None:
        azimuth = azimuth.to(device)
    return render(field, azimuth, torch.full_like(azimuth, float(elevation)), **render_kwargs)


def _field_dtype(field: Any) -> torch.dtype:
    if isinstance(field, nn.Module):
        for p in field.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.get_default_dtype()


def _field_device(field: Any) -> torch.device | None:
    if isinstance(field, nn.Module):
        for p in field.parameters():
            return p.device
    return None


def save_turntable_png(
    field: RadianceField,
    path: str | os.PathLike[str],
    n_views: int = 8,
    scale: int = 4,
    *,
    gap: int = 1,
    **turntable_kwargs: Any,
) -> str:
    """Save a turntable as a horizontal strip PNG.

    Views are laid left to right, upscaled ``scale`` times by nearest neighbour so that 16 x 16
    renders are visible, and separated by ``gap`` mid-grey columns (in output pixels).
    ``[-1, 1]`` maps to black..white. One channel is drawn in grey, three as RGB, any other
    number one channel per row.

    Args:
        field: the field to render (without gradients).
        path: output file; parent folders are created.
        n_views: number of views.
        scale: integer upscaling factor, at least 1.
        gap: width of the separators in output pixels (0 for none).
        **turntable_kwargs: forwarded to `turntable` (``elevation``, ``image_size``, ...).

    Returns:
        The path written, as a string.
    """
    import matplotlib.image

    scale = _check_positive_int("scale", scale)
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap must be a non-negative integer, got {gap!r}")
    with torch.no_grad():
        views = turntable(field, n_views, **turntable_kwargs)  # (V, C, H, W)
    pixels = ((views.detach().double().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).numpy()
    channels = pixels.shape[1]
    if channels == 3:
        tiles = [rearrange(v, "c h w -> h w c") for v in pixels]
    else:
        tiles = [rearrange(v, "c h w -> (c h) w") for v in pixels]
    tiles = [np.repeat(np.repeat(t, scale, axis=0), scale, axis=1) for t in tiles]
    if gap:
        separator = np.full((tiles[0].shape[0], gap, *tiles[0].shape[2:]), 0.5)
        strip = [x for t in tiles for x in (t, separator)][:-1]
    else:
        strip = tiles
    image = np.concatenate(strip, axis=1)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if image.ndim == 2:
        matplotlib.image.imsave(path, image, cmap="gray", vmin=0.0, vmax=1.0)
    else:
        matplotlib.image.imsave(path, image)
    return path
