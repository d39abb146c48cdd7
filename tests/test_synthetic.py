"""The procedural KITTI-like generator: exact geometry, warp consistency, layout on disk."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.data.synthetic import (
    CAMERA_HEIGHT,
    DATE,
    SPLIT_NAME,
    generate_synthetic_kitti,
    read_poses,
    render_drive,
)
from fsre_lightning.errors import DataError
from fsre_lightning.geometry import intrinsics_matrix, warp

H, W = 64, 192


@pytest.fixture(scope="module")
def frames():
    return render_drive(1, 6, H, W, seed=3)


def test_intrinsics_match_geometry(frames):
    expected = intrinsics_matrix(H, W, KITTI_INTRINSICS).double().numpy()
    np.testing.assert_allclose(frames[0].K, expected)


def test_road_depth_matches_flat_ground_formula(frames):
    # Pixel convention: ray through (u, v) = (column, row), no +0.5 offset, as in backproject.
    for fr in frames:
        R = fr.cam_to_world[:3, :3]
        # Only yaw: the camera's y axis stays the world's (zero pitch and roll).
        np.testing.assert_allclose(R[:, 1], [0.0, 1.0, 0.0], atol=1e-12)
        fy, cy = fr.K[1, 1], fr.K[1, 2]
        rows, cols = np.nonzero(fr.labels == 0)
        assert len(rows) > 0.1 * H * W
        assert (rows > cy).all()
        expected = CAMERA_HEIGHT * fy / (rows - cy)
        np.testing.assert_allclose(fr.depth[rows, cols], expected, rtol=1e-3)


def test_sky_and_label_values(frames):
    for fr in frames:
        sky = fr.labels == 10
        assert sky.any() and (~sky).any()
        np.testing.assert_array_equal(fr.depth == 0, sky)
        assert (fr.depth[~sky] > 0).all()
        values = np.unique(fr.labels)
        assert np.all((values <= 18) | (values == 255))
        assert fr.rgb.dtype == np.uint8 and fr.rgb.shape == (H, W, 3)
        assert fr.depth.dtype == np.float32 and fr.labels.dtype == np.uint8
    # The scene has the expected classes somewhere in the drive.
    seen = set(np.unique(np.concatenate([fr.labels.ravel() for fr in frames])).tolist())
    assert {0, 1, 2, 10}.issubset(seen)


def test_motion_forward_and_camera_height(frames):
    poses = np.stack([fr.cam_to_world for fr in frames])
    np.testing.assert_allclose(poses[:, 1, 3], 0.0)  # road plane is world y = +1.65
    assert abs(CAMERA_HEIGHT - 1.65) < 1e-12
    for a, b in itertools.pairwise(poses):
        step = b[:3, 3] - a[:3, 3]
        assert 0.5 <= np.linalg.norm(step) <= 1.5
        forward = a[:3, :3].T @ step  # in camera a's frame
        assert forward[2] > 0.99 * np.linalg.norm(step)


def _torch_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def test_warp_with_true_depth_and_pose_reproduces_target(frames):
    for k in (1, 3, 5):
        prev, cur = frames[k - 1], frames[k]
        T = np.linalg.inv(prev.cam_to_world) @ cur.cam_to_world  # target (0) -> source (-1)
        K = torch.from_numpy(cur.K).float()[None]
        warped = warp(_torch_image(prev.rgb), torch.from_numpy(cur.depth)[None, None],
                      torch.from_numpy(T).float()[None], K, torch.linalg.inv(K))
        target = _torch_image(cur.rgb)
        valid = torch.from_numpy(cur.depth > 0)
        err_warp = (warped - target).abs().mean(1)[0][valid].median().item()
        err_id = (_torch_image(prev.rgb) - target).abs().mean(1)[0][valid].median().item()
        assert err_warp < 0.03, (k, err_warp, err_id)
        assert err_warp < err_id / 3, (k, err_warp, err_id)


def test_render_is_deterministic():
    a = render_drive(0, 2, 32, 96, seed=7)
    b = render_drive(0, 2, 32, 96, seed=7)
    c = render_drive(0, 2, 32, 96, seed=8)
    np.testing.assert_array_equal(a[1].rgb, b[1].rgb)
    np.testing.assert_array_equal(a[1].depth, b[1].depth)
    assert not np.array_equal(a[1].rgb, c[1].rgb)


def test_generate_layout_splits_and_regeneration(tmp_path):
    root = tmp_path / "kitti"
    kwargs = {"num_drives": 3, "frames_per_drive": 6, "height": 32, "width": 96, "seed": 1}
    assert generate_synthetic_kitti(root, workers=2, **kwargs) == root
    split_dir = root / "splits" / SPLIT_NAME
    drives = [f"{DATE}_drive_{i:04d}_sync" for i in (1, 2, 3)]
    for name in drives:
        for f in range(6):
            img = np.asarray(Image.open(root / DATE / name / "image_02" / "data" / f"{f:010d}.png"))
            assert img.shape == (32, 96, 3) and img.dtype == np.uint8
            lab = np.asarray(
                Image.open(root / "segmentation" / DATE / name / "image_02" / f"{f:010d}.png"))
            assert lab.shape == (32, 96) and lab.dtype == np.uint8
            assert np.all((lab <= 18) | (lab == 255))
        poses = read_poses(root / DATE / name / "poses.txt")
        assert poses.shape == (6, 4, 4)
        np.testing.assert_allclose(poses[:, 1, 3], 0.0)
        assert len((root / DATE / name / "poses.txt").read_text().splitlines()) == 6
    # Poses on disk are those of the in-memory renderer.
    mem = render_drive(2, 6, 32, 96, seed=1)
    np.testing.assert_allclose(read_poses(root / DATE / drives[2] / "poses.txt")[3],
                               mem[3].cam_to_world, atol=1e-6)

    splits = {}
    for s in ("train", "val", "test"):
        lines = (split_dir / f"{s}_files.txt").read_text().splitlines()
        parsed = [line.split(" ") for line in lines]
        assert all(len(p) == 3 and p[2] == "l" for p in parsed)
        assert [int(p[1]) for p in parsed] == [1, 2, 3, 4]  # first/last frame excluded
        splits[s] = {p[0] for p in parsed}
    assert splits == {"train": {f"{DATE}/{drives[0]}"}, "val": {f"{DATE}/{drives[1]}"},
                      "test": {f"{DATE}/{drives[2]}"}}

    for fname, drive in (("gt_depths.npz", 2), ("gt_depths_val.npz", 1)):
        with np.load(split_dir / fname, allow_pickle=False) as gt:
            assert sorted(gt.files) == [f"depth_{i:05d}" for i in range(4)]
            ref = render_drive(drive, 6, 32, 96, seed=1)
            for i in range(4):
                assert gt[f"depth_{i:05d}"].dtype == np.float32
                np.testing.assert_array_equal(gt[f"depth_{i:05d}"], ref[i + 1].depth)

    marker = root / "synthetic.json"
    params = json.loads(marker.read_text())
    assert params["num_drives"] == 3 and "format_version" in params
    mtime = marker.stat().st_mtime_ns
    first_png = root / DATE / drives[0] / "image_02" / "data" / f"{0:010d}.png"
    png_mtime = first_png.stat().st_mtime_ns
    generate_synthetic_kitti(root, workers=1, **kwargs)
    assert marker.stat().st_mtime_ns == mtime
    assert first_png.stat().st_mtime_ns == png_mtime

    # Different parameters: another world is never rewritten in place (issue 29).
    with pytest.raises(DataError, match=r"holds another synthetic world \(frames_per_drive 6 "
                                        r"there, 5 asked\)"):
        generate_synthetic_kitti(root, workers=1, **{**kwargs, "frames_per_drive": 5})
    assert json.loads(marker.read_text())["frames_per_drive"] == 6
    assert marker.stat().st_mtime_ns == mtime and first_png.stat().st_mtime_ns == png_mtime


def test_interrupted_generation_is_redone(tmp_path):
    root = tmp_path / "kitti"
    kwargs = {"num_drives": 3, "frames_per_drive": 3, "height": 16, "width": 48, "workers": 1}
    generate_synthetic_kitti(root, **kwargs)
    marker = root / "synthetic.json"
    # As if the run had died mid-way: the claim written first, not the completed record.
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    stale = root / DATE / "stale.txt"
    stale.write_text("x")
    generate_synthetic_kitti(root, **kwargs)
    assert "complete" not in json.loads(marker.read_text()) and not stale.exists()


def test_a_foreign_folder_is_never_written_into(tmp_path):
    """data.root pointing at a real KITTI copy (without data=kitti) once got synthetic drives
    and a synthetic.json added to it."""
    kitti = tmp_path / "kitti_raw"
    (kitti / "2011_09_26").mkdir(parents=True)
    (kitti / "2011_09_26" / "calib_cam_to_cam.txt").write_text("P_rect_02: 1 0 0 0\n")
    before = sorted(p.relative_to(kitti) for p in kitti.rglob("*"))
    with pytest.raises(DataError, match=r"kitti_raw is not empty and was not written by the "
                                        r"synthetic scene generator.*data=kitti"):
        generate_synthetic_kitti(kitti, num_drives=3, frames_per_drive=3, height=16, width=48)
    assert sorted(p.relative_to(kitti) for p in kitti.rglob("*")) == before
    # A new folder, or an empty one, is the generator's to fill.
    for root in (tmp_path / "new" / "synthetic", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        generate_synthetic_kitti(root, num_drives=3, frames_per_drive=3, height=16, width=48,
                                 workers=1)
        assert (root / "synthetic.json").is_file()


def test_rejects_too_few_drives(tmp_path):
    with pytest.raises(ValueError, match="num_drives"):
        generate_synthetic_kitti(tmp_path, num_drives=2)
