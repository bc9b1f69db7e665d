"""Tests of the differentiable voxel volume renderer (`carv_pyro.pipelines.render`)."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from carv_pyro.pipelines.render import (
    Cameras,
    Lighting,
    VoxelField,
    emission_absorption,
    random_cameras,
    ray_box_intersection,
    render,
    render_rays,
    save_turntable_png,
    turntable,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _field(resolution: int = 6, channels: int = 1, seed: int = 0, **kw) -> VoxelField:
    """A float64 field with lumpy density and albedo (noise large enough to break symmetry)."""
    kw.setdefault("noise_std", 0.7)
    kw.setdefault("peak_density", 3.0)
    return VoxelField(resolution, channels, seed=seed, dtype=F64, **kw)


def _set_logits(field: VoxelField, density: torch.Tensor, albedo: torch.Tensor | None = None):
    """Overwrite a field's parameters from target densities (>0) and optional albedo logits."""
    with torch.no_grad():
        field.density_logits.copy_(density + torch.log(-torch.expm1(-density)))
        if albedo is not None:
            field.albedo_logits.copy_(albedo.expand_as(field.albedo_logits))


# ----------------------------------------------------------------------------- conventions


def test_voxel_field_returns_voxel_values_at_voxel_centres():
    # Pins the grid_sample axis order: density_logits[k, j, i] lives at (x_i, y_j, z_k).
    field = _field(resolution=5, channels=2, seed=1)
    centers = field.voxel_centers()
    assert centers.shape == (5, 5, 5, 3)
    assert torch.allclose(centers[0, 0, :, 0], torch.linspace(-0.8, 0.8, 5, dtype=F64))
    assert torch.allclose(centers[:, 0, 0, 2], torch.linspace(-0.8, 0.8, 5, dtype=F64))
    density, albedo = field(centers)
    torch.testing.assert_close(density, field.density())
    torch.testing.assert_close(albedo, field.albedo().permute(1, 2, 3, 0))


def test_density_vanishes_outside_the_cube_and_albedo_is_clamped():
    field = _field(resolution=4, channels=1, seed=2)
    outside = torch.tensor([[1.3, 0.0, 0.0], [0.0, -1.01, 0.2], [0.1, 0.2, 2.0]], dtype=F64)
    density, albedo = field(outside)
    assert torch.all(density == 0)
    # Border padding: the albedo outside equals the albedo at the nearest face, and inside the
    # cube both are constant between the outermost voxel centre and the face.
    face = outside.clamp(-1, 1)
    torch.testing.assert_close(albedo, field(face)[1])
    shell = torch.tensor([[0.0, 0.0, 0.75], [0.0, 0.0, 0.9], [0.0, 0.0, 1.0]], dtype=F64)
    density, albedo = field(shell)
    torch.testing.assert_close(density, density[:1].expand(3))
    assert density[0] > 0


def test_camera_frames_are_orthonormal_and_look_at_origin():
    az, el = random_cameras((3, 2), _gen(0), elevation_range=(-1.5, 1.5), dtype=F64)
    cams = Cameras(az, el, radius=2.5)
    position, forward, right, up = cams.frames()
    eye = torch.eye(3, dtype=F64).expand(3, 2, 3, 3)
    basis = torch.stack([forward, right, up], dim=-2)
    torch.testing.assert_close(basis @ basis.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.linalg.cross(right, up), -forward)
    torch.testing.assert_close(position, -2.5 * forward)
    # Orthographic rays are parallel; perspective rays start at the camera and are unit length.
    origins, directions = cams.rays(5)
    torch.testing.assert_close(directions, forward[..., None, None, :].expand_as(directions))
    persp = Cameras(az, el, radius=2.5, fov=0.8)
    origins, directions = persp.rays(5)
    torch.testing.assert_close(origins, position[..., None, None, :].expand_as(origins))
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(3, 2, 5, 5, dtype=F64))


