"""The rendered ``scenes`` data: determinism, NYUv2's conventions, and geometric consistency."""

from __future__ import annotations

import math

import pytest
import torch

from taskbalance.bench.scenes import (
    CLASSES,
    FLOOR,
    UNLABELLED,
    WALL,
    WINDOW,
    render_scenes,
    scene_splits,
)

H, W = 16, 24


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(60, seed=3, height=H, width=W)


def test_same_seed_same_scenes_other_seed_other_scenes(scenes):
    render_scenes.cache_clear()
    again = render_scenes(60, seed=3, height=H, width=W)
    assert again is not scenes  # really re-rendered, not the cache
    for name in ("images", "labels", "depth", "normals"):
        assert torch.equal(getattr(again, name), getattr(scenes, name))
    other = render_scenes(60, seed=4, height=H, width=W)
    assert not torch.equal(other.labels, scenes.labels)


def test_shapes_dtypes_and_ranges(scenes):
    assert scenes.images.shape == (60, 3, H, W)
    assert scenes.images.dtype == torch.float32
    assert scenes.labels.shape == (60, H, W)
    assert scenes.labels.dtype == torch.int64
    assert scenes.depth.shape == (60, 1, H, W)
    assert scenes.normals.shape == (60, 3, H, W)
    assert float(scenes.images.min()) >= 0
    assert float(scenes.images.max()) <= 1
    assert int(scenes.labels.min()) >= UNLABELLED
    assert int(scenes.labels.max()) < len(CLASSES) == 13
    assert float(scenes.depth.min()) >= 0


def test_missing_depth_and_missing_normals_coincide_and_normals_are_unit(scenes):
    missing = scenes.depth[:, 0] == 0
    norms = scenes.normals.norm(dim=1)
    assert torch.equal(norms == 0, missing)
    torch.testing.assert_close(norms[~missing], torch.ones_like(norms[~missing]))
    # Windows are glass: labelled, but without depth.
    windows = scenes.labels == WINDOW
    assert bool(windows.any())
    assert bool(missing[windows].all())
    # Some missing measurements and unlabelled pixels, as NYUv2, but not most of the image.
    assert 0.002 < float(missing.float().mean()) < 0.15
    assert 0.01 < float((scenes.labels == UNLABELLED).float().mean()) < 0.2


def test_normals_point_at_the_camera(scenes):
    """A visible surface faces the camera: ⟨n, ray⟩ < 0 for the ray through its pixel."""
    focal = (W / 2) / math.tan(math.radians(29))
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    rays = torch.stack([(u - W / 2) / focal, -(v - H / 2) / focal, torch.ones_like(u)])
    facing = (scenes.normals * rays).sum(1)
    valid = scenes.depth[:, 0] > 0
    assert bool((facing[valid] < 1e-4).all())


def test_floor_and_walls_are_planes_consistent_with_depth_and_normals(scenes):
    """Camera-frame points P = depth·ray of a plane with normal n all have the same ⟨n, P⟩."""
    focal = (W / 2) / math.tan(math.radians(29))
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    rays = torch.stack([(u - W / 2) / focal, -(v - H / 2) / focal, torch.ones_like(u)])
    checked = 0
    for index in range(len(scenes)):
        points = scenes.depth[index] * rays  # [3, H, W]
        normals = scenes.normals[index]
        for cls in (FLOOR, WALL):
            mask = (scenes.labels[index] == cls) & (scenes.depth[index, 0] > 0)
            if int(mask.sum()) < 4:
                continue
            n = normals[:, mask]
            # Walls: group pixels by their (identical) normal, one plane each.
            for plane in torch.unique(n.round(decimals=4), dim=1).T:
                on_plane = (n - plane[:, None]).abs().amax(0) < 1e-3
                offsets = (n[:, on_plane] * points[:, mask][:, on_plane]).sum(0)
                assert float(offsets.max() - offsets.min()) < 1e-3 * float(offsets.abs().max())
                checked += 1
        floor = (scenes.labels[index] == FLOOR) & (scenes.depth[index, 0] > 0)
        if bool(floor.any()):
            # The floor lies below the camera: ⟨n, P⟩ = −camera height ∈ [−1.6, −1.1].
            offset = (normals[:, floor] * points[:, floor]).sum(0).mean()
            assert -1.6 - 1e-3 < float(offset) < -1.1 + 1e-3
    assert checked > 60


def test_splits_are_disjoint_slices_and_items_follow_mtan_order():
    train, val, test = scene_splits((5, 3, 4), seed=7, height=8, width=16)
    assert (len(train), len(val), len(test)) == (5, 3, 4)
    whole = render_scenes(12, seed=7, height=8, width=16)
    image, (label, depth, normal) = test[1]
    assert torch.equal(image, whole.images[9])
    assert torch.equal(label, whole.labels[9])
    assert depth.shape == (1, 8, 16)
    assert normal.shape == (3, 8, 16)


def test_every_class_occurs_in_the_default_test_split():
    _, _, test = scene_splits()
    present = torch.unique(test.data.labels)
    assert set(range(13)) <= set(present.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"count": 0}, "count"), ({"count": 2, "height": -1}, "height")],
)
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_scenes(**kwargs)
    with pytest.raises(ValueError, match="sizes"):
        scene_splits((1, 0, 1))
