"""Velodyne ground truth against a direct, point-by-point implementation (design 4.2)."""

from pathlib import Path

import numpy as np
import pytest

from fsre_lightning.data.velodyne import (
    project_velodyne,
    read_calib_file,
    velodyne_depth,
    velodyne_to_image,
)
from fsre_lightning.errors import DataError

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample" / "2011_09_26"
needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")


def _slow_projection(points: np.ndarray, P: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    out = np.zeros(size)
    for x, y, z, _ in points.astype(np.float64):
        if x < 0:
            continue
        px, py, pz = P @ np.array([x, y, z, 1.0])
        u, v = int(np.round(px / pz)) - 1, int(np.round(py / pz)) - 1
        if 0 <= u < width and 0 <= v < height and (out[v, u] == 0 or x < out[v, u]):
            out[v, u] = x
    return out


def test_nearest_point_wins_and_out_of_image_points_are_dropped() -> None:
    P = np.array([[10.0, 0, 5, 0], [0, 10.0, 5, 0], [0, 0, 1.0, 0]])  # camera looks along +z
    pts = np.array(
        [
            [4.0, 0.0, 2.0, 0],   # -> pixel (u, v) = (round(10*4/2+5)-1, round(5)-1) = (24, 4)
            [3.0, 0.0, 1.5, 0],   # same pixel, nearer in velodyne x: wins
            [-1.0, 0.0, 1.0, 0],  # x < 0: dropped
            [100.0, 0.0, 1.0, 0],  # far outside the image
        ],
        dtype=np.float32,
    )
    depth = project_velodyne(pts, P, (10, 30))
    assert depth[4, 24] == pytest.approx(3.0)
    assert np.count_nonzero(depth) == 1


@needs_sample
def test_real_scan_matches_the_direct_implementation() -> None:
    calib = read_calib_file(SAMPLE / "calib_cam_to_cam.txt")
    assert calib["S_rect_02"].tolist() == [1242.0, 375.0]
    P, size = velodyne_to_image(SAMPLE, cam=2)
    scan = SAMPLE / "2011_09_26_drive_0005_sync" / "velodyne_points" / "data" / "0000000000.bin"
    points = np.fromfile(scan, dtype=np.float32).reshape(-1, 4)
    ours = velodyne_depth(SAMPLE, scan)
    assert ours.shape == (375, 1242) and ours.dtype == np.float32
    slow = _slow_projection(points[::7], P, size)  # a subsample keeps the loop fast
    assert np.array_equal(project_velodyne(points[::7], P, size), slow.astype(np.float32))
    valid = ours[ours > 0]
    assert 10_000 < valid.size < 40_000 and valid.max() < 120


def test_missing_calibration_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"calibration file .*calib_cam_to_cam\.txt not found"):
        velodyne_to_image(tmp_path)