@pytest.mark.parametrize(
    ("center", "azimuth", "elevation", "where"),
    [
        ((0.0, 0.0, 0.6), 0.0, 0.0, "top"),  # world up +z is image up
        ((0.0, 0.6, 0.0), 0.0, 0.0, "right"),  # camera on +x: +y is to the right
        ((0.6, 0.0, 0.0), -math.pi / 2, 0.0, "right"),  # camera on -y: +x is to the right
        ((0.6, 0.0, 0.0), math.pi / 2, 0.0, "left"),  # camera on +y: +x is to the left
        ((0.6, 0.0, 0.0), 0.0, math.pi / 2, "bottom"),  # top view: +x is image down
    ],
)
def test_image_orientation(center, azimuth, elevation, where):
    field = VoxelField(8, dtype=F64, noise_std=0.0)
    d = (field.voxel_centers() - torch.tensor(center, dtype=F64)).norm(dim=-1)
    _set_logits(field, 1e-4 + 20.0 * (d < 0.35))
    img = render(field, azimuth, elevation, image_size=8)[0]  # (H, W)
    halves = {
        "top": (img[:4], img[4:]),
        "bottom": (img[4:], img[:4]),
        "left": (img[:, :4], img[:, 4:]),
        "right": (img[:, 4:], img[:, :4]),
    }
    bright, dark = halves[where]
    assert bright.max() > -0.5 and torch.allclose(dark, torch.full_like(dark, -1.0), atol=1e-3)


# ------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("seed", "options"),
    [
        (0, {}),
        (1, {"fov": 0.9, "background": 0.3, "channels": 2, "fast_mode": True}),
        (2, {"stratified": True, "fast_mode": True}),
    ],
)
def test_gradcheck_wrt_density_and_albedo_logits(seed, options):
    # Full Jacobian against central differences once; random projections (fast_mode) elsewhere.
    options = dict(options)
    fast_mode = options.pop("fast_mode", False)
    field = _field(resolution=4, channels=options.pop("channels", 1), seed=seed)
    azimuth, elevation = random_cameras((2,), _gen(seed), dtype=F64)
    params = (field.density_logits.detach().clone(), field.albedo_logits.detach().clone())

    def image(density_logits, albedo_logits):
        values = {"density_logits": density_logits, "albedo_logits": albedo_logits}
        fn = lambda points: functional_call(field, values, (points,))
        kw = dict(options)
        if kw.get("stratified"):
            kw["generator"] = _gen(100 + seed)  # same jitter on every call
        return render(fn, azimuth, elevation, image_size=4, n_samples=6, **kw)

    inputs = tuple(p.requires_grad_() for p in params)
    assert torch.autograd.gradcheck(
        image, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode
    )


def test_chunked_render_matches_unchunked_with_gradients():
    field = _field(resolution=5, channels=1, seed=3)
    az, el = random_cameras((3,), _gen(3), dtype=F64)
    out = []
    for chunk in (None, 7):
        field.zero_grad()
        img = render(field, az, el, image_size=6, n_samples=10, chunk_size=chunk)
        (img * torch.linspace(-1, 1, img.numel(), dtype=F64).view_as(img)).sum().backward()
        out.append((img.detach(), field.density_logits.grad.clone(), field.albedo_logits.grad))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- shading


class _Functional(nn.Module):
    """A field's forward and density_albedo_gradient, both callable with given parameters."""

    def __init__(self, field: VoxelField):
        super().__init__()
        self.field = field

    def forward(self, points, gradient=False):
        return self.field.density_albedo_gradient(points) if gradient else self.field(points)


def _with_params(field: VoxelField, density_logits, albedo_logits, use_gradient_method=True):
    """A radiance field evaluating ``field`` at the given logits (differentiable w.r.t. them)."""
    wrapper = _Functional(field)
    values = {"field.density_logits": density_logits, "field.albedo_logits": albedo_logits}

    class Field:
        def __call__(self, points):
            return functional_call(wrapper, values, (points,))

    if use_gradient_method:
        Field.density_albedo_gradient = lambda self, points: functional_call(
            wrapper, values, (points,), {"gradient": True}
        )
    return Field()


def test_voxel_density_gradient_is_exact_for_a_linear_density_and_zero_outside():
    # Central (and one-sided) differences are exact for a linear density; this pins the
    # (d/dx, d/dy, d/dz) channel order against the (z, y, x) voxel axes.
    field = VoxelField(6, dtype=F64, noise_std=0.0)
    slope = torch.tensor([0.7, -1.3, 2.1], dtype=F64)
    density = 5.0 + field.voxel_centers() @ slope
    _set_logits(field, density)
    torch.testing.assert_close(field.density(), density)
    assert field.density_gradient().shape == (3, 6, 6, 6)
    points = 1.6 * torch.rand(4, 7, 3, generator=_gen(0), dtype=F64) - 0.8
    d, a, g = field.density_albedo_gradient(points)
    assert d.shape == (4, 7) and a.shape == (4, 7, 1) and g.shape == (4, 7, 3)
    torch.testing.assert_close(g, slope.expand(4, 7, 3))
    torch.testing.assert_close((d, a), field(points))
    outside = torch.tensor([[1.2, 0.0, 0.0], [0.0, 0.0, -1.5]], dtype=F64)
    assert torch.all(field.density_albedo_gradient(outside)[2] == 0)


