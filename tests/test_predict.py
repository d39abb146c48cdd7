"""`python -m fsre_lightning.predict`: images, folders, videos, metric scale and bad input."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning.checkpoints import CheckpointMismatchError
from fsre_lightning.data.synthetic import render_drive
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.inference.scale import camera_height_scale, ground_mask
from fsre_lightning.predict import main, run
from fsre_lightning.testing import compose_config, run_main
from fsre_lightning.testing.tiny_checkpoints import make_mismatched, make_run

# Native frames larger than the network input (64 x 192), so resizing back is visible.
NATIVE = (80, 240)
HAS_VIDEO = all(importlib.util.find_spec(m) for m in ("imageio", "imageio_ffmpeg"))


@pytest.fixture(scope="module")
def ckpt(module_tmp: Callable[[str], Path]) -> Path:
    return make_run(module_tmp("run"), encoder="test_resnet")


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    """Four consecutive synthetic driving frames (road, facades, cars, sky)."""
    return [frame.rgb for frame in render_drive(0, 4, *NATIVE, seed=0)]


def _cfg(tmp_path: Path, overrides: list[str]):
    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'outputs'}",
            "progress=false", "device=cpu"]
    return compose_config("predict", [*base, *overrides])


def write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    with imageio.get_writer(path, format="FFMPEG", fps=fps) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


@pytest.mark.slow
def test_folder_of_images_at_input_size_with_segmentation(tmp_path: Path, ckpt: Path,
                                                         scenes: list[np.ndarray]) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, rgb in enumerate(scenes[:3]):
        Image.fromarray(rgb).save(folder / f"{i:04d}.png")
    out = tmp_path / "out"
    summary = run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={folder}", f"output={out}",
                                  "segmentation=true", "batch_size=2", "overlay=true",
                                  f"side_by_side={str(HAS_VIDEO).lower()}"]))
    assert summary["frames"] == 3
    for i in range(3):
        name = f"{i:04d}"
        depth_png = Image.open(out / f"{name}_depth.png")
        assert depth_png.size == (NATIVE[1], NATIVE[0]) and depth_png.mode == "RGB"
        disp = np.load(out / f"{name}_disp.npy")
        depth = np.load(out / f"{name}_depth.npy")
        assert disp.shape == depth.shape == NATIVE and disp.dtype == np.float32
        # disp_to_depth's range (min_depth 0.1, max_depth 100) and depth = 1 / disp
        assert disp.min() >= 0.01 - 1e-6 and disp.max() <= 10 + 1e-4
        np.testing.assert_allclose(depth, 1.0 / disp, rtol=1e-5)
        assert Image.open(out / f"{name}_seg.png").size == (NATIVE[1], NATIVE[0])
        assert Image.open(out / f"{name}_overlay.png").size == (NATIVE[1], NATIVE[0])
        ids = np.asarray(Image.open(out / f"{name}_seg_ids.png"))
        assert ids.shape == NATIVE and ids.max() < 19
    assert not HAS_VIDEO or (out / "side_by_side.mp4").stat().st_size > 0


@pytest.mark.slow
def test_video_at_network_size_with_npz_scale_and_side_by_side(
        tmp_path: Path, ckpt: Path, scenes: list[np.ndarray]) -> None:
    video = write_video(tmp_path / "drive.mp4", scenes)
    out = tmp_path / "out"
    summary = run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={video}", f"output={out}",
                                  "resolution=network", "segmentation=true", "side_by_side=true",
                                  "scale_factor=2.5", "batch_size=3"]))
    assert summary["frames"] == 4
    with np.load(out / "drive.npz") as arrays:
        assert arrays["disp"].shape == arrays["depth"].shape == (4, 64, 192)
        assert arrays["segmentation"].shape == (4, 64, 192)
        assert arrays["segmentation"].dtype == np.uint8
        np.testing.assert_allclose(arrays["scale"], 2.5)
        np.testing.assert_allclose(arrays["depth"], 2.5 / arrays["disp"], rtol=1e-5)
        assert float(arrays["fps"]) == pytest.approx(5.0)
    assert sorted(p.name for p in out.glob("drive_*_depth.png")) == [
        f"drive_{i:06d}_depth.png" for i in range(4)]
    assert not list(out.glob(".predict-*"))  # the spooled frames are cleaned up
    import imageio.v2 as imageio

    with imageio.get_reader(out / "drive_side_by_side.mp4", format="FFMPEG") as reader:
        frames = [frame for frame in reader.iter_data()]  # list(reader) trips on len = inf
    assert len(frames) == 4 and frames[0].shape == (64, 3 * 192, 3)


def test_camera_height_gives_metric_scale_on_a_flat_ground() -> None:
    h, w, fy, cy = 64, 192, 1.92, 0.5
    v = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    dv = v / h - cy
    # Ground 1.65 m below the camera: z = 1.65 * fy / (v / h - cy); sky far away.
    metric = torch.where(dv > 0, 1.65 * fy / dv.clamp_min(1e-6), torch.full_like(dv, 80.0))
    relative = metric / 4.0  # a network whose unit is 4 m
    scale = camera_height_scale(relative, (0.58, 1.92, 0.5, 0.5), 1.65, ground_mask((h, w)))
    assert scale == pytest.approx(4.0, rel=1e-3)
    # With labels, the predicted road is the ground, wherever it lies.
    labels = torch.full((h, w), 10)
    labels[40:, :] = 0
    mask = ground_mask((h, w), labels)
    assert bool(mask[40:].all()) and not bool(mask[:40].any())
    assert camera_height_scale(relative, (0.58, 1.92, 0.5, 0.5), 1.65, mask) == pytest.approx(
        4.0, rel=1e-3)


@pytest.mark.slow
def test_camera_height_run_writes_per_frame_scales(tmp_path: Path, ckpt: Path,
                                                   scenes: list[np.ndarray]) -> None:
    image = tmp_path / "one.jpg"
    Image.fromarray(scenes[0]).save(image)
    out = tmp_path / "out"
    summary = run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={image}", f"output={out}",
                                  "camera_height=1.65"]))
    assert summary["frames"] == 1 and summary["scale_median"] > 0
    disp, depth = np.load(out / "one_disp.npy"), np.load(out / "one_depth.npy")
    np.testing.assert_allclose(depth * disp, summary["scale_median"], rtol=1e-4)
    assert not (out / "one_seg.png").exists()  # the road was used, but not asked for


@pytest.mark.slow
def test_bad_inputs_name_the_file(tmp_path: Path, ckpt: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 100)
    with pytest.raises(DataError, match=r"broken\.mp4"):
        run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={broken}", f"output={tmp_path}/o"]))
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_folder holds no images"):
        run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={empty}", f"output={tmp_path}/o"]))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.png"):
        run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={tmp_path}/nowhere.png",
                            f"output={tmp_path}/o"]))

    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((64, 192, 3), np.uint8)).save(image)
    other = make_mismatched(tmp_path / "other_model.ckpt", encoder="test_resnet")
    with pytest.raises(CheckpointMismatchError, match=r"other_model\.ckpt") as info:
        run(_cfg(tmp_path, [f"ckpt_path={other}", f"input={image}", f"output={tmp_path}/o",
                            "height=64", "width=192"]))
    assert "seg_decoder" in str(info.value)
    with pytest.raises(ConfigError, match="set height= and width="):
        run(_cfg(tmp_path, [f"ckpt_path={other}", f"input={image}", f"output={tmp_path}/o"]))
    with pytest.raises(ConfigError, match="scale_factor"):
        run(_cfg(tmp_path, [f"ckpt_path={ckpt}", f"input={image}", "scale_factor=2",
                            "camera_height=1.5", f"output={tmp_path}/o"]))


@pytest.mark.slow  # the command line end to end (in-process)
def test_cli_reports_a_bad_input_in_one_line(command_root: Path, ckpt: Path) -> None:
    empty = command_root / "nothing_here"
    empty.mkdir()
    result = run_main(main, [f"ckpt_path={ckpt}", f"input={empty}"])
    assert result.returncode == 2
    assert "nothing_here" in result.stderr and "Traceback" not in result.stderr
