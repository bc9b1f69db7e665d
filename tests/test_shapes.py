"""Tests of the procedural shapes (`carv_pyro.pipelines.shapes`): SDFs, grids, occupancy, IoU."""

from __future__ import annotations

import math

import pytest
import torch

from carv_pyro.pipelines.render import VoxelField, emission_absorption, render
from carv_pyro.pipelines.shapes import (
    OCCUPANCY_DENSITY,
    OCCUPANCY_WALL,
    SHAPE_CLASSES,
    density_grid,
    density_occupancy,
    field_occupancy,
    iou,
    occupancy_grid,
    sdf,
    shape_field,
    voxel_centers,
)

F64 = torch.float64

# Points known inside / outside each shape in its canonical pose (see the module's table).
INSIDE_OUTSIDE = {
    "sphere": ([(0.0, 0.0, 0.0), (0.0, 0.0, 0.65)], [(0.0, 0.0, 0.75), (0.5, 0.5, 0.5)]),
    "cube": ([(0.5, 0.5, 0.5), (0.0, 0.0, -0.5)], [(0.55, 0.0, 0.0), (0.0, 0.0, 0.6)]),
    "cylinder": ([(0.5, 0.0, 0.55), (0.0, 0.0, -0.55)], [(0.45, 0.45, 0.0), (0.0, 0.0, 0.65)]),
    "cone": ([(0.0, 0.0, 0.6), (0.6, 0.0, -0.55)], [(0.4, 0.0, 0.4), (0.0, 0.0, -0.65)]),
    "torus": ([(0.58, 0.0, 0.0), (0.0, -0.75, 0.0)], [(0.0, 0.0, 0.0), (0.58, 0.0, 0.3)]),
    "pyramid": ([(0.55, 0.55, -0.5), (0.0, 0.0, 0.6)], [(0.5, 0.5, 0.3), (0.0, 0.0, -0.6)]),
    "octahedron": ([(0.85, 0.0, 0.0), (0.3, 0.3, 0.25)], [(0.5, 0.5, 0.0), (0.0, 0.0, 0.95)]),
    "tube": ([(0.6, 0.0, 0.3), (0.0, -0.5, -0.3)], [(0.0, 0.0, 0.0), (0.3, 0.0, 0.0)]),
    "arch": ([(0.0, 0.0, 0.5), (-0.5, 0.2, -0.6)], [(0.0, 0.0, -0.4), (0.0, 0.35, 0.5)]),
    "cross": ([(0.7, 0.0, 0.0), (0.0, 0.0, -0.7)], [(0.5, 0.5, 0.0), (0.5, 0.5, 0.5)]),
    "mug": ([(-0.55, 0.0, 0.0), (0.63, 0.0, 0.0)], [(-0.14, 0.0, 0.2), (0.34, 0.0, 0.02)]),
    "lblock": ([(-0.4, 0.3, 0.6), (0.6, -0.3, -0.6)], [(0.4, 0.0, 0.4), (-0.4, 0.4, 0.0)]),
}


