"""A tiny KITTI-raw-layout folder with label-id PNGs (the cache, pseudo-label and reliability
tests build one in a temporary folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fsre_lightning.data.kitti_layout import camera_folder, image_file, label_file

DRIVE = "2011_01_01/2011_01_01_drive_0001_sync"
CAMERA = camera_folder(2)
NATIVE = (60, 200)  # a small stand-in for KITTI's 375 x 1242 (same aspect, roughly)

# Cityscapes label ids painted into every label PNG, and the train ids they must become.
LABEL_BANDS = ((0, 20, 23, 10),    # rows 0..19: sky
               (20, 40, 26, 13),   # rows 20..39: car
               (40, 60, 7, 0))     # rows 40..59: road (left half), unlabeled id 0 (right half)


def label_ids_image(size: tuple[int, int] = NATIVE) -> np.ndarray:
    """Cityscapes label ids: bands of sky / car / road, with an unlabelled (0) corner."""
    lab = np.zeros(size, dtype=np.uint8)
    for top, bottom, label_id, _ in LABEL_BANDS:
        lab[top * size[0] // 60: bottom * size[0] // 60] = label_id
    lab[40 * size[0] // 60:, size[1] // 2:] = 0
    return lab


def expected_train_ids(size: tuple[int, int] = NATIVE) -> np.ndarray:
    out = np.full(size, 255, dtype=np.uint8)
    for top, bottom, _, train_id in LABEL_BANDS:
        out[top * size[0] // 60: bottom * size[0] // 60] = train_id
    out[40 * size[0] // 60:, size[1] // 2:] = 255
    return out


def make_kitti(tmp_path: Path, frames: int = 6, ext: str = "png",
               size: tuple[int, int] = NATIVE, seed: int = 0) -> Path:
    """Frames 0..frames-1 of one drive (left camera) with label-id PNGs; splits "tiny".

    Train and val list frames 1..frames-2 (so that -1 and +1 exist); test lists frame 0.
    """
    root = tmp_path / "kitti"
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    for f in range(frames):
        img = image_file(root, DRIVE, CAMERA, f, ext)
        img.parent.mkdir(parents=True, exist_ok=True)
        # Smooth gradients plus noise: Lanczos over- and undershoots get exercised.
        base = np.stack([(xx * 255 // size[1]), (yy * 255 // size[0]),
                         ((xx + yy + 20 * f) % 256)], -1)
        noise = rng.integers(0, 60, (*size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(img)
        label = label_file(root / "segmentation", DRIVE, CAMERA, f)
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label_ids_image(size)).save(label)
    splits = root / "splits" / "tiny"
    splits.mkdir(parents=True)
    lines = [f"{DRIVE} {f} l" for f in range(1, frames - 1)]
    for name in ("train", "val"):
        (splits / f"{name}_files.txt").write_text("\n".join(lines) + "\n")
    (splits / "test_files.txt").write_text(f"{DRIVE} 0 l\n")
    return root
