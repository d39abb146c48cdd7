"""Procedural, seeded KITTI-like driving scenes, rendered in memory with numpy.

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

Materials and textures are `fsre_lightning.data.textures`; `render_drive` renders one drive,
which `fsre_lightning.data.synthetic` writes to disk in the KITTI raw layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fsre_lightning.cityscapes import SKY
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.data.textures import (
    CAMERA_HEIGHT,
    GROUND_Y,
    M_BUILDING,
    M_CAR,
    M_GROUND,
    M_LEAVES,
    M_POLE,
    M_SIDEWALK,
    M_SIGN,
    M_TRUNK,
    MATERIAL_LABEL,
    ROAD_HALF_WIDTH,
    shade_ground,
    shade_material,
)

__all__ = ["CAMERA_HEIGHT", "Frame", "intrinsics", "render_drive"]

MAX_DEPTH = 100.0  # nothing farther is rendered (it becomes sky)
MIN_STEP, MAX_STEP = 0.5, 1.5  # metres driven per frame
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
    fx, fy, cx, cy = KITTI_INTRINSICS
    K = np.eye(4)
    K[0, 0], K[0, 2] = fx * width, cx * width
    K[1, 1], K[1, 2] = fy * height, cy * height
    return K


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
        lo, hi = sorted((side * ROAD_HALF_WIDTH, side * _SIDEWALK_OUTER))
        box(lo, g - 0.15, z0, hi, g, z_end, M_SIDEWALK, [1.0, 1.0, 1.0])
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
            box(lo, g - height, z, hi, g, z + length, M_BUILDING, col)
            z += length + (rng.uniform(3, 12) if rng.random() < 0.45 else 0.0)
        # Poles with traffic signs, on the sidewalk.
        z = z0 + rng.uniform(0, 20)
        while z < z_end:
            x = side * rng.uniform(6.4, 8.0)
            h = rng.uniform(4.0, 7.0)
            box(x - 0.1, g - h, z - 0.1, x + 0.1, g - 0.15, z + 0.1, M_POLE,
                [0.8, 0.8, 0.82])
            if rng.random() < 0.5:
                sc = rng.choice([[0.1, 0.25, 0.8], [0.85, 0.1, 0.1], [0.9, 0.9, 0.85]])
                box(x - 0.35, g - h + 0.2, z - 0.16, x + 0.35, g - h + 0.9, z - 0.11, M_SIGN,
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
                box(x - 0.9, g - 1.0, z, x + 0.9, g - 0.12, z + 4.2, M_CAR, col)
                box(x - 0.8, g - 1.45, z + 1.0, x + 0.8, g - 1.0, z + 3.3, M_CAR, col)
            z += rng.uniform(5.0, 14.0)
        # Trees and hedges on the terrain strip between sidewalk and buildings.
        z = z0 + rng.uniform(0, 10)
        while z < z_end:
            x = side * rng.uniform(9.0, 10.2)
            if rng.random() < 0.6:
                h = rng.uniform(2.2, 3.2)
                r = rng.uniform(1.0, 1.8)
                cyl(x, z, rng.uniform(0.12, 0.22), g - h - 0.3, g, M_TRUNK, [0.4, 0.28, 0.18])
                cyl(x, z, r, g - h - rng.uniform(2.0, 4.0), g - h, M_LEAVES,
                    np.array([0.25, 0.45, 0.15]) * rng.uniform(0.8, 1.2))
            else:
                length = rng.uniform(2, 8)
                box(x - 0.5, g - rng.uniform(0.7, 1.5), z, x + 0.5, g, z + length, M_LEAVES,
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

    materials = np.concatenate([[ M_GROUND], scene.box_material, scene.cyl_material])
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
        if m == M_GROUND:
            albedo[sel], lab[sel] = shade_ground(p[sel], footprint[sel],
                                                  iso[sel].astype(np.float32))
        else:
            albedo[sel] = shade_material(int(m), p[sel], n[sel], footprint[sel],
                                          colors[ids[sel]], ids[sel])
            lab[sel] = MATERIAL_LABEL[int(m)]
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