def test_there_are_at_least_ten_classes_including_the_basic_solids():
    assert len(SHAPE_CLASSES) >= 10 and len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    for name in ("sphere", "cube", "cylinder", "cone", "torus", "pyramid"):
        assert name in SHAPE_CLASSES
    assert set(INSIDE_OUTSIDE) == set(SHAPE_CLASSES)


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_sdf_sign_at_known_points(name):
    inside, outside = INSIDE_OUTSIDE[name]
    assert torch.all(sdf(name, torch.tensor(inside, dtype=F64)) < 0)
    assert torch.all(sdf(name, torch.tensor(outside, dtype=F64)) > 0)
    # far away it stays clearly positive (polytopes' SDFs are lower bounds there: for the
    # octahedron (3 - 0.9) / sqrt(3) = 1.2 at distance 3)
    far = torch.tensor([[3.0, 0.0, 0.0], [0.0, -3.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
    assert torch.all(sdf(name, far) > 0.9)


@pytest.mark.parametrize(
    ("name", "point", "distance"),
    [
        ("sphere", (1.0, 0.0, 0.0), 0.3),
        ("cube", (0.0, 1.0, 0.0), 0.48),
        ("cube", (1.0, 1.0, 0.0), math.sqrt(2) * 0.48),
        ("cube", (0.0, 0.0, 0.0), -0.52),
        ("cylinder", (0.0, 0.0, 1.0), 0.4),
        ("cylinder", (0.85, 0.0, 0.0), 0.3),
        ("torus", (0.58, 0.0, 0.0), -0.24),
        ("torus", (0.0, 0.0, 0.0), 0.34),
        ("tube", (0.0, 0.0, 0.0), 0.46),  # hollow: the axis is 0.46 from the inner wall
        ("cone", (0.0, 0.0, 0.9), 0.2),  # above the apex at z = 0.7
        ("octahedron", (0.0, 0.0, 1.2), 0.3 / math.sqrt(3)),  # a lower bound near vertices
    ],
)
def test_exact_distances(name, point, distance):
    got = sdf(name, torch.tensor(point, dtype=F64))
    torch.testing.assert_close(got, torch.tensor(distance, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_sdf_is_one_lipschitz(name):
    # Exact SDFs, half-space intersections and min/max combinations of them never change faster
    # than the distance moved, so the density profile sharpness * sdf is a true width.
    gen = torch.Generator().manual_seed(0)
    p = 2.4 * torch.rand(4000, 3, generator=gen, dtype=F64) - 1.2
    q = p + 0.05 * torch.randn(4000, 3, generator=gen, dtype=F64)
    change = (sdf(name, p) - sdf(name, q)).abs()
    assert torch.all(change <= (p - q).norm(dim=-1) + 1e-12)


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_shapes_fill_the_frame_and_stay_inside_the_unit_ball(name):
    occ = occupancy_grid(name, 48)
    centres = voxel_centers(48, dtype=F64)[occ]
    radius = centres.norm(dim=-1).max()
    # inside the unit ball: framed by the orthographic half-width 1 from any direction
    assert radius < 1.0
    # and large: every shape reaches at least 0.65 from the centre
    assert radius > 0.65
    assert 0.03 < occ.double().mean() < 0.25


def test_voxel_centres_are_the_voxel_field_layout():
    for resolution in (2, 5, 16):
        torch.testing.assert_close(
            voxel_centers(resolution, dtype=F64),
            VoxelField(resolution, dtype=F64, noise_std=0.0).voxel_centers(),
        )


def test_occupancy_grid_axes_are_z_y_x():
    # The L-block's upright is on -x (full height), its foot on +x at the bottom.
    d = 16
    occ = occupancy_grid("lblock", d)
    index = lambda v: int((v + 1) * d / 2)  # world coordinate -> voxel index
    assert occ[index(0.4), index(0.0), index(-0.4)]  # [z, y, x]: upright, high
    assert not occ[index(0.4), index(0.0), index(0.4)]  # above the foot: empty
    assert occ[index(-0.4), index(0.0), index(0.4)]  # the foot
    assert not occ[index(0.0), index(0.6), index(-0.4)]  # beyond the depth along y


def test_an_asymmetric_shape_renders_where_its_grid_is():
    # Seen from -y (azimuth -90 deg), +x is to the right: the upright fills the left half top to
    # bottom, the foot the bottom right, and the top right is empty.
    field = shape_field("lblock", 32, dtype=F64)
    img = render(field, -math.pi / 2, 0.0, image_size=16, n_samples=48)[0]
    # windows of 3 x 3 pixels centred at (+-0.44, +-0.44) in world units, clear of the edges
    top_left, top_right = img[3:6, 3:6], img[3:6, 10:13]
    bottom_left, bottom_right = img[10:13, 3:6], img[10:13, 10:13]
    assert top_right.max() < -0.99
    for quadrant in (top_left, bottom_left, bottom_right):
        assert quadrant.min() > 0.5  # opaque: 2 * 0.85 - 1 = 0.7 unshaded
    # From +y (azimuth 90 deg) the same object is mirrored: the empty quadrant is top left.
    img = render(field, math.pi / 2, 0.0, image_size=16, n_samples=48)[0]
    assert img[3:6, 3:6].max() < -0.99 and img[3:6, 10:13].min() > 0.5


def test_the_occupancy_density_lets_half_the_light_through_the_thinnest_walls():
    _, transmittance = emission_absorption(
        torch.tensor([OCCUPANCY_DENSITY], dtype=F64), torch.tensor([OCCUPANCY_WALL], dtype=F64)
    )
    torch.testing.assert_close(transmittance, torch.tensor(0.5, dtype=F64))
    assert OCCUPANCY_DENSITY == pytest.approx(4 * math.log(2))
    # the tube's wall (0.26), the mug's handle (0.18) and the arch's depth (0.56) are of that
    # order: their true density grids are opaque through them
    density = density_grid("tube", 32, dtype=F64)
    assert density.max() * 0.26 > 4.0


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_density_grid_and_shape_field_have_the_shapes_occupancy(name):
    for d in (16, 32):
        density = density_grid(name, d, dtype=F64)
        assert density.shape == (d, d, d) and torch.all(density >= 0)
        assert density.max() <= 8 * OCCUPANCY_DENSITY  # the default peak
        truth = occupancy_grid(name, d)
        assert torch.equal(density_occupancy(density), truth)
        assert torch.equal(field_occupancy(shape_field(name, d, dtype=F64)), truth)
    # a sharper profile keeps the occupancy and sharpens the falloff
    soft, sharp = density_grid(name, 32, 8.0), density_grid(name, 32, 64.0)
    assert torch.equal(density_occupancy(soft), density_occupancy(sharp))
    outside = ~occupancy_grid(name, 32)
    assert sharp[outside].sum() < soft[outside].sum()


def test_shape_field_renders_like_a_voxel_field_of_its_density():
    field = shape_field("torus", 16, dtype=F64)
    torch.testing.assert_close(field.density(), density_grid("torus", 16, dtype=F64))
    torch.testing.assert_close(field.albedo(), torch.full((1, 16, 16, 16), 0.85, dtype=F64))


def test_iou_of_a_shape_with_itself_is_one_and_small_between_classes():
    grids = torch.stack([occupancy_grid(name, 32) for name in SHAPE_CLASSES])
    matrix = torch.stack([iou(grids, g) for g in grids])  # batched over the first argument
    assert matrix.shape == (len(SHAPE_CLASSES),) * 2
    torch.testing.assert_close(matrix.diagonal(), torch.ones(len(SHAPE_CLASSES), dtype=F64))
    off = matrix[~torch.eye(len(SHAPE_CLASSES), dtype=torch.bool)]
    # The most similar pairs (cone / pyramid, sphere / cylinder) overlap by under 0.75; most
    # pairs by far less.
    assert off.max() < 0.75 and off.median() < 0.3
    assert iou(grids[0], grids[0]) == 1.0 and isinstance(iou(grids[0], grids[1]), float)


def test_iou_counts_voxels():
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2] = True  # 8 voxels
    b[0, 1:3] = True  # 8 voxels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, torch.zeros_like(a)) == 0.0
    assert iou(torch.zeros_like(a), torch.zeros_like(a)) == 1.0  # both empty


def test_the_initial_blob_is_far_from_every_shape():
    # The starting point of SDS: IoU against each class; a carved field must beat these.
    occ = field_occupancy(VoxelField(32, seed=0))
    for name in SHAPE_CLASSES:
        assert iou(occ, occupancy_grid(name, 32)) < 0.5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sdf("dodecahedron", torch.zeros(3)), "unknown shape 'dodecahedron'"),
        (lambda: sdf("cube", torch.zeros(2, 2)), "points"),
        (lambda: sdf("cube", torch.zeros(3, dtype=torch.long)), "points"),
        (lambda: occupancy_grid("cube", 1), "resolution"),
        (lambda: density_grid("cube", 8, sharpness=0.0), "sharpness"),
        (lambda: density_grid("cube", 8, peak=-1.0), "peak"),
        (lambda: density_grid("cube", 8, peak=OCCUPANCY_DENSITY), "peak"),
        (lambda: shape_field("cube", 8, albedo=1.0), "albedo"),
        (lambda: iou(torch.zeros(4, 4, 4), torch.zeros(4, 4, 4)), "bool"),
        (lambda: iou(torch.zeros(4, 4, 4).bool(), torch.zeros(5, 5, 5).bool()), "grid shape"),
        (lambda: density_occupancy(torch.zeros(4, 4, 5)), "density"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()