def _half_space(k: float = 25.0, peak: float = 400.0):
    """A smooth opaque half-space x < 0 of albedo 0.8: its outward normal is +x everywhere."""

    def field(points):
        density = peak * torch.sigmoid(-k * points[..., 0])
        return density, torch.full(points.shape[:-1] + (1,), 0.8, dtype=points.dtype)

    return field


@pytest.mark.parametrize(
    "lighting",
    [
        Lighting(),
        Lighting(ambient=0.1, diffuse=0.9, light_right=0.0, light_up=0.0, light_back=1.0),
        Lighting(ambient=0.2, diffuse=0.5, light_right=0.3, light_up=-0.8, light_back=0.5),
        Lighting(ambient=0.25, diffuse=0.75, light_right=0.0, light_up=0.0, light_back=-1.0),
    ],
)
def test_lambertian_pixel_of_a_surface_facing_the_camera(lighting):
    # Camera on +x looks at the face of x < 0: n = +x = -forward = the camera's "back" axis, so
    # n . l = light_back / |l| and the pixel is 2 c (ambient + diffuse max(0, n . l)) - 1.
    img = render(
        _half_space(),
        0.0,
        0.0,
        image_size=3,
        n_samples=400,
        shading="lambertian",
        lighting=lighting,
    )
    norm = math.sqrt(lighting.light_right**2 + lighting.light_up**2 + lighting.light_back**2)
    cosine = max(0.0, lighting.light_back / norm)
    expected = 2 * 0.8 * (lighting.ambient + lighting.diffuse * cosine) - 1
    torch.testing.assert_close(img, torch.full_like(img, expected), atol=2e-3, rtol=0)
    # The same surface unshaded is its albedo.
    flat = render(_half_space(), 0.0, 0.0, image_size=3, n_samples=400)
    torch.testing.assert_close(flat, torch.full_like(flat, 2 * 0.8 - 1), atol=2e-3, rtol=0)


def _sphere_field(resolution=24, radius=0.6):
    field = VoxelField(resolution, channels=1, dtype=F64, noise_std=0.0)
    r = field.voxel_centers().norm(dim=-1)
    _set_logits(field, 1e-6 + 30.0 * torch.sigmoid((radius - r) / 0.05))
    return field


@pytest.mark.parametrize(
    ("light", "bright", "dark"),
    [
        ((-1.0, 0.0, 0.3), "left", "right"),
        ((1.0, 0.0, 0.3), "right", "left"),
        ((0.0, 1.0, 0.3), "top", "bottom"),
    ],
)
def test_a_sphere_lit_from_one_side_is_brighter_on_that_side(light, bright, dark):
    lighting = Lighting(light_right=light[0], light_up=light[1], light_back=light[2])
    img = render(
        _sphere_field(),
        0.7,
        0.3,
        image_size=16,
        n_samples=48,
        shading="lambertian",
        lighting=lighting,
    )[0]
    halves = {"left": img[:, :8], "right": img[:, 8:], "top": img[:8], "bottom": img[8:]}
    # The silhouette is symmetric, so the difference of the halves is the shading alone: the
    # lit half sends at least 1.5 times as much light above the background (measured: ~2.3).
    assert (halves[bright] + 1).mean() > 1.5 * (halves[dark] + 1).mean()
    # The default key light is upper left: the upper-left quadrant is the brightest.
    img = render(_sphere_field(), 0.7, 0.3, image_size=16, n_samples=48, shading="lambertian")[0]
    quadrants = [img[:8, :8], img[:8, 8:], img[8:, :8], img[8:, 8:]]
    means = torch.stack([q.mean() for q in quadrants])
    assert int(means.argmax()) == 0 and int(means.argmin()) == 3


