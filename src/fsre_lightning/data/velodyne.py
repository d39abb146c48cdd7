"""KITTI calibration files and velodyne ground-truth depth (docs/design.md 4.2).

The projection reproduces Monodepth2's export of the Eigen test ground truth exactly: float64
maths on the float32 scans, the devkit's 1-based pixel convention (round, then minus one), the
nearest point winning where several land on one pixel, and the point's velodyne x as depth.
A missing or malformed file is a DataError naming it: a scan that is empty, truncated, holds
non-finite or out-of-range coordinates (not a velodyne scan), or has no point inside the
camera's image is rejected when the ground truth is exported, never scored as an empty map; a
scan with far fewer points than KITTI's (`SPARSE_SCAN_POINTS`) is exported with a warning.
`export_gt_depths` writes a split's maps into the archive the data module and `evaluate` read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
from rich.progress import track

from fsre_lightning.data.kitti_layout import (
    CALIB_FILES,
    SIDE_TO_CAMERA,
    check_scans,
    read_split,
    save_gt_depths,
    scan_files,
)
from fsre_lightning.errors import DataError

log = logging.getLogger(__name__)

_FLOAT_CHARS = set("0123456789.e+- ")
_POINT_BYTES = 16  # four float32 per velodyne point
# The HDL-64E measures up to 120 m: a coordinate beyond this is not a return of the sensor
# (random bytes read as float32 give values up to 3e38).
MAX_RANGE_M = 200.0
# A KITTI raw scan holds ~100,000-130,000 points (the sample's: 113,500-123,400). Far fewer is a
# truncated file whose length happens to be a multiple of 16 bytes: it passes every other check
# and gives a fraction of the usual ground-truth pixels, so export_gt warns.
SPARSE_SCAN_POINTS = 40_000


def read_calib_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray | str]:
    """Parse a KITTI calibration text file into arrays (non-numeric values stay strings)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"calibration file {path} not found: KITTI raw keeps calib_cam_to_cam.txt and "
            "calib_velo_to_cam.txt in each date folder (e.g. ROOT/2011_09_26/)"
        )
    data: dict[str, np.ndarray | str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if ":" not in line:
            raise DataError(f"{path}:{number}: expected 'key: values', got {line!r}")
        key, value = line.split(":", 1)
        value = value.strip()
        data[key] = value
        if value and _FLOAT_CHARS.issuperset(value):
            with contextlib.suppress(ValueError):  # e.g. "1.2.3": keep the string
                data[key] = np.array([float(v) for v in value.split()])
    return data


def _matrix(calib: dict[str, np.ndarray | str], key: str, shape: tuple[int, int],
            source: Path) -> np.ndarray:
    value = calib.get(key)
    if not isinstance(value, np.ndarray) or value.size != shape[0] * shape[1]:
        found = "missing" if value is None else f"{value!r} is not {shape[0]}x{shape[1]} numbers"
        raise DataError(
            f"{source}: key {key!r} {found}; use the unmodified calibration files of the KITTI "
            "raw release for this date (<date>_calib.zip)"
        )
    return value.reshape(shape)


def velodyne_to_image(calib_dir: str | os.PathLike[str], cam: int = 2
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """The 3 x 4 matrix taking homogeneous velodyne points to rectified pixels of camera `cam`,
    and that camera's rectified image size (height, width)."""
    if cam not in (0, 1, 2, 3):
        raise ValueError(f"cam={cam!r}: KITTI cameras are 0..3 (2 = left colour, 3 = right)")
    calib_dir = Path(calib_dir)
    cam2cam_path, velo2cam_path = (calib_dir / name for name in CALIB_FILES)
    cam2cam = read_calib_file(cam2cam_path)
    velo2cam = read_calib_file(velo2cam_path)
    rotation = _matrix(velo2cam, "R", (3, 3), velo2cam_path)
    translation = _matrix(velo2cam, "T", (3, 1), velo2cam_path)
    velo_to_cam = np.vstack([np.hstack([rotation, translation]), [0.0, 0.0, 0.0, 1.0]])
    rect = np.eye(4)
    rect[:3, :3] = _matrix(cam2cam, "R_rect_00", (3, 3), cam2cam_path)
    projection = _matrix(cam2cam, f"P_rect_0{cam}", (3, 4), cam2cam_path)
    width, height = _matrix(cam2cam, f"S_rect_0{cam}", (1, 2), cam2cam_path)[0].astype(int)
    return projection @ rect @ velo_to_cam, (int(height), int(width))


def load_velodyne_points(path: str | os.PathLike[str]) -> np.ndarray:
    """N x 4 float32 (x, y, z, reflectance) from a KITTI .bin scan."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"velodyne scan {path} not found")
    # Check bytes, not floats: np.fromfile silently drops a trailing partial float.
    size = path.stat().st_size
    if size % _POINT_BYTES:
        raise DataError(
            f"velodyne scan {path} is {size} bytes, not a multiple of {_POINT_BYTES} "
            "(float32 x, y, z, reflectance per point): the file is truncated or not a KITTI "
            "scan; re-extract it from the raw data archive"
        )
    if size == 0:
        raise DataError(f"velodyne scan {path} is empty (0 bytes): re-extract it from the raw "
                        "data archive")
    points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
    xyz = points[:, :3]
    bad = ~np.isfinite(xyz).all(axis=1) | (np.abs(xyz) > MAX_RANGE_M).any(axis=1)
    if bad.any():
        raise DataError(
            f"velodyne scan {path}: {int(bad.sum())} of {len(points)} points are not finite or "
            f"lie beyond {MAX_RANGE_M:.0f} m, which the sensor cannot measure: the file is "
            "damaged or not a KITTI scan; re-extract it from the raw data archive")
    return points


def project_velodyne(points: np.ndarray, velo_to_image: np.ndarray,
                     image_size: tuple[int, int]) -> np.ndarray:
    """Sparse H x W depth map (0 = no point) from N x 4 velodyne points."""
    height, width = image_size
    points = points[points[:, 0] >= 0]
    homogeneous = np.concatenate([points[:, :3], np.ones_like(points[:, :1])], axis=1)
    image_points = homogeneous @ velo_to_image.T  # float64, like the devkit
    # A point on the camera plane (z = 0) gives inf/nan pixels, which the bounds test drops.
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.round(image_points[:, 0] / image_points[:, 2]) - 1
        v = np.round(image_points[:, 1] / image_points[:, 2]) - 1
    depth = points[:, 0]
    inside = (u >= 0) & (v >= 0) & (u < width) & (v < height)
    u, v, depth = u[inside].astype(np.int64), v[inside].astype(np.int64), depth[inside]
    # Nearest point wins: sort by depth, keep each pixel's first occurrence.
    order = np.argsort(depth, kind="stable")
    linear = v[order] * width + u[order]
    _, first = np.unique(linear, return_index=True)
    keep = order[first]
    out = np.zeros(height * width, dtype=np.float32)
    out[v[keep] * width + u[keep]] = depth[keep]
    out[out < 0] = 0
    return out.reshape(height, width)


def velodyne_depth(calib_dir: str | os.PathLike[str], velo_path: str | os.PathLike[str],
                   cam: int = 2) -> np.ndarray:
    """Ground-truth depth of one frame at the camera's native rectified resolution; a scan
    with no point inside the image is a DataError (an empty map would silently not count)."""
    velo_to_image, size = velodyne_to_image(calib_dir, cam)
    depth = project_velodyne(load_velodyne_points(velo_path), velo_to_image, size)
    if not depth.any():
        raise DataError(f"velodyne scan {velo_path}: no point falls inside camera {cam}'s "
                        f"{size[1]} x {size[0]} image (calibration {calib_dir}): the scan "
                        "or the calibration belongs to another drive, or the scan is damaged")
    return depth


def export_gt_depths(root: str | os.PathLike[str], split_file: str | os.PathLike[str],
                     output: str | os.PathLike[str], progress: bool = True) -> Path:
    """Project the scan of every line of `split_file` (the camera of its side) and save all
    maps, in split order, to `output`; every file is checked before the first is read."""
    root = Path(root)
    entries = read_split(split_file)
    check_scans(root, entries)
    lines = track(entries, description="velodyne ground truth") if progress else entries
    depths: list[np.ndarray] = []
    sparse: dict[Path, int] = {}
    for entry in lines:
        calib_dir, scan = scan_files(root, entry)
        depths.append(velodyne_depth(calib_dir, scan, SIDE_TO_CAMERA[entry.side]))
        points = scan.stat().st_size // _POINT_BYTES
        if points < SPARSE_SCAN_POINTS:
            sparse[scan] = points
    warn_sparse_scans(sparse, len(entries))
    return save_gt_depths(output, depths)


def warn_sparse_scans(sparse: dict[Path, int], total: int) -> None:
    """One warning naming the scans with far fewer points than a KITTI scan has (exported all
    the same: the file may be right, but a truncated one scores on a fraction of the pixels)."""
    if not sparse:
        return
    listed = ", ".join(f"{path} ({points} points)" for path, points in list(sparse.items())[:3])
    more = f" and {len(sparse) - 3} more" if len(sparse) > 3 else ""
    log.warning("%d of %d velodyne scans hold fewer than %d points, where a KITTI scan holds "
                "about 120000: %s%s. A truncated file gives a fraction of the ground-truth "
                "pixels: compare their sizes with the raw archive's (re-extract it, or prepare "
                "the data again with python -m fsre_lightning.prepare_kitti)", len(sparse), total,
                SPARSE_SCAN_POINTS, listed, more)
