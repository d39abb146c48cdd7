"""Velodyne ground truth on a hand-made KITTI-layout folder, its export and its bad inputs."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning.data import KittiDataModule, load_gt_depths, read_split
from fsre_lightning.data.annotated import export_annotated_depths, read_annotated_depth
from fsre_lightning.data.velodyne import export_gt_depths, velodyne_depth
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.evaluate import run as evaluate
from fsre_lightning.export_gt import main, run
from fsre_lightning.scoring.eigen import EIGEN_KEYS, evaluate_eigen
from fsre_lightning.testing import compose_config, run_main
from fsre_lightning.testing.tiny_checkpoints import make_run

DATE = "2011_01_01"
DRIVE = f"{DATE}/{DATE}_drive_0001_sync"
H, W = 40, 100          # S_rect_02
FX, CX, CY = 100.0, 50.0, 20.0
T_Z = -0.5              # camera z = velodyne x - 0.5: stored depth (velodyne x) != camera z
SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample" / "2011_09_26"

CAM_TO_CAM = {
    "calib_time": "09-Jan-2012 13:57:47",
    "R_rect_00": "1 0 0 0 1 0 0 0 1",
    "P_rect_02": f"{FX} 0 {CX} 0 0 {FX} {CY} 0 0 0 1 0",
    "S_rect_02": f"{W:.6e} {H:.6e}",
    # camera 3: principal point 10 px further right, smaller image
    "P_rect_03": f"{FX} 0 {CX + 10} 0 0 {FX} {CY} 0 0 0 1 0",
    "S_rect_03": "8.0e+01 3.0e+01",
}
# KITTI's axes: velodyne x forward, y left, z up; camera x right, y down, z forward.
VELO_TO_CAM = {"R": "0 -1 0 0 0 -1 1 0 0", "T": f"0 0 {T_Z}", "delta_f": "0 0", "delta_c": "0 0"}


def point_at(u: int, v: int, x: float, cx: float = CX) -> list[float]:
    """A velodyne point at distance x whose projection is exactly 1-based pixel (u+1, v+1)."""
    z_cam = x + T_Z
    return [x, -(u + 1 - cx) * z_cam / FX, -(v + 1 - CY) * z_cam / FX, 0.5]


def write_calib(path: Path, entries: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key}: {value}\n" for key, value in entries.items()))


def write_scan(path: Path, points: list[list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(points, dtype=np.float32).tofile(path)


# Hand-placed points and where the devkit projection puts them: {(v, u): depth}.
POINTS = [
    point_at(49, 19, 20.0),    # far point first in the file ...
    point_at(49, 19, 10.0),    # ... the nearer one on the same pixel wins
    point_at(59, 14, 10.5),    # nearer one first this time
    point_at(59, 14, 30.5),
    [-5.0, 0.0, 0.0, 0.5],     # behind (x < 0): dropped, though it projects onto (49, 19)
    point_at(0, 0, 7.0),       # the first pixel of the image
    point_at(W - 1, H - 1, 8.0),  # the last one
    point_at(-1, 5, 9.0),      # 1-based column 0 -> u = -1: outside
    point_at(W, 5, 9.0),       # just right of the image
    point_at(5, H, 9.0),       # just below it
]
EXPECTED = {(19, 49): 10.0, (14, 59): 10.5, (0, 0): 7.0, (H - 1, W - 1): 8.0}


def make_kitti(tmp_path: Path, frames: int = 2) -> Path:
    """ROOT with one date (calibration) and one drive of `frames` scans."""
    root = tmp_path / "kitti"
    write_calib(root / DATE / "calib_cam_to_cam.txt", CAM_TO_CAM)
    write_calib(root / DATE / "calib_velo_to_cam.txt", VELO_TO_CAM)
    for frame in range(frames):
        points = [*POINTS, point_at(30, 30, 40.0 + frame)]  # one frame-specific point
        write_scan(root / DRIVE / "velodyne_points" / "data" / f"{frame:010d}.bin", points)
    return root


def write_split(directory: Path, lines: list[str], name: str = "test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}_files.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def scan(root: Path, frame: int = 0) -> Path:
    return root / DRIVE / "velodyne_points" / "data" / f"{frame:010d}.bin"


def test_points_land_on_the_expected_pixels(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    depth = velodyne_depth(root / DATE, scan(root))
    assert depth.shape == (H, W) and depth.dtype == np.float32
    expected = np.zeros((H, W), np.float32)
    for (v, u), value in EXPECTED.items():
        expected[v, u] = value
    expected[30, 30] = 40.0
    assert np.array_equal(depth, expected)


def test_right_camera_uses_its_own_projection_and_size(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    write_scan(scan(root), [point_at(9, 3, 6.0, cx=CX + 10)])
    depth = velodyne_depth(root / DATE, scan(root), cam=3)
    assert depth.shape == (30, 80) and depth[3, 9] == pytest.approx(6.0)
    assert np.count_nonzero(depth) == 1


@pytest.mark.parametrize(
    ("file", "key"),
    [("calib_cam_to_cam.txt", "P_rect_02"), ("calib_cam_to_cam.txt", "S_rect_02"),
     ("calib_cam_to_cam.txt", "R_rect_00"), ("calib_velo_to_cam.txt", "R"),
     ("calib_velo_to_cam.txt", "T")],
)
def test_missing_calibration_key_names_file_and_key(tmp_path: Path, file: str, key: str) -> None:
    root = make_kitti(tmp_path)
    entries = dict(CAM_TO_CAM if file.startswith("calib_cam") else VELO_TO_CAM)
    del entries[key]
    write_calib(root / DATE / file, entries)
    with pytest.raises(DataError, match=rf"{file}.*'{key}' missing"):
        velodyne_depth(root / DATE, scan(root))


def test_truncated_or_missing_files_are_named(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    with scan(root).open("ab") as f:
        f.write(b"\0" * 8)  # two floats of a half-written point
    with pytest.raises(DataError, match=r"0000000000\.bin is \d+ bytes, not a multiple of 16"):
        velodyne_depth(root / DATE, scan(root))
    with pytest.raises(DataError, match=r"0000000007\.bin not found"):
        velodyne_depth(root / DATE, scan(root, 7))
    (root / DATE / "calib_velo_to_cam.txt").unlink()
    with pytest.raises(DataError, match=r"calib_velo_to_cam\.txt not found"):
        velodyne_depth(root / DATE, scan(root, 1))


@pytest.mark.parametrize("content", ["empty", "nan", "random bytes", "nothing in view"])
def test_scans_that_are_not_sensor_returns_are_rejected_by_name(tmp_path: Path,
                                                                  content: str) -> None:
    """Each once became a silent empty or absurd ground-truth map (depths up to 3e38)."""
    root = make_kitti(tmp_path)
    path = scan(root, 0)
    if content == "empty":
        path.write_bytes(b"")
        expected = r"0000000000\.bin is empty \(0 bytes\)"
    elif content == "nan":
        write_scan(path, [*POINTS, [np.nan, 0.0, 0.0, 0.5]])
        expected = r"0000000000\.bin: 1 of \d+ points are not finite or lie beyond 200 m"
    elif content == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(16 * 1000))
        expected = r"0000000000\.bin: \d+ of 1000 points are not finite or lie beyond"
    else:
        write_scan(path, [[-5.0, 0.0, 0.0, 0.5], [3.0, 90.0, 0.0, 0.5]])  # behind, far left
        expected = r"0000000000\.bin: no point falls inside camera 2's 100 x 40 image"
    with pytest.raises(DataError, match=expected):
        velodyne_depth(root / DATE, path)
    split = write_split(tmp_path / "splits" / "tiny", [f"{DRIVE} 1 l", f"{DRIVE} 0 l"])
    with pytest.raises(DataError, match=expected):
        export_gt_depths(root, split, split.parent / "gt_depths.npz", progress=False)
    assert not (split.parent / "gt_depths.npz").exists()


def test_an_empty_ground_truth_map_is_counted_not_hidden() -> None:
    """An archive written before those checks may hold an empty map: the frame is reported as
    not scored instead of shrinking the average without a word."""
    gt = np.full((H, W), 10.0, dtype=np.float32)
    results = evaluate_eigen([np.full((H, W), 0.1)] * 2, [gt, np.zeros_like(gt)],
                             crop="none", max_depth=80.0)
    assert results["num_frames"] == 1 and results["num_frames_without_gt"] == 1


def test_export_writes_what_load_gt_depths_reads(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    split = write_split(tmp_path / "splits" / "tiny", [f"{DRIVE} 1 l", f"{DRIVE} 0 l"])
    path = export_gt_depths(root, split, split.parent / "gt_depths.npz", progress=False)
    maps = load_gt_depths(path)
    assert [m.shape for m in maps] == [(H, W), (H, W)]
    assert maps[0][30, 30] == pytest.approx(41.0) and maps[1][30, 30] == pytest.approx(40.0)
    assert np.array_equal(maps[1], velodyne_depth(root / DATE, scan(root, 0)))


@pytest.mark.parametrize("problem", ["scan", "calib", "date", "root"])
def test_export_reports_missing_inputs_before_projecting(tmp_path: Path, problem: str) -> None:
    root = make_kitti(tmp_path)
    split = write_split(tmp_path / "splits" / "tiny", [f"{DRIVE} 0 l", f"{DRIVE} 5 l"])
    fragment = {"scan": str(scan(root, 5)),
                "calib": str(root / DATE / "calib_cam_to_cam.txt"),
                "date": f"has no folder {DATE}/",
                "root": "does not exist"}[problem]
    if problem == "calib":
        write_scan(scan(root, 5), POINTS)
        (root / DATE / "calib_cam_to_cam.txt").unlink()
    elif problem == "date":
        root = tmp_path / "empty_root"
        root.mkdir()
    elif problem == "root":
        root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        export_gt_depths(root, split, tmp_path / "out.npz", progress=False)
    assert fragment in str(err.value)
    assert not (tmp_path / "out.npz").exists()


def _compose(tmp_path: Path, overrides: list[str]):
    base = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'outputs'}", "progress=false"]
    return compose_config("export_gt", [*base, *overrides])


def test_config_picks_the_split_folder_and_the_val_file(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    split_dir = tmp_path / "splits" / "eigen"
    write_split(split_dir, [f"{DRIVE} 0 l"])
    write_split(split_dir, [f"{DRIVE} 1 l", f"{DRIVE} 0 l"], name="val")
    assert run(_compose(tmp_path, [f"data.root={root}"])) == split_dir / "gt_depths.npz"
    assert len(load_gt_depths(split_dir / "gt_depths.npz")) == 1
    run(_compose(tmp_path, [f"data.root={root}", "subset=val"]))
    assert len(load_gt_depths(split_dir / "gt_depths_val.npz")) == 2
    with pytest.raises(DataError, match=r"splits/other/test_files\.txt not found"):
        run(_compose(tmp_path, [f"data.root={root}", "split=other"]))


def _cli(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    # command_root: the outputs go under tmp_path; the data folder is tmp_path itself:
    # split=<name> finds tmp_path/splits/<name>
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FSRE_DATA_DIR", str(tmp_path))
        return run_main(main, args)


@pytest.mark.slow  # the command line end to end (in-process)
def test_cli_writes_the_file_and_reports_a_missing_scan_without_traceback(
        command_root: Path) -> None:
    tmp_path = command_root
    root = make_kitti(tmp_path)
    split_dir = tmp_path / "splits" / "mine"
    write_split(split_dir, [f"{DRIVE} 0 l", f"{DRIVE} 1 l"])
    output = tmp_path / "gt" / "custom.npz"
    ok = _cli(tmp_path, [f"data.root={root}", f"split_dir={split_dir}", f"output={output}"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(load_gt_depths(output)) == 2 and str(output) in ok.stdout

    scan(root, 1).unlink()
    bad = _cli(tmp_path, [f"data.root={root}", "split=mine"])
    assert bad.returncode == 2
    assert str(scan(root, 1)) in bad.stderr and "Traceback" not in bad.stderr
    assert not (split_dir / "gt_depths.npz").exists()
    assert not (tmp_path / "outputs").exists()  # the output goes elsewhere: no run folder


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_real_sample_export_feeds_the_test_split(tmp_path: Path) -> None:
    lines = ["2011_09_26/2011_09_26_drive_0005_sync 0 l",
             *(f"2011_09_26/2011_09_26_drive_0000_sync {f} l" for f in range(1, 5))]
    split = write_split(tmp_path / "eigen", lines)
    export_gt_depths(SAMPLE.parent, split, split.parent / "gt_depths.npz", progress=False)
    maps = load_gt_depths(split.parent / "gt_depths.npz")
    assert len(maps) == len(read_split(split)) == 5
    assert all(m.shape == (375, 1242) and 10_000 < np.count_nonzero(m) < 40_000 for m in maps)

    dm = KittiDataModule(SAMPLE.parent, split.parent, height=64, width=192, batch_size=5,
                         num_workers=0, use_labels=False, eval_crop="garg")
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["frames"].shape == (5, 1, 3, 64, 192)
    assert batch["depth_gt"].shape == (5, 1, 375, 1242)
    assert torch.equal(batch["depth_gt"][0, 0], torch.from_numpy(maps[0]))
    # Every real frame has valid pixels inside the Garg crop, and the ground truth scored
    # against itself at native size is perfect.
    disps = [np.where(m > 0, 1.0 / np.maximum(m, 1e-6), 1.0) for m in maps]
    results = evaluate_eigen(disps, maps)
    assert results["abs_rel"] < 1e-6 and results["a1"] == 1.0 and results["num_frames"] == 5


# ------------------------------------------- improved ground truth: KITTI's annotated maps
VAL_DRIVE = f"{DATE}/{DATE}_drive_0002_sync"  # a drive of data_depth_annotated's val/
BENCHMARK_LINES = [f"{DRIVE} 1 l", f"{DRIVE} 0 l", f"{VAL_DRIVE} 3 l", f"{VAL_DRIVE} 3 r"]
# Where each line's map lies, written out by hand: data_depth_annotated's own layout (under the
# folder given as annotated_dir) and Monodepth2's, inside the raw tree (under data.root).
RELEASE_PATHS = [
    f"train/{DATE}_drive_0001_sync/proj_depth/groundtruth/image_02/0000000001.png",
    f"train/{DATE}_drive_0001_sync/proj_depth/groundtruth/image_02/0000000000.png",
    f"val/{DATE}_drive_0002_sync/proj_depth/groundtruth/image_02/0000000003.png",
    f"val/{DATE}_drive_0002_sync/proj_depth/groundtruth/image_03/0000000003.png",
]
RAW_TREE_PATHS = [
    f"{DRIVE}/proj_depth/groundtruth/image_02/0000000001.png",
    f"{DRIVE}/proj_depth/groundtruth/image_02/0000000000.png",
    f"{VAL_DRIVE}/proj_depth/groundtruth/image_02/0000000003.png",
    f"{VAL_DRIVE}/proj_depth/groundtruth/image_03/0000000003.png",
]


def write_depth_png(path: Path, values: np.ndarray) -> Path:
    """A uint16 PNG as KITTI stores its annotated maps (metres x 256, 0 = no data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint16)).save(path)
    return path