def test_shading_only_darkens_and_keeps_the_background():
    field = _field(resolution=6, channels=2, seed=11)
    az, el = random_cameras((3,), _gen(11), dtype=F64)
    flat = render(field, az, el, image_size=6, n_samples=12, background=-1.0)
    shaded = render(
        field, az, el, image_size=6, n_samples=12, background=-1.0, shading="lambertian"
    )
    # pixel = sum w (2 c s - 1) + T bg with s in [0, 1]: never brighter than unshaded, never
    # darker than the same weights on black albedo.
    assert torch.all(shaded <= flat + 1e-12)
    assert torch.all(shaded >= -1.0 - 1e-12)
    assert not torch.allclose(shaded, flat)


def test_finite_differences_and_the_voxel_gradient_give_the_same_shading():
    # A smooth field: the volume's central differences and central differences of the
    # interpolated density agree to discretisation error, far below the shading's range.
    field = _sphere_field(resolution=24)
    params = (field.density_logits.detach(), field.albedo_logits.detach())
    kw = dict(image_size=10, n_samples=48, shading="lambertian")
    own = render(_with_params(field, *params, use_gradient_method=True), 0.4, 0.2, **kw)
    fd = render(_with_params(field, *params, use_gradient_method=False), 0.4, 0.2, **kw)
    torch.testing.assert_close(own, render(field, 0.4, 0.2, **kw))
    torch.testing.assert_close(fd, own, atol=0.05, rtol=0)
    assert (own - render(field, 0.4, 0.2, image_size=10, n_samples=48)).abs().max() > 0.2


@pytest.mark.parametrize(
    ("seed", "use_gradient_method", "fast_mode"), [(0, True, False), (1, False, True)]
)
def test_gradcheck_of_shaded_render_wrt_logits(seed, use_gradient_method, fast_mode):
    # First-order derivatives through the normals (volume gradient, or finite differences of
    # the density for generic fields), against central differences of the whole render.
    field = _field(resolution=4, channels=1, seed=seed)
    azimuth, elevation = random_cameras((2,), _gen(seed), dtype=F64)
    lighting = Lighting(normal_eps=0.5)  # keeps the normal smooth where the field is flat

    def image(density_logits, albedo_logits):
        fn = _with_params(field, density_logits, albedo_logits, use_gradient_method)
        return render(
            fn,
            azimuth,
            elevation,
            image_size=3,
            n_samples=5,
            shading="lambertian",
            lighting=lighting,
            supersample=2,
        )

    inputs = (
        field.density_logits.detach().clone().requires_grad_(),
        field.albedo_logits.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(
        image, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode
    )


def test_shaded_render_backward_needs_no_double_backward():
    # The shading's normal is a linear function of the densities (no autograd.grad inside), so
    # one ordinary backward reaches the logits, and chunking with checkpointing agrees.
    field = _field(resolution=5, channels=1, seed=12)
    az, el = random_cameras((3,), _gen(12), dtype=F64)
    out = []
    for chunk in (None, 7):
        field.zero_grad()
        img = render(
            field, az, el, image_size=6, n_samples=10, chunk_size=chunk, shading="lambertian"
        )
        (img * torch.linspace(-1, 1, img.numel(), dtype=F64).view_as(img)).sum().backward()
        out.append((img.detach(), field.density_logits.grad.clone(), field.albedo_logits.grad))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b)
    assert out[0][1].abs().sum() > 0


def test_lighting_validates_its_settings():
    for kwargs, name in [
        ({"ambient": -0.1}, "ambient"),
        ({"diffuse": float("nan")}, "diffuse"),
        ({"ambient": 0.5, "diffuse": 0.6}, "ambient \\+ diffuse"),
        ({"light_right": 0.0, "light_up": 0.0, "light_back": 0.0}, "light direction"),
        ({"normal_eps": 0.0}, "normal_eps"),
        ({"finite_difference_step": -1.0}, "finite_difference_step"),
    ]:
        with pytest.raises(ValueError, match=name):
            Lighting(**kwargs)
    cams = Cameras(torch.tensor([0.3, 2.0]), torch.tensor([0.1, -0.4]))
    light = Lighting(light_right=0.0, light_up=0.0, light_back=2.0).direction(cams)
    torch.testing.assert_close(light, -cams.frames()[1])  # straight toward the camera


# ---------------------------------------------------------------------------- anti-aliasing


