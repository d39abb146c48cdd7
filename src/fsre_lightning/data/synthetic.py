"""Procedural, seeded KITTI-like driving sequences written in the KITTI raw layout (SPEC 5).

The scenes give the pipeline something to train and evaluate on without the real data set:
a camera 1.65 m above a flat road drives forward (0.5-1.5 m per frame, small smooth yaw)
past sidewalks, terrain, building facades, poles with signs, parked cars and trees, all
ray-cast analytically with numpy. Every surface is textured by noise evaluated at the 3-D
world hit point, so a surface point has the same colour in every frame (photometric
self-supervision needs this), and each pixel has an exact metric z-depth and a Cityscapes
train-id label.

Conventions: world and camera axes are x right, y down, z forward. The road is the plane
y = +1.65 (world), the camera centre stays at y = 0 with zero pitch and roll, so a road pixel
at row v has depth 1.65 * fy / (v - cy). Pixel (u, v) = (column, row) is cast through
exactly those coordinates (no +0.5 offset), like `fsre_lightning.geometry.backproject`.
Depth is along the optical axis (z), 0 for sky (no ground truth).

Layout written by `generate_synthetic_kitti` under `root`:
    <DATE>/<DATE>_drive_<NNNN>_sync/image_02/data/<frame:010d>.png   RGB
    <DATE>/<DATE>_drive_<NNNN>_sync/poses.txt                         3 x 4 camera-to-world rows
    segmentation/<DATE>/<DATE>_drive_<NNNN>_sync/image_02/<frame:010d>.png   train ids
    splits/synthetic/{train,val,test}_files.txt, gt_depths.npz (test), gt_depths_val.npz (val)
    synthetic.json   parameters, written last: its presence marks a complete generation
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fsre_lightning.data.kitti import save_gt_depths

logger = logging.getLogger(__name__)

DATE = "2011_01_01"
SPLIT_NAME = "synthetic"
FORMAT_VERSION = 1

# KITTI's normalised intrinsics (fx, fy, cx, cy), the same as geometry.KITTI_INTRINSICS; kept
# local so that worker processes need only numpy.
NORMALIZED_INTRINSICS = (0.58, 1.92, 0.5, 0.5)
CAMERA_HEIGHT = 1.65
GROUND_Y = CAMERA_HEIGHT  # world y of the road plane (y points down, the camera is at y = 0)
MAX_DEPTH = 100.0  # nothing farther is rendered (it becomes sky)
MIN_STEP, MAX_STEP = 0.5, 1.5  # metres driven per frame

# Cityscapes train ids used by the scenes.
ROAD, SIDEWALK, BUILDING, POLE, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, CAR = (
    0, 1, 2, 5, 7, 8, 9, 10, 13
)

# Materials (texture programs); the label follows from the material (ground: from x).
_M_GROUND, _M_SIDEWALK, _M_BUILDING, _M_POLE, _M_CAR, _M_LEAVES, _M_TRUNK, _M_SIGN = range(8)
_MATERIAL_LABEL = {
    _M_SIDEWALK: SIDEWALK, _M_BUILDING: BUILDING, _M_POLE: POLE, _M_CAR: CAR,
    _M_LEAVES: VEGETATION, _M_TRUNK: VEGETATION, _M_SIGN: TRAFFIC_SIGN,
}
_ROAD_HALF_WIDTH = 6.0
_SIDEWALK_OUTER = 8.5
_SUN = np.array([-0.45, -1.0, 0.35]) / np.linalg.norm([-0.45, -1.0, 0.35])
_EPS = 1e-4


@dataclass
class Frame:
    """One rendered frame: RGB uint8 H x W x 3, z-depth float32 (0 = sky), train-id labels
    uint8, camera-to-world 4 x 4 float64 and pixel intrinsics K 4 x 4 float64."""

    rgb: np.ndarray
    depth: np.ndarray
    labels: np.ndarray
    cam_to_world: np.ndarray
    K: np.ndarray


@dataclass
class _Scene:
    """Analytic primitives: axis-aligned boxes (x0, y0, z0, x1, y1, z1) and vertical cylinders
    (cx, cz, r, y0, y1), each with a material and a base colour."""

    boxes: np.ndarray
    box_material: np.ndarray
    box_color: np.ndarray
    cylinders: np.ndarray
    cyl_material: np.ndarray
    cyl_color: np.ndarray


def intrinsics(height: int, width: int) -> np.ndarray:
    """4 x 4 pixel intrinsics at this resolution (KITTI's normalised values)."""
    fx, fy, cx, cy = NORMALIZED_INTRINSICS
    K = np.eye(4)
    K[0, 0], K[0, 2] = fx * width, cx * width
    K[1, 1], K[1, 2] = fy * height, cy * height
    return K


# --------------------------------------------------------------------------- noise / textures


def _hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """Integer lattice hash -> float in [0, 1)."""
    h = (ix * np.uint32(73856093)) ^ (iy * np.uint32(19349663)) ^ (iz * np.uint32(83492791))
    h = h ^ np.uint32(salt * 2654435761 % 2**32)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h.astype(np.float32) * np.float32(1.0 / 2**32)


def _lattice(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i = np.floor(x)
    return i.astype(np.int64).astype(np.uint32), (x - i).astype(np.float32)


def _value_noise(p: np.ndarray, salt: int) -> np.ndarray:
    """Trilinear value noise in [0, 1] at N x 3 points (lattice spacing 1)."""
    (ix, fx), (iy, fy), (iz, fz) = (_lattice(p[:, k]) for k in range(3))
    ux, uy, uz = (f * f * (3 - 2 * f) for f in (fx, fy, fz))
    one = np.uint32(1)
    out = np.zeros(len(p), np.float32)
    for dx in (0, 1):
        wx = ux if dx else 1 - ux
        jx = ix + one if dx else ix
        for dy in (0, 1):
            wy = uy if dy else 1 - uy
            jy = iy + one if dy else iy
            for dz in (0, 1):
                wz = uz if dz else 1 - uz
                jz = iz + one if dz else iz
                out += wx * wy * wz * _hash(jx, jy, jz, salt)
    return out


def _octave_weight(wavelength: float, footprint: np.ndarray) -> np.ndarray:
    """Fade detail finer than ~2 pixels (a cheap mip-map): avoids aliasing that would make
    the same surface point flicker between frames."""
    return np.clip(wavelength / (2.0 * footprint) - 1.0, 0.0, 1.0).astype(np.float32)


def _fbm(
    p: np.ndarray, footprint: np.ndarray, wavelength: float, octaves: int, salt: int
) -> np.ndarray:
    """Band-limited multi-octave noise, zero mean, standard deviation about 0.12."""
    out = np.zeros(len(p), np.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        w = _octave_weight(wavelength, footprint)
        if np.any(w > 0):
            out += np.float32(amp) * w * (_value_noise(p / wavelength, salt + 17 * o) - 0.5)
        norm += amp * amp
        amp *= 0.6
        wavelength *= 0.5
    return out / np.float32(np.sqrt(norm))


def _pulse(x: np.ndarray, lo: float, hi: float, width: np.ndarray) -> np.ndarray:
    """Anti-aliased indicator of lo <= x <= hi (edges blurred over `width`)."""
    a = np.clip((x - lo) / width + 0.5, 0.0, 1.0)
    b = np.clip((x - hi) / width + 0.5, 0.0, 1.0)
    return (a - b).astype(np.float32)


def _periodic_pulse(x: np.ndarray, period: float, lo: float, hi: float, width: np.ndarray):
    return _pulse(np.mod(x, period), lo, hi, width)


def _shade_ground(
    p: np.ndarray, fp: np.ndarray, fp_iso: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Road (asphalt, lane markings) or terrain by lateral position. `fp_iso` is the pixel
    footprint without the grazing-angle stretch: it filters streaks elongated along z, which
    keep lateral texture on the road far ahead."""
    x = p[:, 0]
    road = np.abs(x) <= _ROAD_HALF_WIDTH
    color = np.empty((len(p), 3), np.float32)
    # Asphalt: grey with fine grain and larger patches.
    n = _fbm(p, fp, 4.0, 6, salt=1)
    streaks = _fbm(p * np.array([1.0, 1.0, 0.12]), fp_iso, 0.8, 4, salt=4)
    g = 0.34 + 0.5 * n + 0.22 * streaks
    asphalt = np.stack([g, g, g * 1.04], 1)
    w = np.maximum(fp, 0.02)
    dashes = _periodic_pulse(p[:, 2], 6.0, 0.0, 3.0, w) * _pulse(x, -0.08, 0.08, w)
    edges = _pulse(np.abs(x), _ROAD_HALF_WIDTH - 0.45, _ROAD_HALF_WIDTH - 0.3, w)
    paint = np.clip(dashes + edges, 0, 1)[:, None] * 0.55
    asphalt = asphalt * (1 - paint) + 0.85 * paint
    # Terrain: grass and soil.
    n2 = _fbm(p, fp, 3.0, 6, salt=2)
    soil = _fbm(p, fp, 8.0, 2, salt=3)[:, None]
    n2 = n2 + 0.7 * _fbm(p * np.array([1.0, 1.0, 0.12]), fp_iso, 0.8, 3, salt=5)
    grass = np.stack([0.30 + 0.3 * n2, 0.42 + 0.4 * n2, 0.16 + 0.2 * n2], 1)
    terrain = grass + soil * np.array([0.35, 0.1, 0.0], np.float32)
    color[:] = np.where(road[:, None], asphalt, terrain)
    labels = np.where(road, ROAD, TERRAIN).astype(np.uint8)
    return color, labels


def _facade_coords(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Horizontal coordinate along a vertical face (z for faces normal to x, else x)."""
    return np.where(np.abs(n[:, 0]) > 0.5, p[:, 2], p[:, 0])


def _shade_material(
    material: int, p: np.ndarray, n: np.ndarray, fp: np.ndarray, base: np.ndarray,
    prim: np.ndarray,
) -> np.ndarray:
    """Albedo (N x 3) of one material at world points p with normals n."""
    w = np.maximum(fp, 0.01)
    salt = 100 + material
    if material == _M_SIDEWALK:
        tiles = (_periodic_pulse(p[:, 0], 0.6, 0.0, 0.04, w)
                 + _periodic_pulse(p[:, 2], 0.6, 0.0, 0.04, w)).clip(0, 1)
        tiles = tiles * _octave_weight(0.6, fp)
        g = 0.56 + 0.3 * _fbm(p, fp, 2.0, 5, salt) - 0.18 * tiles
        return np.stack([g * 1.02, g, g * 0.95], 1) * base
    if material == _M_BUILDING:
        h = _facade_coords(p, n)
        y = GROUND_Y - p[:, 1]  # height above the road
        # Bricks with per-brick tint.
        row = np.floor(y / 0.3)
        col = np.floor((h + 0.3 * np.mod(row, 2)) / 0.6)
        brick = _hash(col.astype(np.int64).astype(np.uint32), row.astype(np.int64).astype(
            np.uint32), prim.astype(np.uint32), salt) - 0.5
        mortar = (_periodic_pulse(y, 0.3, 0.0, 0.04, w)
                  + _periodic_pulse(h + 0.3 * np.mod(row, 2), 0.6, 0.0, 0.04, w)).clip(0, 1)
        detail = _octave_weight(0.3, fp)
        wall = base * (1.0 + 0.8 * _fbm(p, fp, 2.0, 5, salt)[:, None]
                       + (detail * (0.25 * brick - 0.3 * mortar))[:, None])
        # Windows: floors 3.2 m, bays 2.6 m; none on the ground floor's lower part.
        win = (_periodic_pulse(y, 3.2, 1.0, 2.4, w) * _periodic_pulse(h, 2.6, 0.6, 1.9, w)
               * (y > 2.5) * (np.abs(n[:, 1]) < 0.5))
        glass = np.stack([0.12, 0.16, 0.22], 0) + 0.25 * _fbm(p, fp, 1.5, 3, salt + 5)[:, None]
        return wall * (1 - win[:, None]) + glass * win[:, None]
    if material == _M_POLE:
        g = 0.5 + 0.4 * _fbm(p, fp, 1.0, 4, salt)
        band = _periodic_pulse(p[:, 1], 1.0, 0.0, 0.15, w) * _octave_weight(0.3, fp)
        return np.stack([g, g, g], 1) * base * (1 - 0.3 * band)[:, None]
    if material == _M_CAR:
        y = GROUND_Y - p[:, 1]
        glass = _pulse(y, 1.0, 1.4, w) * (np.abs(n[:, 1]) < 0.5)
        wheel = _pulse(y, 0.0, 0.45, w)
        body = base * (1.0 + 0.6 * _fbm(p, fp, 1.0, 5, salt)[:, None]) + 0.05
        dark = np.array([0.08, 0.09, 0.11], np.float32) + 0.2 * _fbm(p, fp, 0.8, 3, salt + 3)[
            :, None]
        mix = np.clip(glass + wheel, 0, 1)[:, None]
        return body * (1 - mix) + dark * mix
    if material == _M_LEAVES:
        n1 = _fbm(p, fp, 1.5, 6, salt)
        return base * (1.0 + 1.1 * n1[:, None])
    if material == _M_TRUNK:
        return base * (1.0 + 0.6 * _fbm(p * [3.0, 0.5, 3.0], fp, 1.0, 4, salt)[:, None])
    if material == _M_SIGN:
        rim = 1 - _pulse(np.abs(p[:, 1] - np.round(p[:, 1] * 2) / 2), 0, 0.2, w)
        return base * (1.0 + 0.15 * _fbm(p, fp, 0.5, 3, salt)[:, None]) * (0.7 + 0.3 * rim[
            :, None])
    raise ValueError(f"unknown material {material}")


# --------------------------------------------------------------------------- scene and path


def _trajectory(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """num_frames camera-to-world poses: forward steps in [0.5, 1.5] m, smooth small yaw."""
    base = rng.uniform(0.75, 1.25)
    amp = rng.uniform(0.0, 0.2)
    period = rng.uniform(25, 60)
    phase = rng.uniform(0, 2 * np.pi)
    k = np.arange(num_frames)
    steps = np.clip(base + amp * np.sin(2 * np.pi * k / period + phase), MIN_STEP, MAX_STEP)
    yaw_amp = rng.uniform(0.01, 0.035)
    yaw_len = rng.uniform(40, 90)
    yaw_phase = rng.uniform(0, 2 * np.pi)
    poses = np.zeros((num_frames, 4, 4))
    pos = np.array([rng.uniform(1.6, 2.4), 0.0, 0.0])  # right lane
    s = 0.0
    for i in range(num_frames):
        yaw = yaw_amp * np.sin(2 * np.pi * s / yaw_len + yaw_phase)
        c, sn = np.cos(yaw), np.sin(yaw)
        poses[i] = [[c, 0, sn, pos[0]], [0, 1, 0, pos[1]], [-sn, 0, c, pos[2]], [0, 0, 0, 1]]
        pos = pos + steps[i] * np.array([sn, 0.0, c])
        s += steps[i]
    return poses


def _build_scene(rng: np.random.Generator, z_end: float) -> _Scene:
    boxes: list[list[float]] = []
    box_mat: list[int] = []
    box_col: list[np.ndarray] = []
    cyls: list[list[float]] = []
    cyl_mat: list[int] = []
    cyl_col: list[np.ndarray] = []
    z0 = -40.0
    g = GROUND_Y

    def box(x0, y0, zz0, x1, y1, zz1, mat, col):
        boxes.append([x0, y0, zz0, x1, y1, zz1])
        box_mat.append(mat)
        box_col.append(np.asarray(col, np.float32))

    def cyl(cx, cz, r, y0, y1, mat, col):
        cyls.append([cx, cz, r, y0, y1])
        cyl_mat.append(mat)
        cyl_col.append(np.asarray(col, np.float32))

    for side in (-1.0, 1.0):
        # Raised sidewalk (curb 0.15 m).
        lo, hi = sorted((side * _ROAD_HALF_WIDTH, side * _SIDEWALK_OUTER))
        box(lo, g - 0.15, z0, hi, g, z_end, _M_SIDEWALK, [1.0, 1.0, 1.0])
        # Buildings with gaps.
        z = z0 + rng.uniform(0, 10)
        while z < z_end:
            length = rng.uniform(8, 28)
            front = rng.uniform(10.5, 17.0)
            depth = rng.uniform(8, 14)
            height = rng.uniform(6, 20)
            hue = rng.choice([[0.62, 0.45, 0.36], [0.72, 0.68, 0.6], [0.55, 0.52, 0.5],
                              [0.75, 0.6, 0.42], [0.5, 0.36, 0.3], [0.8, 0.78, 0.72]])
            col = np.asarray(hue) * rng.uniform(0.8, 1.15, 3)
            lo, hi = sorted((side * front, side * (front + depth)))
            box(lo, g - height, z, hi, g, z + length, _M_BUILDING, col)
            z += length + (rng.uniform(3, 12) if rng.random() < 0.45 else 0.0)
        # Poles with traffic signs, on the sidewalk.
        z = z0 + rng.uniform(0, 20)
        while z < z_end:
            x = side * rng.uniform(6.4, 8.0)
            h = rng.uniform(4.0, 7.0)
            box(x - 0.1, g - h, z - 0.1, x + 0.1, g - 0.15, z + 0.1, _M_POLE,
                [0.8, 0.8, 0.82])
            if rng.random() < 0.5:
                sc = rng.choice([[0.1, 0.25, 0.8], [0.85, 0.1, 0.1], [0.9, 0.9, 0.85]])
                box(x - 0.35, g - h + 0.2, z - 0.16, x + 0.35, g - h + 0.9, z - 0.11, _M_SIGN,
                    sc)
            z += rng.uniform(12, 35)
        # Parked cars along the curb (two boxes: body and cabin).
        z = z0 + rng.uniform(0, 15)
        while z < z_end:
            if rng.random() < 0.6:
                x = side * rng.uniform(4.6, 5.0)
                col = rng.choice([[0.7, 0.1, 0.1], [0.15, 0.2, 0.55], [0.8, 0.8, 0.8],
                                  [0.26, 0.26, 0.27], [0.5, 0.5, 0.55], [0.2, 0.45, 0.25]])
                col = np.asarray(col) * rng.uniform(0.85, 1.1)
                box(x - 0.9, g - 1.0, z, x + 0.9, g - 0.12, z + 4.2, _M_CAR, col)
                box(x - 0.8, g - 1.45, z + 1.0, x + 0.8, g - 1.0, z + 3.3, _M_CAR, col)
            z += rng.uniform(5.0, 14.0)
        # Trees and hedges on the terrain strip between sidewalk and buildings.
        z = z0 + rng.uniform(0, 10)
        while z < z_end:
            x = side * rng.uniform(9.0, 10.2)
            if rng.random() < 0.6:
                h = rng.uniform(2.2, 3.2)
                r = rng.uniform(1.0, 1.8)
                cyl(x, z, rng.uniform(0.12, 0.22), g - h - 0.3, g, _M_TRUNK, [0.4, 0.28, 0.18])
                cyl(x, z, r, g - h - rng.uniform(2.0, 4.0), g - h, _M_LEAVES,
                    np.array([0.25, 0.45, 0.15]) * rng.uniform(0.8, 1.2))
            else:
                length = rng.uniform(2, 8)
                box(x - 0.5, g - rng.uniform(0.7, 1.5), z, x + 0.5, g, z + length, _M_LEAVES,
                    np.array([0.22, 0.4, 0.14]) * rng.uniform(0.8, 1.2))
            z += rng.uniform(4, 14)

    def arr(x, shape):
        return np.asarray(x, np.float64).reshape(shape)

    return _Scene(
        boxes=arr(boxes, (-1, 6)), box_material=np.asarray(box_mat, np.int64),
        box_color=arr(box_col, (-1, 3)).astype(np.float32),
        cylinders=arr(cyls, (-1, 5)), cyl_material=np.asarray(cyl_mat, np.int64),
        cyl_color=arr(cyl_col, (-1, 3)).astype(np.float32),
    )


# --------------------------------------------------------------------------- ray casting


def _pixel_window(
    corners: np.ndarray, R: np.ndarray, o: np.ndarray, K: np.ndarray, h: int, w: int
) -> tuple[slice, slice] | None:
    """Image rows/columns a primitive (its bounding-box corners) can cover; None if culled."""
    cam = (corners - o) @ R  # world -> camera: R^T (p - o)
    z = cam[:, 2]
    if z.max() <= 0.05 or z.min() > MAX_DEPTH:
        return None
    if z.min() <= 0.05:
        return slice(0, h), slice(0, w)
    u = K[0, 0] * cam[:, 0] / z + K[0, 2]
    v = K[1, 1] * cam[:, 1] / z + K[1, 2]
    u0, u1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, w)
    v0, v1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, h)
    if u0 >= u1 or v0 >= v1:
        return None
    return slice(v0, v1), slice(u0, u1)


def _box_corners(b: np.ndarray) -> np.ndarray:
    xs, ys, zs = (b[0], b[3]), (b[1], b[4]), (b[2], b[5])
    return np.array([[x, y, z] for x in xs for y in ys for z in zs])


def _render(scene: _Scene, cam_to_world: np.ndarray, K: np.ndarray, h: int, w: int):
    R, o = cam_to_world[:3, :3], cam_to_world[:3, 3]
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    # With d_cam's z = 1 and a rigid rotation, the ray parameter t IS the z-depth.
    d = d_cam @ R.T
    d_safe = np.where(np.abs(d) < 1e-12, 1e-12, d)
    inv_d = 1.0 / d_safe
    t_best = np.full((h, w), np.inf)
    prim = np.full((h, w), -1, np.int64)  # -1 sky, 0 ground, 1.. boxes, then cylinders
    normal = np.zeros((h, w, 3))

    # Ground plane.
    t = (GROUND_Y - o[1]) * inv_d[..., 1]
    hit = (d[..., 1] > 1e-9) & (t > 0) & (t <= MAX_DEPTH)
    t_best[hit], prim[hit] = t[hit], 0
    normal[hit] = (0.0, -1.0, 0.0)

    nb = len(scene.boxes)
    for i, b in enumerate(scene.boxes):
        win = _pixel_window(_box_corners(b), R, o, K, h, w)
        if win is None:
            continue
        inv = inv_d[win]
        t0 = (b[:3] - o) * inv
        t1 = (b[3:] - o) * inv
        tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
        axis = np.argmax(tmin, -1)
        tnear = np.take_along_axis(tmin, axis[..., None], -1)[..., 0]
        tfar = tmax.min(-1)
        tb = t_best[win]
        hit = (tnear <= tfar) & (tnear > _EPS) & (tnear < tb) & (tnear <= MAX_DEPTH)
        if not hit.any():
            continue
        tb[hit] = tnear[hit]
        prim[win][hit] = i + 1
        nrm = np.zeros((*hit.shape, 3))
        dd = d[win]
        np.put_along_axis(nrm, axis[..., None],
                          -np.sign(np.take_along_axis(dd, axis[..., None], -1)), -1)
        normal[win][hit] = nrm[hit]

    for j, (cx, cz, r, y0, y1) in enumerate(scene.cylinders):
        corners = _box_corners(np.array([cx - r, y0, cz - r, cx + r, y1, cz + r]))
        win = _pixel_window(corners, R, o, K, h, w)
        if win is None:
            continue
        dd = d[win]
        ox, oz = o[0] - cx, o[2] - cz
        a = dd[..., 0] ** 2 + dd[..., 2] ** 2
        bq = 2 * (ox * dd[..., 0] + oz * dd[..., 2])
        c = ox * ox + oz * oz - r * r
        disc = bq * bq - 4 * a * c
        with np.errstate(invalid="ignore", divide="ignore"):
            ts = (-bq - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        ys = o[1] + ts * dd[..., 1]
        side_ok = (disc >= 0) & (ts > _EPS) & (ys >= y0) & (ys <= y1)
        t_hit = np.where(side_ok, ts, np.inf)
        nrm = np.zeros(dd.shape)
        nrm[..., 0] = (ox + ts * dd[..., 0]) / r
        nrm[..., 2] = (oz + ts * dd[..., 2]) / r
        for ycap, ny in ((y0, -1.0), (y1, 1.0)):
            if (ny < 0 and o[1] >= ycap) or (ny > 0 and o[1] <= ycap):
                continue  # this cap faces away from the camera
            tc = (ycap - o[1]) * inv_d[win][..., 1]
            px, pz = ox + tc * dd[..., 0], oz + tc * dd[..., 2]
            cap_ok = (tc > _EPS) & (px * px + pz * pz <= r * r) & (tc < t_hit)
            t_hit = np.where(cap_ok, tc, t_hit)
            nrm[cap_ok] = (0.0, ny, 0.0)
        tb = t_best[win]
        hit = (t_hit < tb) & (t_hit <= MAX_DEPTH)
        if not hit.any():
            continue
        tb[hit] = t_hit[hit]
        prim[win][hit] = nb + 1 + j
        normal[win][hit] = nrm[hit]
    return d, t_best, prim, normal, o, K


def _shade(scene: _Scene, d, t_best, prim, normal, o, K) -> tuple[np.ndarray, np.ndarray]:
    h, w = prim.shape
    rgb = np.zeros((h, w, 3), np.float32)
    labels = np.full((h, w), SKY, np.uint8)
    # Sky: gradient with elevation (no depth, so it need not be consistent across frames).
    elev = -d[..., 1] / np.linalg.norm(d, axis=-1)
    s = np.clip(elev * 3.0, 0, 1)[..., None]
    sky_mask = prim < 0
    sky = (1 - s) * np.array([0.78, 0.85, 0.92]) + s * np.array([0.35, 0.55, 0.85])
    rgb[sky_mask] = sky[sky_mask]

    materials = np.concatenate([[ _M_GROUND], scene.box_material, scene.cyl_material])
    colors = np.concatenate([np.ones((1, 3), np.float32), scene.box_color, scene.cyl_color])
    f = 0.5 * (K[0, 0] + K[1, 1])
    hit = ~sky_mask
    ids = prim[hit]
    mats = materials[ids]
    dh = d[hit]
    p = o + t_best[hit][:, None] * dh
    n = normal[hit]
    ray_len = np.linalg.norm(dh, axis=-1)
    cos = np.abs(np.sum(n * dh, -1)) / ray_len
    # World size of a pixel on the surface (stretched at grazing angles).
    iso = t_best[hit] * ray_len / f
    footprint = (iso / np.maximum(cos, 0.15)).astype(np.float32)
    albedo = np.zeros((len(ids), 3), np.float32)
    lab = np.zeros(len(ids), np.uint8)
    for m in np.unique(mats):
        sel = mats == m
        if m == _M_GROUND:
            albedo[sel], lab[sel] = _shade_ground(p[sel], footprint[sel],
                                                  iso[sel].astype(np.float32))
        else:
            albedo[sel] = _shade_material(int(m), p[sel], n[sel], footprint[sel],
                                          colors[ids[sel]], ids[sel])
            lab[sel] = _MATERIAL_LABEL[int(m)]
    lambert = np.maximum(n @ _SUN, 0.0).astype(np.float32)
    rgb[hit] = albedo * (0.45 + 0.5 * lambert)[:, None]
    labels[hit] = lab
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), labels


def render_drive(
    drive_index: int, num_frames: int, height: int, width: int, seed: int
) -> list[Frame]:
    """Render one drive in memory; deterministic in (drive_index, seed)."""
    rng = np.random.default_rng([seed, drive_index])
    poses = _trajectory(rng, num_frames)
    scene = _build_scene(rng, float(poses[-1, 2, 3]) + MAX_DEPTH + 30.0)
    K = intrinsics(height, width)
    frames = []
    for pose in poses:
        d, t_best, prim, normal, o, _ = _render(scene, pose, K, height, width)
        rgb, labels = _shade(scene, d, t_best, prim, normal, o, K)
        depth = np.where(prim >= 0, t_best, 0.0).astype(np.float32)
        frames.append(Frame(rgb=rgb, depth=depth, labels=labels, cam_to_world=pose.copy(),
                            K=K.copy()))
    return frames


# --------------------------------------------------------------------------- on disk


def drive_name(drive_index: int) -> str:
    """'2011_01_01_drive_0001_sync' for drive_index 0 (drives are numbered from 1)."""
    return f"{DATE}_drive_{drive_index + 1:04d}_sync"


def _write_drive(args: tuple[str, int, int, int, int, int, bool]) -> list[np.ndarray] | None:
    """Render and write one drive; returns its depths (frames 1..N-2) when `keep_depth`."""
    root_s, drive_index, num_frames, height, width, seed, keep_depth = args
    root = Path(root_s)
    frames = render_drive(drive_index, num_frames, height, width, seed)
    name = drive_name(drive_index)
    image_dir = root / DATE / name / "image_02" / "data"
    label_dir = root / "segmentation" / DATE / name / "image_02"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, fr in enumerate(frames):
        Image.fromarray(fr.rgb).save(image_dir / f"{i:010d}.png", compress_level=1)
        Image.fromarray(fr.labels).save(label_dir / f"{i:010d}.png", compress_level=1)
        lines.append(" ".join(f"{x:.9g}" for x in fr.cam_to_world[:3].reshape(-1)))
    (root / DATE / name / "poses.txt").write_text("\n".join(lines) + "\n")
    return [fr.depth for fr in frames[1:-1]] if keep_depth else None


def read_poses(path: str | os.PathLike[str]) -> np.ndarray:
    """poses.txt -> N x 4 x 4 camera-to-world matrices."""
    rows = np.loadtxt(path, ndmin=2).reshape(-1, 3, 4)
    out = np.tile(np.eye(4), (len(rows), 1, 1))
    out[:, :3] = rows
    return out


def _clear(root: Path) -> None:
    """Remove only what the generator writes (root may hold other things)."""
    (root / "synthetic.json").unlink(missing_ok=True)
    for sub in (root / DATE, root / "segmentation" / DATE, root / "splits" / SPLIT_NAME):
        if sub.exists():
            shutil.rmtree(sub)


def generate_synthetic_kitti(
    root: str | os.PathLike[str],
    num_drives: int = 8,
    frames_per_drive: int = 110,
    height: int = 96,
    width: int = 320,
    seed: int = 0,
    workers: int = 2,
) -> Path:
    """Write the synthetic data set under root in the KITTI raw layout; returns root.

    Skipped when root/synthetic.json records the same parameters; otherwise earlier
    synthetic content is removed first. The last drive is the test split, the one before it
    val, the rest train; split lines exclude each drive's first and last frame.
    """
    if num_drives < 3:
        raise ValueError(f"num_drives={num_drives}: need >= 3 (train, val and test drives)")
    if frames_per_drive < 3:
        raise ValueError(f"frames_per_drive={frames_per_drive}: need >= 3")
    root = Path(root)
    params: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "date": DATE, "split": SPLIT_NAME,
        "num_drives": num_drives, "frames_per_drive": frames_per_drive,
        "height": height, "width": width, "seed": seed,
    }
    marker = root / "synthetic.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                logger.info("synthetic data at %s is up to date", root)
                return root
        except (OSError, ValueError):
            pass
    start = time.perf_counter()
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    val_drive, test_drive = num_drives - 2, num_drives - 1
    jobs = [(str(root), i, frames_per_drive, height, width, seed, i in (val_drive, test_drive))
            for i in range(num_drives)]
    if workers > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=min(workers, num_drives), mp_context=ctx) as ex:
            depths = list(ex.map(_write_drive, jobs))
    else:
        depths = [_write_drive(job) for job in jobs]

    split_dir = root / "splits" / SPLIT_NAME
    split_dir.mkdir(parents=True, exist_ok=True)

    def lines(drives: range | list[int]) -> str:
        return "".join(f"{DATE}/{drive_name(i)} {f} l\n" for i in drives
                       for f in range(1, frames_per_drive - 1))

    (split_dir / "train_files.txt").write_text(lines(range(num_drives - 2)))
    (split_dir / "val_files.txt").write_text(lines([val_drive]))
    (split_dir / "test_files.txt").write_text(lines([test_drive]))
    save_gt_depths(split_dir / "gt_depths_val.npz", depths[val_drive] or [])
    save_gt_depths(split_dir / "gt_depths.npz", depths[test_drive] or [])
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, marker)  # last: its presence marks a complete generation
    elapsed = time.perf_counter() - start
    logger.info("generated %d synthetic drives x %d frames (%d x %d) at %s in %.1f s",
                num_drives, frames_per_drive, height, width, root, elapsed)
    print(f"synthetic KITTI: {num_drives} drives x {frames_per_drive} frames "
          f"({height} x {width}) in {elapsed:.1f} s -> {root}")
    return root
