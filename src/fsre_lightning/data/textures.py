"""The synthetic world's materials and their procedural textures (for `data.scenes`).

Every surface is coloured by noise evaluated at its 3-D world point, band-limited by the
pixel's footprint (a cheap mip-map), so a surface point keeps its colour from frame to frame
without aliasing: photometric self-supervision needs exactly that. World axes: x right,
y down, z forward; the road is the plane y = GROUND_Y below the camera.
"""

from __future__ import annotations

import numpy as np

from fsre_lightning.cityscapes import (
    BUILDING,
    CAR,
    POLE,
    ROAD,
    SIDEWALK,
    TERRAIN,
    TRAFFIC_SIGN,
    VEGETATION,
)

CAMERA_HEIGHT = 1.65
GROUND_Y = CAMERA_HEIGHT  # world y of the road plane (y points down, the camera is at y = 0)
ROAD_HALF_WIDTH = 6.0

# Materials (texture programs); the label follows from the material (ground: from x).
M_GROUND, M_SIDEWALK, M_BUILDING, M_POLE, M_CAR, M_LEAVES, M_TRUNK, M_SIGN = range(8)
MATERIAL_LABEL = {
    M_SIDEWALK: SIDEWALK, M_BUILDING: BUILDING, M_POLE: POLE, M_CAR: CAR,
    M_LEAVES: VEGETATION, M_TRUNK: VEGETATION, M_SIGN: TRAFFIC_SIGN,
}


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


def shade_ground(
    p: np.ndarray, fp: np.ndarray, fp_iso: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Road (asphalt, lane markings) or terrain by lateral position. `fp_iso` is the pixel
    footprint without the grazing-angle stretch: it filters streaks elongated along z, which
    keep lateral texture on the road far ahead."""
    x = p[:, 0]
    road = np.abs(x) <= ROAD_HALF_WIDTH
    color = np.empty((len(p), 3), np.float32)
    # Asphalt: grey with fine grain and larger patches.
    n = _fbm(p, fp, 4.0, 6, salt=1)
    streaks = _fbm(p * np.array([1.0, 1.0, 0.12]), fp_iso, 0.8, 4, salt=4)
    g = 0.34 + 0.5 * n + 0.22 * streaks
    asphalt = np.stack([g, g, g * 1.04], 1)
    w = np.maximum(fp, 0.02)
    dashes = _periodic_pulse(p[:, 2], 6.0, 0.0, 3.0, w) * _pulse(x, -0.08, 0.08, w)
    edges = _pulse(np.abs(x), ROAD_HALF_WIDTH - 0.45, ROAD_HALF_WIDTH - 0.3, w)
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


def shade_material(
    material: int, p: np.ndarray, n: np.ndarray, fp: np.ndarray, base: np.ndarray,
    prim: np.ndarray,
) -> np.ndarray:
    """Albedo (N x 3) of one material at world points p with normals n."""
    w = np.maximum(fp, 0.01)
    salt = 100 + material
    if material == M_SIDEWALK:
        tiles = (_periodic_pulse(p[:, 0], 0.6, 0.0, 0.04, w)
                 + _periodic_pulse(p[:, 2], 0.6, 0.0, 0.04, w)).clip(0, 1)
        tiles = tiles * _octave_weight(0.6, fp)
        g = 0.56 + 0.3 * _fbm(p, fp, 2.0, 5, salt) - 0.18 * tiles
        return np.stack([g * 1.02, g, g * 0.95], 1) * base
    if material == M_BUILDING:
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
    if material == M_POLE:
        g = 0.5 + 0.4 * _fbm(p, fp, 1.0, 4, salt)
        band = _periodic_pulse(p[:, 1], 1.0, 0.0, 0.15, w) * _octave_weight(0.3, fp)
        return np.stack([g, g, g], 1) * base * (1 - 0.3 * band)[:, None]
    if material == M_CAR:
        y = GROUND_Y - p[:, 1]
        glass = _pulse(y, 1.0, 1.4, w) * (np.abs(n[:, 1]) < 0.5)
        wheel = _pulse(y, 0.0, 0.45, w)
        body = base * (1.0 + 0.6 * _fbm(p, fp, 1.0, 5, salt)[:, None]) + 0.05
        dark = np.array([0.08, 0.09, 0.11], np.float32) + 0.2 * _fbm(p, fp, 0.8, 3, salt + 3)[
            :, None]
        mix = np.clip(glass + wheel, 0, 1)[:, None]
        return body * (1 - mix) + dark * mix
    if material == M_LEAVES:
        n1 = _fbm(p, fp, 1.5, 6, salt)
        return base * (1.0 + 1.1 * n1[:, None])
    if material == M_TRUNK:
        return base * (1.0 + 0.6 * _fbm(p * [3.0, 0.5, 3.0], fp, 1.0, 4, salt)[:, None])
    if material == M_SIGN:
        rim = 1 - _pulse(np.abs(p[:, 1] - np.round(p[:, 1] * 2) / 2), 0, 0.2, w)
        return base * (1.0 + 0.15 * _fbm(p, fp, 0.5, 3, salt)[:, None]) * (0.7 + 0.3 * rim[
            :, None])
    raise ValueError(f"unknown material {material}")