def test_supersampling_averages_a_finer_render():
    field = _field(resolution=6, channels=2, seed=13)
    az, el = random_cameras((2, 1), _gen(13), dtype=F64)
    for shading in ("none", "lambertian"):
        kw = dict(n_samples=10, shading=shading)
        coarse = render(field, az, el, image_size=4, supersample=3, **kw)
        fine = render(field, az, el, image_size=12, **kw)
        assert coarse.shape == (2, 1, 2, 4, 4)
        expected = fine.reshape(2, 1, 2, 4, 3, 4, 3).mean(dim=(-3, -1))
        torch.testing.assert_close(coarse, expected)
    torch.testing.assert_close(
        render(field, az, el, image_size=4, supersample=1), render(field, az, el, image_size=4)
    )


def test_supersampling_anti_aliases_an_edge():
    # A sharp edge through the middle of a pixel column renders as an intermediate grey.
    def slab(points):  # opaque for y < 1/8: the edge splits pixel column 4 of 8 in half
        density = 1e4 * (points[..., 1] < 0.125).to(points.dtype)
        return density, torch.ones(points.shape[:-1] + (1,), dtype=points.dtype)

    zero = torch.zeros((), dtype=F64)
    aliased = render(slab, zero, zero, image_size=8, n_samples=16)[0]
    smooth = render(slab, zero, zero, image_size=8, n_samples=16, supersample=4)[0]
    assert set(aliased[3].round().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(smooth[3, 4], torch.tensor(0.0, dtype=F64), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------- quadrature laws


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_samples=st.integers(1, 12),
    log_scale=st.floats(-4.0, 4.0),
    zero_fraction=st.floats(0.0, 1.0),
)
def test_emission_absorption_weights_are_a_subprobability(
    seed, n_samples, log_scale, zero_fraction
):
    gen = _gen(seed)
    density = math.exp(log_scale) * torch.rand(7, n_samples, generator=gen, dtype=F64)
    density = density * (torch.rand(7, n_samples, generator=gen, dtype=F64) > zero_fraction)
    deltas = torch.rand(7, 1, generator=gen, dtype=F64).expand(7, n_samples)
    weights, transmittance = emission_absorption(density, deltas)
    assert torch.all(weights >= 0) and torch.all(transmittance >= 0)
    assert torch.all(weights.sum(-1) <= 1 + 1e-12)
    torch.testing.assert_close(weights.sum(-1) + transmittance, torch.ones(7, dtype=F64))
    # Same numbers as the textbook exclusive cumprod of (1 - alpha).
    alpha = 1 - torch.exp(-density * deltas)
    survive = torch.cumprod(torch.cat([torch.ones(7, 1, dtype=F64), 1 - alpha], -1), -1)
    torch.testing.assert_close(weights, survive[:, :-1] * alpha)
    torch.testing.assert_close(transmittance, survive[:, -1])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    resolution=st.integers(2, 5),
    channels=st.integers(1, 3),
    peak=st.floats(0.0, 30.0),
    fov=st.one_of(st.none(), st.floats(0.2, 2.0)),
    background=st.floats(-1.0, 1.0),
)
def test_random_fields_render_valid_weights_and_images(
    seed, resolution, channels, peak, fov, background
):
    field = _field(resolution, channels, seed=seed, peak_density=peak, noise_std=2.0)
    az, el = random_cameras((2,), _gen(seed), elevation_range=(-1.5, 1.5), dtype=F64)
    origins, directions = Cameras(az, el, fov=fov).rays(3)
    out = render_rays(field, origins, directions, n_samples=5, background=background)
    assert out.weights.shape == (2, 3, 3, 5) and out.color.shape == (2, 3, 3, channels)
    assert torch.all(out.weights >= 0)
    assert torch.all(out.weights.sum(-1) <= 1 + 1e-12)
    torch.testing.assert_close(
        out.weights.sum(-1) + out.transmittance, torch.ones(2, 3, 3, dtype=F64)
    )
    assert torch.all(out.color.abs() <= 1 + 1e-12)
    assert torch.all(out.depths.diff(dim=-1) >= 0)


