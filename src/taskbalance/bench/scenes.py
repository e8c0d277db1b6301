"""``scenes``: small rendered rooms with NYUv2's three dense tasks, generated from a seed.

Each image is a ray-cast view of a box-shaped room (floor, ceiling, walls) with wall patches
(windows, doors, paintings, screens) and furniture standing on the floor (boxes of four kinds,
spheres, cylinders), seen by a pinhole camera of random height, pitch and yaw. For every pixel
the renderer gives what NYUv2 gives:

- a **semantic class** among :data:`CLASSES` (13, as NYUv2's 13-class protocol), ``-1`` where
  unlabelled: small clutter objects, and a random 30% of the pixels on class boundaries (NYUv2's
  annotations leave thin gaps at boundaries);
- a **depth** in metres (the camera-frame z, as a depth sensor gives), 0 where missing: window
  glass, and the 1-pixel "sensor shadow" to the right of every depth edge of more than 0.4 m
  (the projector–camera offset of a structured-light sensor);
- a **surface normal** in camera coordinates (x right, y up, z forward; unit length), the zero
  vector wherever depth is missing (NYUv2's normals are computed from depth).

The RGB image is Lambertian shading under a point light near the ceiling plus ambient light,
on per-instance colours drawn independently of the class (so a class must be told by its shape,
placement and texture), with procedural textures (floor tiles, wood stripes, painted patterns),
emissive windows and Gaussian noise. Shading carries the normals, perspective and texture scale
carry depth, shape carries the class: the three tasks share a scene but want different
features, which is what makes their balance matter.

Everything is vectorised over scenes and pixels in torch and deterministic given the seed; a
few hundred 32×48 scenes take a second or two, and :func:`render_scenes` caches its result.

Example:
    >>> scenes = render_scenes(4, seed=0, height=16, width=24)
    >>> tuple(scenes.images.shape), tuple(scenes.labels.shape), tuple(scenes.normals.shape)
    ((4, 3, 16, 24), (4, 16, 24), (4, 3, 16, 24))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from taskbalance.bench.api import Benchmark, TrainingDefaults, register_benchmark
from taskbalance.bench.dense import dense_tasks
from taskbalance.bench.mtan import check_dense_model, dense_model
from taskbalance.bench.segnet import CPU_FILTERS

#: The 13 semantic classes (NYUv2's 13-class protocol has as many).
CLASSES = (
    "wall",
    "floor",
    "ceiling",
    "window",
    "door",
    "painting",
    "screen",
    "table",
    "bed",
    "cabinet",
    "crate",
    "ball",
    "barrel",
)
WALL, FLOOR, CEILING, WINDOW, DOOR, PAINTING, SCREEN = range(7)
TABLE, BED, CABINET, CRATE, BALL, BARREL = range(7, 13)

#: The label of unlabelled pixels (NYUv2's preprocessed files use -1).
UNLABELLED = -1

#: Default image size: 3:4 like NYUv2's 288×384, divisible by 8 for a 3-level SegNet.
DEFAULT_HEIGHT, DEFAULT_WIDTH = 32, 48

# Horizontal field of view of a Kinect-like camera, in degrees.
_FIELD_OF_VIEW = 58.0
_SHADOW_EDGE = 0.4  # metres: a depth step this large casts a missing-depth "sensor shadow"
_BOUNDARY_DROP = 0.3  # fraction of class-boundary pixels left unlabelled
_NOISE = 0.02

# (width range, height range, depth range) of each box class, in metres.
_BOX_SHAPES = {
    TABLE: ((0.5, 0.8), (0.35, 0.45), (0.4, 0.6)),
    BED: ((0.8, 1.1), (0.2, 0.3), (0.9, 1.2)),
    CABINET: ((0.3, 0.5), (0.8, 1.1), (0.2, 0.35)),
    CRATE: ((0.15, 0.3), (0.15, 0.3), (0.15, 0.3)),
}
# (width range, height range) of each wall-patch class, in metres.
_PATCH_SHAPES = {
    WINDOW: ((0.8, 1.4), (0.7, 1.1)),
    DOOR: ((0.8, 1.0), (1.9, 2.1)),
    PAINTING: ((0.4, 0.9), (0.3, 0.7)),
    SCREEN: ((0.6, 1.0), (0.35, 0.6)),
}


@dataclass(frozen=True)
class SceneData:
    """Rendered scenes: images and the three per-pixel targets.

    Attributes:
        images: RGB in [0, 1], ``[N, 3, H, W]`` float32.
        labels: classes in ``[0, 13)`` or ``-1``, ``[N, H, W]`` int64.
        depth: metres, 0 where missing, ``[N, 1, H, W]`` float32.
        normals: unit camera-frame normals, zero where missing, ``[N, 3, H, W]`` float32.
    """

    images: Tensor
    labels: Tensor
    depth: Tensor
    normals: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


class SceneDataset(Dataset[tuple[Tensor, tuple[Tensor, Tensor, Tensor]]]):
    """A :class:`torch.utils.data.Dataset` of rendered scenes.

    Items are ``(image, (label, depth, normal))``: ``[3, H, W]``, ``[H, W]``, ``[1, H, W]``,
    ``[3, H, W]``, in the order and conventions of MTAN's NYUv2 loader.

    Args:
        data: the rendered scenes.

    Example:
        >>> dataset = SceneDataset(render_scenes(2, seed=1, height=8, width=8))
        >>> image, (label, depth, normal) = dataset[0]
        >>> tuple(image.shape), tuple(depth.shape)
        ((3, 8, 8), (1, 8, 8))
    """

    def __init__(self, data: SceneData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        data = self.data
        return data.images[index], (data.labels[index], data.depth[index], data.normals[index])


def scene_splits(
    sizes: tuple[int, int, int] = (400, 100, 200),
    seed: int = 0,
    height: int = DEFAULT_HEIGHT,
    width: int = DEFAULT_WIDTH,
) -> tuple[SceneDataset, SceneDataset, SceneDataset]:
    """Train, validation and test datasets of disjoint scenes, all drawn from ``seed``.

    Args:
        sizes: number of scenes in each split.
        seed: the data seed (independent of any training seed).
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        ``(train, val, test)``.

    Example:
        >>> train, val, test = scene_splits((3, 2, 2), height=8, width=8)
        >>> len(train), len(val), len(test)
        (3, 2, 2)
    """
    if len(sizes) != 3 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
    ):
        raise ValueError(f"sizes must be three positive ints (train, val, test), got {sizes!r}")
    data = render_scenes(sum(sizes), seed, height, width)
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return tuple(  # type: ignore[return-value]
        SceneDataset(
            SceneData(
                data.images[lo:hi], data.labels[lo:hi], data.depth[lo:hi], data.normals[lo:hi]
            )
        )
        for lo, hi in pairwise(bounds)
    )


@lru_cache(maxsize=8)
def render_scenes(
    count: int, seed: int = 0, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH
) -> SceneData:
    """Render ``count`` scenes deterministically from ``seed`` (cached; do not modify).

    Args:
        count: number of scenes.
        seed: random seed of the scene layouts, colours, and noise.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        The :class:`SceneData`.

    Raises:
        ValueError: a non-positive count or size.
    """
    for name, value in (("count", count), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    return _Renderer(count, height, width, generator).render()


class _Renderer:
    """Ray casting of every scene at once: tensors are ``[S, P]`` (scenes × pixels)."""

    def __init__(self, count: int, height: int, width: int, generator: torch.Generator) -> None:
        self.count, self.height, self.width = count, height, width
        self.generator = generator

    def uniform(self, low: float, high: float, *shape: int) -> Tensor:
        size = shape or (self.count,)
        return low + (high - low) * torch.rand(size, generator=self.generator, dtype=torch.float64)

    def render(self) -> SceneData:
        H, W = self.height, self.width
        # Room: floor y = 0, ceiling y = top, walls x = ±half-widths, back wall z = back.
        self.left = self.uniform(-2.6, -1.6).unsqueeze(1)
        self.right = self.uniform(1.6, 2.6).unsqueeze(1)
        self.top = self.uniform(2.4, 3.0).unsqueeze(1)
        self.back = self.uniform(4.0, 7.0).unsqueeze(1)
        self.front = torch.full_like(self.back, -1.5)
        origin_y = self.uniform(1.1, 1.6)
        pitch = torch.deg2rad(self.uniform(8.0, 25.0))
        yaw = torch.deg2rad(self.uniform(-25.0, 25.0))

        # Camera-frame ray directions with unit z, so the ray parameter t is the depth.
        focal = (W / 2) / math.tan(math.radians(_FIELD_OF_VIEW / 2))
        v, u = torch.meshgrid(
            torch.arange(H, dtype=torch.float64) + 0.5,
            torch.arange(W, dtype=torch.float64) + 0.5,
            indexing="ij",
        )
        camera_dirs = torch.stack(
            [(u - W / 2) / focal, -(v - H / 2) / focal, torch.ones_like(u)], dim=-1
        ).reshape(1, H * W, 3)
        # World = R_yaw · R_pitch · camera (pitch looks down, yaw turns about the vertical).
        cp, sp, cy, sy = torch.cos(pitch), torch.sin(pitch), torch.cos(yaw), torch.sin(yaw)
        zero, one = torch.zeros_like(cp), torch.ones_like(cp)
        r_pitch = torch.stack(
            [
                torch.stack([one, zero, zero], -1),
                torch.stack([zero, cp, -sp], -1),
                torch.stack([zero, sp, cp], -1),
            ],
            -2,
        )
        r_yaw = torch.stack(
            [
                torch.stack([cy, zero, sy], -1),
                torch.stack([zero, one, zero], -1),
                torch.stack([-sy, zero, cy], -1),
            ],
            -2,
        )
        self.rotation = r_yaw @ r_pitch  # [S, 3, 3]
        self.dirs = camera_dirs @ self.rotation.transpose(1, 2)  # [S, P, 3]
        self.origin = torch.stack([zero, origin_y, zero], -1).unsqueeze(1)  # [S, 1, 3]

        self._room()
        self._wall_patches()
        self._boxes()
        self._spheres()
        self._cylinders()
        return self._finish()

    # ----- geometry ---------------------------------------------------------------------

    def _room(self) -> None:
        """The exit point of each ray from the room's box: floor, ceiling or a wall."""
        ox, oy, oz = self.origin.unbind(-1)
        dx, dy, dz = self.dirs.unbind(-1)
        big = torch.full_like(dx, math.inf)
        tx = torch.where(
            dx > 0, (self.right - ox) / dx, torch.where(dx < 0, (self.left - ox) / dx, big)
        )
        ty = torch.where(dy > 0, (self.top - oy) / dy, torch.where(dy < 0, (0 - oy) / dy, big))
        tz = torch.where(
            dz > 0, (self.back - oz) / dz, torch.where(dz < 0, (self.front - oz) / dz, big)
        )
        t, axis = torch.stack([tx, ty, tz]).min(dim=0)
        sign = torch.stack([dx, dy, dz]).gather(0, axis.unsqueeze(0)).squeeze(0).sign()
        normal = -torch.nn.functional.one_hot(axis, 3).double() * sign.unsqueeze(-1)
        label = torch.where(axis == 1, torch.where(sign > 0, CEILING, FLOOR), WALL)
        self.t = t
        self.normal = normal
        self.label = label.long()
        self.point = self.origin + t.unsqueeze(-1) * self.dirs
        self.missing = torch.zeros_like(t, dtype=torch.bool)
        # Which wall was hit, for the wall patches: 0 left, 1 right, 2 back, -1 otherwise.
        self.wall_id = torch.where(
            axis == 0, torch.where(sign < 0, 0, 1), torch.where((axis == 2) & (sign > 0), 2, -1)
        )
        px, py, pz = self.point.unbind(-1)
        floor_tiles = ((torch.floor(px / 0.6) + torch.floor(pz / 0.6)) % 2) * 0.25 + 0.75
        wall_grain = 1.0 + 0.06 * torch.sin(9 * px + 7 * py + 5 * pz)
        floor_colour = self._colours(0.3, 0.7)
        wall_colour = self._colours(0.55, 0.9, grey=0.7)
        ceiling_colour = self._colours(0.8, 0.95, grey=0.9)
        colour = torch.where(
            (label == FLOOR).unsqueeze(-1),
            floor_colour * floor_tiles.unsqueeze(-1),
            torch.where(
                (label == CEILING).unsqueeze(-1),
                ceiling_colour,
                wall_colour * wall_grain.unsqueeze(-1),
            ),
        )
        self.colour = colour
        self.emissive = torch.zeros_like(t, dtype=torch.bool)

    def _colours(self, low: float, high: float, grey: float = 0.0) -> Tensor:
        """One colour per scene, ``[S, 1, 3]``; ``grey`` pulls it towards its mean."""
        colour = self.uniform(low, high, self.count, 1, 3)
        return grey * colour.mean(-1, keepdim=True) + (1 - grey) * colour

    def _wall_patches(self, slots: int = 3) -> None:
        """Windows, doors, paintings and screens: flush rectangles on the walls."""
        kinds = torch.tensor([WINDOW, DOOR, PAINTING, SCREEN])
        for _ in range(slots):
            kind = kinds[torch.randint(0, 4, (self.count,), generator=self.generator)]
            present = torch.rand(self.count, generator=self.generator) < 0.75
            wall = torch.randint(0, 3, (self.count,), generator=self.generator)
            size_w = torch.zeros(self.count, dtype=torch.float64)
            size_h = torch.zeros(self.count, dtype=torch.float64)
            for cls, ((w0, w1), (h0, h1)) in _PATCH_SHAPES.items():
                chosen = kind == cls
                size_w = torch.where(chosen, self.uniform(w0, w1), size_w)
                size_h = torch.where(chosen, self.uniform(h0, h1), size_h)
            bottom = torch.where(kind == DOOR, 0.0, self.uniform(0.8, 1.3))
            # Horizontal coordinate along the chosen wall: z on side walls, x on the back wall.
            span_lo = torch.where(wall == 2, self.left[:, 0], torch.full_like(size_w, 0.5))
            span_hi = torch.where(wall == 2, self.right[:, 0], self.back[:, 0])
            centre = (
                span_lo
                + size_w / 2
                + (span_hi - span_lo - size_w).clamp_min(0) * self.uniform(0, 1)
            )
            px, py, pz = self.point.unbind(-1)
            along = torch.where((wall == 2).unsqueeze(1), px, pz)
            inside = (
                present.unsqueeze(1)
                & (self.wall_id == wall.unsqueeze(1))
                & ((along - centre.unsqueeze(1)).abs() < (size_w / 2).unsqueeze(1))
                & (py > bottom.unsqueeze(1))
                & (py < (bottom + size_h).unsqueeze(1))
            )
            pattern = torch.sign(torch.sin(14 * along) * torch.sin(11 * py)) * 0.25 + 0.75
            stripes = 0.85 + 0.15 * torch.sin(25 * along).abs()
            base = self._colours(0.1, 0.9)
            colour = torch.where(
                (kind == WINDOW).view(-1, 1, 1),
                torch.tensor([0.9, 0.95, 1.0], dtype=torch.float64),
                torch.where(
                    (kind == SCREEN).view(-1, 1, 1),
                    0.15 * base + 0.03,
                    torch.where(
                        (kind == DOOR).view(-1, 1, 1),
                        base * stripes.unsqueeze(-1),
                        base * pattern.unsqueeze(-1),
                    ),
                ),
            )
            self.colour = torch.where(inside.unsqueeze(-1), colour, self.colour)
            self.label = torch.where(inside, kind.unsqueeze(1), self.label)
            window = inside & (kind == WINDOW).unsqueeze(1)
            self.missing = self.missing | window
            self.emissive = self.emissive | window

    def _floor_positions(self, margin: Tensor) -> tuple[Tensor, Tensor]:
        """Random x, z on the floor in front of the camera, ``margin`` from the walls."""
        x = (
            self.left[:, 0]
            + margin
            + (self.right[:, 0] - self.left[:, 0] - 2 * margin) * self.uniform(0, 1)
        )
        z = 1.2 + margin + (self.back[:, 0] - 1.2 - 2 * margin).clamp_min(0) * self.uniform(0, 1)
        return x, z

    def _hit(self, t: Tensor, normal: Tensor, label: Tensor, colour: Tensor) -> None:
        """Z-buffer: keep the new surface where it is nearer."""
        nearer = t < self.t
        self.t = torch.where(nearer, t, self.t)
        self.normal = torch.where(nearer.unsqueeze(-1), normal, self.normal)
        self.label = torch.where(nearer, label, self.label)
        self.colour = torch.where(nearer.unsqueeze(-1), colour, self.colour)
        self.missing = self.missing & ~nearer
        self.emissive = self.emissive & ~nearer

    def _boxes(self, slots: int = 5) -> None:
        """Boxes standing on the floor, turned about the vertical; the slab method."""
        kinds = torch.tensor([TABLE, BED, CABINET, CRATE, UNLABELLED])
        for _ in range(slots):
            kind = kinds[torch.randint(0, 5, (self.count,), generator=self.generator)]
            present = torch.rand(self.count, generator=self.generator) < 0.7
            half = torch.zeros(self.count, 3, dtype=torch.float64)
            for cls, ranges in _BOX_SHAPES.items():
                size = torch.stack([self.uniform(lo, hi) for lo, hi in ranges], -1)
                half = torch.where((kind == cls).unsqueeze(-1), size / 2, half)
            clutter = torch.stack([self.uniform(0.05, 0.12) for _ in range(3)], -1)
            half = torch.where((kind == UNLABELLED).unsqueeze(-1), clutter, half)
            x, z = self._floor_positions(half.max(-1).values + 0.1)
            angle = self.uniform(0, math.pi)
            centre = torch.stack([x, half[:, 1], z], -1).unsqueeze(1)
            c, s = torch.cos(angle).unsqueeze(1), torch.sin(angle).unsqueeze(1)

            def to_local(vector: Tensor, c: Tensor = c, s: Tensor = s) -> Tensor:
                vx, vy, vz = vector.unbind(-1)
                return torch.stack([c * vx + s * vz, vy, -s * vx + c * vz], -1)

            origin = to_local(self.origin - centre)
            dirs = to_local(self.dirs)
            safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
            t1 = (-half.unsqueeze(1) - origin) / safe
            t2 = (half.unsqueeze(1) - origin) / safe
            t_near, axis = torch.minimum(t1, t2).max(-1)
            t_far = torch.maximum(t1, t2).min(-1).values
            hit = present.unsqueeze(1) & (t_near < t_far) & (t_near > 1e-6)
            t = torch.where(hit, t_near, torch.full_like(t_near, math.inf))
            local_normal = (
                torch.nn.functional.one_hot(axis, 3).double()
                * -dirs.gather(-1, axis.unsqueeze(-1)).sign()
            )
            nx, ny, nz = local_normal.unbind(-1)
            normal = torch.stack([c * nx - s * nz, ny, s * nx + c * nz], -1)
            local_point = origin + t.clamp(max=1e6).unsqueeze(-1) * dirs
            grain = (
                0.85 + 0.15 * torch.sin(30 * local_point[..., 0] + 3 * local_point[..., 2]).abs()
            )
            colour = self._colours(0.15, 0.9) * grain.unsqueeze(-1)
            self._hit(t, normal, kind.unsqueeze(1).expand_as(t), colour)

    def _spheres(self, slots: int = 2) -> None:
        """Balls on the floor; the ray–sphere quadratic."""
        for _ in range(slots):
            present = torch.rand(self.count, generator=self.generator) < 0.6
            radius = self.uniform(0.12, 0.35)
            x, z = self._floor_positions(radius + 0.1)
            centre = torch.stack([x, radius, z], -1).unsqueeze(1)
            offset = self.origin - centre
            a = (self.dirs * self.dirs).sum(-1)
            b = 2 * (offset * self.dirs).sum(-1)
            c = (offset * offset).sum(-1) - radius.unsqueeze(1) ** 2
            disc = b * b - 4 * a * c
            t = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
            hit = present.unsqueeze(1) & (disc > 0) & (t > 1e-6)
            t = torch.where(hit, t, torch.full_like(t, math.inf))
            point = self.origin + t.clamp(max=1e6).unsqueeze(-1) * self.dirs
            normal = (point - centre) / radius.view(-1, 1, 1)
            bands = 0.8 + 0.2 * torch.sign(torch.sin(12 * normal[..., 1]))
            colour = self._colours(0.15, 0.9) * bands.unsqueeze(-1)
            self._hit(t, normal, torch.full_like(t, BALL, dtype=torch.long), colour)

    def _cylinders(self, slots: int = 2) -> None:
        """Upright barrels on the floor: the side (a quadratic in x, z) and the top cap."""
        for _ in range(slots):
            present = torch.rand(self.count, generator=self.generator) < 0.6
            radius = self.uniform(0.12, 0.3).unsqueeze(1)
            top = self.uniform(0.4, 1.0).unsqueeze(1)
            x, z = self._floor_positions(radius[:, 0] + 0.1)
            ox = self.origin[..., 0] - x.unsqueeze(1)
            oz = self.origin[..., 2] - z.unsqueeze(1)
            oy = self.origin[..., 1]
            dx, dy, dz = self.dirs.unbind(-1)
            a = (dx * dx + dz * dz).clamp_min(1e-12)
            b = 2 * (ox * dx + oz * dz)
            c = ox * ox + oz * oz - radius**2
            disc = b * b - 4 * a * c
            t_side = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
            y_side = oy + t_side * dy
            side = (disc > 0) & (t_side > 1e-6) & (y_side > 0) & (y_side < top)
            t_cap = (top - oy) / torch.where(dy.abs() < 1e-12, torch.full_like(dy, -1e-12), dy)
            cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
            cap = (t_cap > 1e-6) & (cap_x**2 + cap_z**2 < radius**2)
            inf = torch.full_like(t_side, math.inf)
            t_side = torch.where(side, t_side, inf)
            t_cap = torch.where(cap, t_cap, inf)
            use_cap = t_cap < t_side
            t = torch.where(present.unsqueeze(1), torch.minimum(t_side, t_cap), inf)
            hit_x = ox + t_side.clamp(max=1e6) * dx
            hit_z = oz + t_side.clamp(max=1e6) * dz
            side_normal = torch.stack(
                [hit_x, torch.zeros_like(hit_x), hit_z], -1
            ) / radius.unsqueeze(-1)
            cap_normal = torch.zeros_like(side_normal)
            cap_normal[..., 1] = 1.0
            normal = torch.where(use_cap.unsqueeze(-1), cap_normal, side_normal)
            hoops = 0.8 + 0.2 * torch.sign(torch.sin(20 * (oy + t_side.clamp(max=1e6) * dy)))
            colour = self._colours(0.15, 0.9) * torch.where(use_cap, 1.0, hoops).unsqueeze(-1)
            self._hit(t, normal, torch.full_like(t, BARREL, dtype=torch.long), colour)

    # ----- shading and sensor conventions --------------------------------------------------

    def _finish(self) -> SceneData:
        S, H, W = self.count, self.height, self.width
        point = self.origin + self.t.unsqueeze(-1) * self.dirs
        light = torch.stack(
            [
                torch.zeros(S, dtype=torch.float64),
                self.top[:, 0] - 0.2,
                self.back[:, 0] * self.uniform(0.2, 0.6),
            ],
            -1,
        ).unsqueeze(1)
        to_light = torch.nn.functional.normalize(light - point, dim=-1)
        diffuse = (self.normal * to_light).sum(-1).clamp_min(0)
        shade = torch.where(self.emissive, 1.0, 0.3 + 0.7 * diffuse)
        image = self.colour * shade.unsqueeze(-1)
        image = image + _NOISE * torch.randn(
            image.shape, generator=self.generator, dtype=torch.float64
        )
        images = image.clamp(0, 1).reshape(S, H, W, 3).permute(0, 3, 1, 2)

        depth = self.t.reshape(S, H, W)
        labels = self.label.reshape(S, H, W)
        # Camera-frame normals: R^T n (R maps camera to world).
        normals = (self.normal @ self.rotation).reshape(S, H, W, 3).permute(0, 3, 1, 2)
        missing = self.missing.reshape(S, H, W).clone()
        # Sensor shadow: the pixel right of a near-to-far depth step has no measurement.
        step = depth[:, :, 1:] - depth[:, :, :-1] > _SHADOW_EDGE
        missing[:, :, 1:] |= step
        # Unlabelled gaps at class boundaries, as in NYUv2's hand annotation.
        boundary = torch.zeros_like(missing)
        boundary[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
        boundary[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
        drop = torch.rand(boundary.shape, generator=self.generator) < _BOUNDARY_DROP
        labels = torch.where(boundary & drop, UNLABELLED, labels)

        depth = torch.where(missing, 0.0, depth).unsqueeze(1)
        normals = torch.where(missing.unsqueeze(1), 0.0, normals)
        return SceneData(
            images=images.float().contiguous(),
            labels=labels.long().contiguous(),
            depth=depth.float().contiguous(),
            normals=normals.float().contiguous(),
        )


# ---------------------------------------------------------------------------------------------
# The benchmark.

#: Scenes per split (train, validation, test) and for ``--small``.
SIZES = (400, 100, 200)
SMALL_SIZES = (64, 16, 32)
DESCRIPTION = (
    "rendered rooms, 32×48: 13-class segmentation, depth, normals (NYUv2's 3 tasks, 9 metrics)"
)
DEFAULTS = TrainingDefaults(epochs=10, batch_size=16, lr=3e-3, eval_batch_size=100)
# Enough steps that every single-task baseline metric is non-zero (Δm% divides by them).
SMALL_DEFAULTS = TrainingDefaults(
    epochs=3, batch_size=8, lr=2e-3, schedule="constant", eval_batch_size=100
)


#: ``scenes``' default model: the split SegNet, whose shared features make gradient methods
#: cheap (features mode) on a CPU, and the model of the comparison in the docs;
#: ``--model mtan`` runs MTAN's attention network at the same size (parameters mode).
DEFAULT_MODEL = "segnet"


def build(small: bool = False, data_seed: int = 0, model: str = DEFAULT_MODEL) -> Benchmark:
    """Build ``scenes``: NYUv2's protocol on rendered rooms.

    The metrics are those of the NYUv2 tables accumulated over the split as LibMTL does
    (:func:`taskbalance.bench.dense.dense_tasks`); mIoU averages over the classes present in
    the split (every class occurs in the default test split, so this equals the reference).

    Args:
        small: 64/16/32 scenes and 3 epochs, for smoke tests.
        data_seed: seed of the rendered scenes.
        model: ``"segnet"`` (default, the split SegNet) or ``"mtan"`` (MTAN's attention
            network, :class:`~taskbalance.bench.mtan.SegNetMTAN`), both at
            :data:`~taskbalance.bench.segnet.CPU_FILTERS`; recorded in ``settings``.

    Returns:
        The benchmark.

    Raises:
        BenchmarkError: an unknown ``model``.

    Example:
        >>> build(small=True, model="mtan").settings["model"]
        'mtan'
    """
    name = check_dense_model(model)

    def build_model() -> nn.Module:
        return dense_model(name, (len(CLASSES), 1, 3), (False, False, True), CPU_FILTERS)

    sizes = SMALL_SIZES if small else SIZES
    train, validation, test = scene_splits(sizes, data_seed)
    return Benchmark(
        name="scenes",
        tasks=dense_tasks(len(CLASSES), empty_classes="ignore"),
        train=train,
        validation=validation,
        test=test,
        model=build_model,
        defaults=SMALL_DEFAULTS if small else DEFAULTS,
        description=DESCRIPTION,
        settings={
            "data_seed": data_seed,
            "small": small,
            "scenes": list(sizes),
            "height": DEFAULT_HEIGHT,
            "width": DEFAULT_WIDTH,
            "model": name,
            "filters": list(CPU_FILTERS),
        },
    )


register_benchmark(
    "scenes",
    build,
    description=DESCRIPTION,
    tasks=(
        "segmentation: cross-entropy; mIoU ↑, pixel acc ↑",
        "depth: L1; abs err ↓, rel err ↓",
        "normal: 1 − cos; mean ↓, median ↓, within 11.25° ↑ 22.5° ↑ 30° ↑",
    ),
)
