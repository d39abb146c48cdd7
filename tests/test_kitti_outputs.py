"""What export_gt warns about (a scan far sparser than KITTI's) and what evaluate_pose writes
beside its JSON (the predicted motions, as the field's scripts save them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning import evaluate_pose
from fsre_lightning.data.kitti_layout import load_gt_depths
from fsre_lightning.data.velodyne import SPARSE_SCAN_POINTS, export_gt_depths
from fsre_lightning.scoring.odometry import load_sequence, predict_motions
from fsre_lightning.testing import compose_config
from fsre_lightning.testing.kitti_server import DRIVE, make_raw_tree
from fsre_lightning.testing.tiny_checkpoints import make_run
from fsre_lightning.trained import load_module

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample" / "2011_09_26"
SCAN = "2011_09_26_drive_0000_sync/velodyne_points/data/0000000001.bin"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_a_truncated_scan_a_multiple_of_16_bytes_long_is_exported_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real scan cut to a tenth, at a point boundary: every other check passes it; the export
    still writes it, and warns naming the file and its point count."""
    root = tmp_path / "kitti"
    (root / "2011_09_26").mkdir(parents=True)
    for name in ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt"):
        (root / "2011_09_26" / name).write_bytes((SAMPLE / name).read_bytes())
    whole = (SAMPLE / SCAN).read_bytes()
    kept = (len(whole) // 16 // 10) * 16
    for frame, data in ((1, whole[:kept]), (2, whole)):
        scan = root / "2011_09_26" / SCAN.replace("0000000001", f"{frame:010d}")
        scan.parent.mkdir(parents=True, exist_ok=True)
        scan.write_bytes(data)
    split = tmp_path / "eigen" / "test_files.txt"
    split.parent.mkdir()
    split.write_text("2011_09_26/2011_09_26_drive_0000_sync 1 l\n"
                     "2011_09_26/2011_09_26_drive_0000_sync 2 l\n")
    with caplog.at_level(logging.WARNING):
        export_gt_depths(root, split, split.parent / "gt_depths.npz", progress=False)
    truncated, full = load_gt_depths(split.parent / "gt_depths.npz")
    assert 0 < np.count_nonzero(truncated) < np.count_nonzero(full) / 5
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert message.startswith(f"1 of 2 velodyne scans hold fewer than {SPARSE_SCAN_POINTS}")
    assert f"0000000001.bin ({kept // 16} points)" in message
    assert "0000000002.bin" not in message


def test_full_scans_give_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_raw_tree(tmp_path / "kitti")  # 200 points a scan: below the threshold ...
    split = tmp_path / "eigen" / "test_files.txt"
    split.parent.mkdir()
    split.write_text(f"{DRIVE} 1 l\n")
    monkeypatch.setattr("fsre_lightning.data.velodyne.SPARSE_SCAN_POINTS", 100)  # ... not so
    with caplog.at_level(logging.WARNING):
        export_gt_depths(root, split, split.parent / "gt_depths.npz", progress=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -------------------------------------------------------------- pose: the motions' .npy
@pytest.fixture(scope="module")
def checkpoint(module_tmp: Callable[[str], Path]) -> Path:
    return make_run(module_tmp("run"), segmentation=False, height=64, width=192,
                    encoder="test_resnet")


def make_sequence(root: Path, sequence: int, frames: int) -> None:
    folder = root / "sequences" / f"{sequence:02d}" / "image_2"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(sequence)
    for i in range(frames):
        Image.fromarray(rng.integers(0, 255, (32, 96, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png")
    poses = [np.hstack([np.eye(3), [[0.0], [0.0], [float(i)]]]) for i in range(frames)]
    (root / "poses").mkdir(exist_ok=True)
    (root / "poses" / f"{sequence:02d}.txt").write_text(
        "".join(" ".join(f"{v:.6e}" for v in p.reshape(-1)) + "\n" for p in poses))


def test_evaluate_pose_saves_the_predicted_motions_beside_its_json(tmp_path: Path,
                                                                    checkpoint: Path) -> None:
    root = tmp_path / "odom"
    make_sequence(root, 9, 7)
    make_sequence(root, 10, 6)
    metrics = tmp_path / "out" / "pose.json"
    evaluate_pose.run(compose_config("evaluate_pose", [
        f"ckpt_path={checkpoint}", f"odom_root={root}", "sequences=[9,10]", "device=cpu",
        f"metrics_path={metrics}"]))
    written = json.loads(metrics.read_text())
    module = load_module(checkpoint, torch.device("cpu"))
    for name, frames in (("09", 7), ("10", 6)):
        path = tmp_path / "out" / f"pose.motions-{name}.npy"
        assert written["sequences"][name]["motions_file"] == path.name
        motions = np.load(path, allow_pickle=False)
        assert motions.shape == (frames - 1, 4, 4) and motions.dtype == np.float64
        # The network's transform of each consecutive pair (i, i + 1), as scored.
        expected = predict_motions(module.pose_net, load_sequence(root, int(name)).frames,
                                   (64, 192), 16, torch.device("cpu"))
        assert np.allclose(motions, expected, atol=1e-6)
        assert np.allclose(motions[:, 3], [0, 0, 0, 1])