def test_empty_field_renders_background():
    field = VoxelField(6, channels=3, dtype=F64, seed=0)
    _set_logits(field, torch.full((6, 6, 6), 1e-16, dtype=F64))
    az, el = random_cameras((4,), _gen(0), dtype=F64)
    background = torch.tensor([-1.0, 0.25, 0.8], dtype=F64)
    img = render(field, az, el, image_size=5, background=background, fov=0.7)
    expected = background.view(3, 1, 1).expand(4, 3, 5, 5)
    torch.testing.assert_close(img, expected, atol=1e-12, rtol=0)
    img = render(field, az, el, image_size=5)  # default background: black, -1
    torch.testing.assert_close(img, torch.full_like(img, -1.0), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("azimuth", "elevation"), [(0.0, 0.0), (math.pi / 2, 0.0), (1.0, 1.57)])
def test_opaque_field_renders_its_albedo(azimuth, elevation):
    field = VoxelField(6, channels=3, dtype=F64, seed=0)
    albedo = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    logits = torch.log(albedo / (1 - albedo)).view(3, 1, 1, 1)
    _set_logits(field, torch.full((6, 6, 6), 60.0, dtype=F64), logits)
    img = render(field, azimuth, elevation, image_size=6, n_samples=24, background=0.0)
    # Centre pixels always cross the whole cube; along an axis every pixel does.
    window = img if elevation == 0.0 else img[:, 2:4, 2:4]
    expected = (2 * albedo - 1).view(3, 1, 1).expand_as(window)
    torch.testing.assert_close(window, expected, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------ batching


def test_plate_shaped_cameras_give_plate_shaped_images_equal_to_a_loop():
    field = _field(resolution=6, channels=2, seed=4)
    az, el = random_cameras((3, 1), _gen(4), dtype=F64)  # a Pyro plate of 3 at dim=-2
    img = render(field, az, el, image_size=5, n_samples=8)
    assert img.shape == (3, 1, 2, 5, 5)
    for r in range(3):
        single = render(field, az[r, 0], el[r, 0], image_size=5, n_samples=8)
        assert single.shape == (2, 5, 5)
        torch.testing.assert_close(img[r, 0], single)
    # A scalar elevation broadcasts against the azimuth batch.
    same = render(field, az, el[1, 0].item(), image_size=5, n_samples=8)
    torch.testing.assert_close(same[1], img[1])


def test_turntable_is_a_batch_of_equally_spaced_views():
    field = _field(resolution=6, channels=1, seed=5)
    views = turntable(field, n_views=4, elevation=0.2, image_size=6, n_samples=8)
    assert views.shape == (4, 1, 6, 6)
    torch.testing.assert_close(
        views[3], render(field, 1.5 * math.pi, 0.2, image_size=6, n_samples=8)
    )


def test_stratified_sampling_is_reproducible_and_jittered():
    field = _field(resolution=6, channels=1, seed=6)
    kw = dict(image_size=4, n_samples=6, stratified=True)
    a = render(field, 0.3, 0.1, generator=_gen(1), **kw)
    b = render(field, 0.3, 0.1, generator=_gen(1), **kw)
    mid = render(field, 0.3, 0.1, image_size=4, n_samples=6)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mid)
    torch.testing.assert_close(mid, render(field, 0.3, 0.1, image_size=4, n_samples=6))


# ---------------------------------------------------------------------------- symmetries


def test_azimuth_is_two_pi_periodic():
    field = _field(resolution=6, channels=2, seed=7)
    az, el = random_cameras((3,), _gen(7), dtype=F64)
    a = render(field, az, el, image_size=6, n_samples=12)
    b = render(field, az + 2 * math.pi, el, image_size=6, n_samples=12)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("fov", "shading"), [(None, "none"), (0.8, "none"), (None, "lambertian")])