def annotated_values(seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Sparse uint16 values: 1..90 m (some beyond the 80 m cap), 70 % of the pixels empty."""
    rng = np.random.default_rng(seed)
    values = rng.integers(256, 90 * 256, size)
    values[rng.random(size) < 0.7] = 0
    return values.astype(np.uint16)


def make_annotated(base: Path, layout: str, seed: int = 0) -> list[np.ndarray]:
    """The maps of BENCHMARK_LINES under `base` in `layout` ("release" or "raw_tree"); returns
    their uint16 values in line order (each line's differ, the right camera's too)."""
    paths = RELEASE_PATHS if layout == "release" else RAW_TREE_PATHS
    values = [annotated_values(seed + i) for i in range(len(paths))]
    for path, v in zip(paths, values, strict=True):
        write_depth_png(base / path, v)
    return values


def test_annotated_values_are_metres_times_256(tmp_path: Path) -> None:
    values = np.array([[0, 1, 255, 256], [20480, 65535, 3, 7]], dtype=np.uint16)
    path = write_depth_png(tmp_path / "0000000000.png", values)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # a real 16-bit PNG, as KITTI's
    depth = read_annotated_depth(path)
    assert depth.dtype == np.float32 and depth.shape == (2, 4)
    assert depth[0].tolist() == [0.0, 1 / 256, 255 / 256, 1.0]
    assert depth[1].tolist() == [80.0, 65535 / 256, 3 / 256, 7 / 256]


@pytest.mark.parametrize("layout", ["release", "raw_tree"])
def test_annotated_export_reads_each_line_in_split_order(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "kitti"
    annotated_dir = tmp_path / "data_depth_annotated" if layout == "release" else None
    values = make_annotated(annotated_dir or root, layout)
    split = write_split(tmp_path / "splits" / "eigen_benchmark", BENCHMARK_LINES)
    path = export_annotated_depths(root, split, split.parent / "gt_depths.npz",
                                   annotated_dir=annotated_dir, progress=False)
    maps = load_gt_depths(path)
    assert len(maps) == len(BENCHMARK_LINES)
    for depth, v in zip(maps, values, strict=True):
        assert depth.dtype == np.float32 and np.array_equal(depth, v.astype(np.float32) / 256)
    assert not np.array_equal(maps[2], maps[3])  # the 'r' line read image_03's map


def _one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


ANNOTATED_PROBLEMS = ["missing", "no annotated_dir", "no train or val", "no root", "8-bit",
                      "rgb", "jpeg", "truncated", "not an image", "all zero"]


@pytest.mark.parametrize("problem", ANNOTATED_PROBLEMS)
def test_annotated_input_errors_are_one_line_naming_the_file(tmp_path: Path,
                                                             problem: str) -> None:
    root = tmp_path / "kitti"
    annotated_dir: Path | None = tmp_path / "data_depth_annotated"
    make_annotated(annotated_dir, "release")
    split = write_split(tmp_path / "splits" / "eigen_benchmark", BENCHMARK_LINES)
    bad = annotated_dir / RELEASE_PATHS[2]
    fragment = str(bad)
    if problem == "missing":
        bad.unlink()
        in_train = annotated_dir / RELEASE_PATHS[2].replace("val/", "train/", 1)
        fragment = f"{in_train} or {bad}"  # both folders searched, train/ first
    elif problem == "no annotated_dir":
        annotated_dir = fragment = tmp_path / "nowhere"
    elif problem == "no train or val":
        annotated_dir = fragment = annotated_dir / "train"
    elif problem == "no root":
        annotated_dir, fragment = None, f"data.root={str(root)!r} does not exist"
    elif problem == "8-bit":
        Image.fromarray(np.full((H, W), 40, np.uint8)).save(bad)
    elif problem == "rgb":
        Image.fromarray(np.full((H, W, 3), 40, np.uint8)).save(bad, format="PNG")
    elif problem == "jpeg":
        Image.fromarray(np.full((H, W), 40, np.uint8)).save(bad, format="JPEG")
    elif problem == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif problem == "not an image":
        bad.write_bytes(b"not a png")
    else:
        write_depth_png(bad, np.zeros((H, W)))
    with pytest.raises(DataError) as err:
        export_annotated_depths(root, split, tmp_path / "out.npz", annotated_dir=annotated_dir,
                                progress=False)
    assert str(fragment) in _one_line(err)
    assert not (tmp_path / "out.npz").exists()


def test_a_missing_map_is_counted_and_the_eigen_split_is_pointed_at(tmp_path: Path) -> None:
    """Scoring the 697-line eigen split on annotated maps: the 45 lines KITTI does not annotate
    are one error before anything is read, which says which split to use."""
    root = tmp_path / "kitti"
    make_annotated(root, "raw_tree")
    split = write_split(tmp_path / "splits" / "eigen", [*BENCHMARK_LINES, f"{DRIVE} 7 l",
                                                        f"{DRIVE} 8 l"])
    with pytest.raises(DataError) as err:
        export_annotated_depths(root, split, tmp_path / "out.npz", progress=False)
    message = _one_line(err)
    assert str(root / DRIVE / "proj_depth/groundtruth/image_02/0000000007.png") in message
    assert f"line '{DRIVE} 7 l' of {split}" in message and "2 of 6 lines have none" in message
    assert "eigen_benchmark split" in message and "annotated_dir=" in message


def test_config_source_follows_the_split_folder(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_kitti(tmp_path)  # velodyne scans of DRIVE's frames 0 and 1
    in_raw_tree = make_annotated(root, "raw_tree")
    annotated_dir = tmp_path / "data_depth_annotated"
    released = make_annotated(annotated_dir, "release", seed=10)
    # split=eigen_benchmark: the annotated maps, by default inside the raw tree
    benchmark = tmp_path / "splits" / "eigen_benchmark"
    write_split(benchmark, BENCHMARK_LINES)
    assert run(_compose(tmp_path, [f"data.root={root}", "split=eigen_benchmark"])
               ) == benchmark / "gt_depths.npz"
    assert f"wrote the annotated ground truth of {benchmark / 'test_files.txt'}" in (
        capsys.readouterr().out)
    # The source is recorded beside the maps: evaluate names it and scores it by it.
    assert json.loads((benchmark / "gt_depths.json").read_text())["source"] == "annotated"
    maps = load_gt_depths(benchmark / "gt_depths.npz")
    assert all(np.array_equal(m, v / np.float32(256)) for m, v in zip(maps, in_raw_tree,
                                                                       strict=True))
    run(_compose(tmp_path, [f"data.root={root}", "split=eigen_benchmark",
                            f"annotated_dir={annotated_dir}"]))
    assert np.array_equal(load_gt_depths(benchmark / "gt_depths.npz")[3],
                          released[3] / np.float32(256))
    # any other split folder: the velodyne scans, unless source=annotated
    mine = tmp_path / "splits" / "mine"
    write_split(mine, BENCHMARK_LINES[:2])
    run(_compose(tmp_path, [f"data.root={root}", "split=mine"]))
    assert np.array_equal(load_gt_depths(mine / "gt_depths.npz")[1],
                          velodyne_depth(root / DATE, scan(root, 0)))
    run(_compose(tmp_path, [f"data.root={root}", "split=mine", "source=annotated"]))
    assert np.array_equal(load_gt_depths(mine / "gt_depths.npz")[1],
                          in_raw_tree[1] / np.float32(256))
    with pytest.raises(ConfigError, match=r"annotated_dir=.* read only when the source is "
                       r"annotated; source=auto picks velodyne for split folder 'mine'"):
        run(_compose(tmp_path, [f"data.root={root}", "split=mine",
                                f"annotated_dir={annotated_dir}"]))


@pytest.mark.slow  # the command line end to end (in-process)
def test_cli_exports_annotated_maps_and_names_a_missing_one_in_one_line(
        command_root: Path) -> None:
    tmp_path = command_root
    root = tmp_path / "kitti"
    annotated_dir = tmp_path / "data_depth_annotated"
    values = make_annotated(annotated_dir, "release")
    split_dir = tmp_path / "splits" / "eigen_benchmark"
    write_split(split_dir, BENCHMARK_LINES)
    args = [f"data.root={root}", "split=eigen_benchmark", f"annotated_dir={annotated_dir}"]
    ok = _cli(tmp_path, args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"wrote the annotated ground truth of {split_dir / 'test_files.txt'}" in ok.stdout
    maps = load_gt_depths(split_dir / "gt_depths.npz")
    assert np.array_equal(maps[2], values[2] / np.float32(256))

    (split_dir / "gt_depths.npz").unlink()
    (annotated_dir / RELEASE_PATHS[3]).unlink()
    bad = _cli(tmp_path, args)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsre_lightning.export_gt: error: "), lines
    assert str(annotated_dir / RELEASE_PATHS[3]) in lines[0]
    assert not (split_dir / "gt_depths.npz").exists()
    assert not (tmp_path / "outputs").exists()


# ------------------------------------ evaluate against the improved ground truth, end to end
@pytest.fixture(scope="module")
def checkpoint(module_tmp: Callable[[str], Path]) -> Path:
    """A randomly initialised model trained (by its record) at 64 x 192."""
    return make_run(module_tmp("run"))


def write_frames(root: Path, lines: list[str], size: tuple[int, int] = (H, W)) -> None:
    """A random RGB image for each line's frame, in the line's camera."""
    rng = np.random.default_rng(0)
    for line in lines:
        folder, frame, side = line.split()
        camera = "image_02" if side == "l" else "image_03"
        path = root / folder / camera / "data" / f"{int(frame):010d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _evaluate(tmp_path: Path, overrides: list[str]) -> dict[str, Any]:
    base = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'outputs'}", "data=kitti", "data.num_workers=0",
            "data.batch_size=4", "data.pin_memory=false", "device=cpu"]
    return evaluate(compose_config("evaluate", [*base, *overrides]))


@pytest.mark.slow
def test_evaluate_scores_the_improved_ground_truth_with_the_eigen_protocol(
        tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "kitti"
    write_frames(root, BENCHMARK_LINES)
    annotated_dir = tmp_path / "data_depth_annotated"
    make_annotated(annotated_dir, "release")  # depths up to 90 m: some beyond the cap
    split_dir = tmp_path / "splits" / "eigen_benchmark"
    write_split(split_dir, BENCHMARK_LINES)
    run(_compose(tmp_path, [f"data.root={root}", "split=eigen_benchmark",
                            f"annotated_dir={annotated_dir}"]))

    # The Eigen protocol asked for: protocol=auto scores annotated maps as published tables do.
    data = [f"ckpt_path={checkpoint}", f"data.root={root}", f"data.split_dir={split_dir}",
            "protocol=eigen"]
    results = _evaluate(tmp_path, [*data, f"metrics_path={tmp_path / 'garg.json'}"])
    assert "4 frames scored" in capsys.readouterr().out
    written = json.loads((tmp_path / "garg.json").read_text())
    assert written["num_frames"] == 4 and written["num_frames_without_gt"] == 0
    assert all(math.isfinite(written[key]) for key in EIGEN_KEYS)
    settings = written["settings"]
    assert settings["split_dir"] == str(split_dir) and settings["median_scaling"] is True
    assert (settings["crop"], settings["min_depth"], settings["max_depth"]) == ("garg", 1e-3, 80.0)
    # The crop and the cap act on these maps as on eigen's: without either, other numbers.
    uncropped = _evaluate(tmp_path, [*data, "data.eval_crop=none",
                                     f"metrics_path={tmp_path / 'none.json'}"])
    uncapped = _evaluate(tmp_path, [*data, "data.max_depth_eval=100",
                                    f"metrics_path={tmp_path / 'cap.json'}"])
    assert uncropped["num_frames"] == uncapped["num_frames"] == 4
    for other in (uncropped, uncapped):
        assert abs(other["abs_rel"] - results["abs_rel"]) > 1e-4


SAMPLE_LINES = ["2011_09_26/2011_09_26_drive_0005_sync 0 l",
                *(f"2011_09_26/2011_09_26_drive_0000_sync {f} l" for f in range(1, 5))]


def sample_annotated(tmp_path: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """Annotated maps for the real sample frames, fabricated beside them in tmp_path (KITTI's
    own are not in the sample): their velodyne projection stored as KITTI stores depth, in
    data_depth_annotated's layout. Returns (annotated_dir, split file, the uint16 values)."""
    annotated_dir = tmp_path / "data_depth_annotated"
    values = []
    for line in SAMPLE_LINES:
        folder, frame, _ = line.split()
        scan_file = SAMPLE.parent / folder / "velodyne_points" / "data" / f"{int(frame):010d}.bin"
        v = np.round(velodyne_depth(SAMPLE, scan_file) * 256).astype(np.uint16)
        drive = folder.split("/")[1]
        write_depth_png(annotated_dir / "train" / drive / "proj_depth" / "groundtruth"
                        / "image_02" / f"{int(frame):010d}.png", v)
        values.append(v)
    return annotated_dir, write_split(tmp_path / "eigen_benchmark", SAMPLE_LINES), values


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_real_sample_annotated_maps_are_read_back_exactly(tmp_path: Path) -> None:
    annotated_dir, split, values = sample_annotated(tmp_path)
    path = export_annotated_depths(SAMPLE.parent, split, split.parent / "gt_depths.npz",
                                   annotated_dir=annotated_dir, progress=False)
    maps = load_gt_depths(path)
    assert len(maps) == len(SAMPLE_LINES)
    for depth, v in zip(maps, values, strict=True):
        assert depth.shape == (375, 1242) == v.shape  # the raw images' size
        assert np.array_equal(depth, v.astype(np.float32) / 256)
        assert 10_000 < np.count_nonzero(depth) < 40_000
    # Stored in 1/256 m steps, the projection comes back within half a step.
    velodyne = velodyne_depth(SAMPLE, SAMPLE / "2011_09_26_drive_0005_sync" / "velodyne_points"
                              / "data" / "0000000000.bin")
    assert np.array_equal(maps[0] > 0, velodyne > 0)
    assert np.abs(maps[0] - velodyne).max() <= 1 / 512


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_real_sample_evaluate_on_annotated_maps(tmp_path: Path, checkpoint: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    annotated_dir, split, _ = sample_annotated(tmp_path)
    run(_compose(tmp_path, [f"data.root={SAMPLE.parent}", f"split_dir={split.parent}",
                            f"annotated_dir={annotated_dir}"]))
    results = _evaluate(tmp_path, [f"ckpt_path={checkpoint}", f"data.root={SAMPLE.parent}",
                                   f"data.split_dir={split.parent}",
                                   f"metrics_path={tmp_path / 'metrics.json'}"])
    assert "5 frames scored" in capsys.readouterr().out
    assert results["num_frames"] == 5 and results["num_frames_without_gt"] == 0
    assert all(math.isfinite(results[key]) for key in EIGEN_KEYS)