def test_centred_sphere_looks_the_same_from_every_azimuth(fov, shading):
    field = VoxelField(24, channels=1, dtype=F64, noise_std=0.0)
    centers = field.voxel_centers()
    r = centers.norm(dim=-1)
    albedo = 3.0 * centers[..., 2]  # varies with height only: symmetric about the z axis
    _set_logits(field, 1e-6 + 3.0 * torch.sigmoid((0.6 - r) / 0.08), albedo)
    # Fixed near/far: the sample points of one view are a rotation of another's, so only the
    # voxelisation of the sphere (not the quadrature) can break the symmetry. The light is fixed
    # to the camera, so shading does not break it either.
    kw = dict(image_size=12, n_samples=32, near=1.2, far=4.8, fov=fov, shading=shading)
    azimuth = torch.linspace(-math.pi, math.pi, 9, dtype=F64)[:-1] + 0.1
    views = render(field, azimuth, torch.full_like(azimuth, 0.4), **kw)
    assert views.max() > 0.0  # the sphere is actually visible
    torch.testing.assert_close(views, views[:1].expand_as(views), atol=0.02, rtol=0)
    # Clipping rays to the cube changes only the quadrature, not the integral.
    del kw["near"], kw["far"]
    clipped = render(field, azimuth, torch.full_like(azimuth, 0.4), **kw)
    torch.testing.assert_close(clipped, views, atol=0.02, rtol=0)
    # The tolerance is tight enough to see an off-centre sphere turn.
    _set_logits(field, 1e-6 + 3.0 * torch.sigmoid((0.6 - (centers - 0.3).norm(dim=-1)) / 0.08))
    views = render(field, azimuth, torch.full_like(azimuth, 0.4), **kw)
    assert (views - views[:1]).abs().max() > 0.5


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -3}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": -1}, "n_samples"),
        ({"radius": 0.0}, "radius"),
        ({"fov": 3.2}, "fov"),
        ({"ortho_half_width": -1.0}, "ortho_half_width"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"near": -1.0}, "near"),
        ({"generator": torch.Generator()}, "generator"),
        ({"background": torch.zeros(2, 2)}, "background"),
        ({"supersample": 0}, "supersample"),
        ({"supersample": 1.5}, "supersample"),
        ({"shading": "phong"}, "shading"),
        ({"lighting": Lighting()}, "lighting"),
        ({"shading": "lambertian", "lighting": {"ambient": 0.2}}, "lighting"),
    ],
)
def test_bad_render_arguments_raise_value_error_naming_them(kwargs, name):
    field = VoxelField(4, seed=0)
    with pytest.raises(ValueError, match=name):
        render(field, torch.zeros(2), torch.zeros(2), **kwargs)


def test_mismatched_camera_shapes_raise_value_error():
    field = VoxelField(4, seed=0)
    with pytest.raises(ValueError, match="azimuth and elevation"):
        render(field, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="elevation_range"):
        random_cameras((2,), elevation_range=(0.5, 0.1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"resolution": 1}, "resolution"),
        ({"channels": 0}, "channels"),
        ({"init_albedo": 1.0}, "init_albedo"),
        ({"seed": 0, "generator": torch.Generator()}, "generator"),
    ],
)
def test_bad_field_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VoxelField(**kwargs)


def test_field_init_is_seeded_and_a_centred_blob():
    a, b = VoxelField(8, seed=3), VoxelField(8, seed=3)
    torch.testing.assert_close(a.density_logits, b.density_logits)
    assert not torch.equal(a.density_logits, VoxelField(8, seed=4).density_logits)
    density = a.density()
    assert density[3:5, 3:5, 3:5].min() > 5 * density[0].max()
    img = render(a, 0.0, 0.0, image_size=8)
    assert img[0, 3:5, 3:5].min() > img[0, 0].max()  # brighter in the middle
    assert img.min() >= -1 and img.max() <= 1


def test_ray_box_intersection_handles_axis_aligned_and_missing_rays():
    origins = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 0.5, -0.9], [-3.0, 2.0, 0.0], [0.0, 0, 0]])
    directions = torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3)
    near, far = ray_box_intersection(origins, directions)
    assert torch.isfinite(near).all() and torch.isfinite(far).all()
    torch.testing.assert_close(near, torch.tensor([2.0, 2.0, 2.0, 0.0]))
    torch.testing.assert_close(far - near, torch.tensor([2.0, 2.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------- output


@pytest.mark.parametrize("channels", [1, 3])
def test_save_turntable_png_writes_an_upscaled_strip(tmp_path, channels):
    field = VoxelField(6, channels=channels, seed=0)
    path = save_turntable_png(
        field, tmp_path / "sub" / "turn.png", n_views=3, scale=2, image_size=5, n_samples=8
    )
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (5 * 2, 3 * 5 * 2 + 2 * 1)
    # Nearest-neighbour upscaling: 2x2 blocks are constant.
    torch.testing.assert_close(torch.from_numpy(pixels[0]), torch.from_numpy(pixels[1]))
    with pytest.raises(ValueError, match="scale"):
        save_turntable_png(field, tmp_path / "x.png", scale=0)
