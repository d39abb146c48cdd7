"""The built-in synthetic data set: rendered drives written in the KITTI raw layout.

`generate_synthetic_kitti` renders drives with `fsre_lightning.data.scenes` (a camera 1.65 m
above a flat road, exact depth, pose and Cityscapes labels per pixel) and writes them where the
KITTI data module reads, so training, validation and evaluation need no download.

Layout written by `generate_synthetic_kitti` under `root`:
    <DATE>/<DATE>_drive_<NNNN>_sync/image_02/data/<frame:010d>.png   RGB
    <DATE>/<DATE>_drive_<NNNN>_sync/poses.txt                         3 x 4 camera-to-world rows
    segmentation/<DATE>/<DATE>_drive_<NNNN>_sync/image_02/<frame:010d>.png   train ids
    splits/synthetic/{train,val,test}_files.txt, gt_depths.npz (test), gt_depths_val.npz (val)
    synthetic.json   parameters; written first with "complete": false (the folder is the
                     generator's from then on) and again at the end, complete
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

from fsre_lightning.config.checks import check_int
from fsre_lightning.data.kitti_layout import (
    GT_FILE_NAMES,
    SplitEntry,
    camera_folder,
    image_file,
    label_file,
    save_gt_depths,
    write_split,
)
from fsre_lightning.data.scenes import CAMERA_HEIGHT, Frame, render_drive
from fsre_lightning.errors import DataError

__all__ = ["CAMERA_HEIGHT", "DATE", "SPLIT_NAME", "Frame", "SyntheticConfig",
           "generate_synthetic_kitti", "read_poses", "render_drive"]

logger = logging.getLogger(__name__)

DATE = "2011_01_01"
SPLIT_NAME = "synthetic"
FORMAT_VERSION = 1
CAMERA = camera_folder(2)  # the scenes are seen by a left camera


# --------------------------------------------------------------------------- on disk


def drive_name(drive_index: int) -> str:
    """'2011_01_01_drive_0001_sync' for drive_index 0 (drives are numbered from 1)."""
    return f"{DATE}_drive_{drive_index + 1:04d}_sync"


def _write_drive(args: tuple[str, int, int, int, int, int, bool]) -> list[np.ndarray] | None:
    """Render and write one drive; returns its depths (frames 1..N-2) when `keep_depth`."""
    root_s, drive_index, num_frames, height, width, seed, keep_depth = args
    root = Path(root_s)
    frames = render_drive(drive_index, num_frames, height, width, seed)
    folder = f"{DATE}/{drive_name(drive_index)}"
    lines = []
    for i, fr in enumerate(frames):
        for array, path in ((fr.rgb, image_file(root, folder, CAMERA, i)),
                            (fr.labels, label_file(root / "segmentation", folder, CAMERA, i))):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, compress_level=1)
        lines.append(" ".join(f"{x:.9g}" for x in fr.cam_to_world[:3].reshape(-1)))
    (root / folder / "poses.txt").write_text("\n".join(lines) + "\n")
    return [fr.depth for fr in frames[1:-1]] if keep_depth else None


def read_poses(path: str | os.PathLike[str]) -> np.ndarray:
    """poses.txt -> N x 4 x 4 camera-to-world matrices."""
    rows = np.loadtxt(path, ndmin=2).reshape(-1, 3, 4)
    out = np.tile(np.eye(4), (len(rows), 1, 1))
    out[:, :3] = rows
    return out


def _write_marker(marker: Path, params: dict[str, Any]) -> None:
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params, indent=2) + "\n")
    os.replace(tmp, marker)


def _clear(root: Path) -> None:
    """Remove only what the generator writes (root may hold other things)."""
    (root / "synthetic.json").unlink(missing_ok=True)
    for sub in (root / DATE, root / "segmentation" / DATE, root / "splits" / SPLIT_NAME):
        if sub.exists():
            shutil.rmtree(sub)


@dataclass(kw_only=True)
class SyntheticConfig:
    """`data.synthetic`: `generate_synthetic_kitti`'s arguments and their rules."""

    num_drives: int = 8
    frames_per_drive: int = 110
    height: int = 96
    width: int = 320
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        check_int("num_drives", self.num_drives, lo=3,
                  what="an integer >= 3 (the last drive is test, the one before it val)")
        check_int("frames_per_drive", self.frames_per_drive, lo=3,
                  what="an integer >= 3 (a frame needs both neighbours)")
        for key in ("height", "width"):
            check_int(key, getattr(self, key), lo=1)
        check_int("seed", self.seed)
        check_int("workers", self.workers, lo=0)


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

    Skipped when root/synthetic.json records the same parameters of a complete generation; a
    complete generation with other parameters is a DataError (another world is never
    rewritten); an interrupted one is removed and redone. A root that exists, is not empty and
    holds no synthetic.json (e.g. a real KITTI copy) is a DataError: nothing is written there.
    The last drive is the test split, the one before it val, the rest train; split lines
    exclude each drive's first and last frame.
    """
    SyntheticConfig(num_drives=num_drives, frames_per_drive=frames_per_drive, height=height,
                    width=width, seed=seed, workers=workers)
    root = Path(root)
    params: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "date": DATE, "split": SPLIT_NAME,
        "num_drives": num_drives, "frames_per_drive": frames_per_drive,
        "height": height, "width": width, "seed": seed,
    }
    marker = root / "synthetic.json"
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = {}
        complete = recorded.pop("complete", True)
        if complete and recorded == params:
            logger.info("synthetic data at %s is up to date", root)
            return root
        if complete and recorded:
            # Another world (a copy of the smoke scenes, the demo's): never rewritten in place,
            # which would destroy what a run or a checkpoint was trained on.
            differ = ", ".join(f"{k} {recorded.get(k)!r} there, {v!r} asked"
                               for k, v in params.items() if recorded.get(k) != v)
            raise DataError(
                f"data.root={root} holds another synthetic world ({differ}); it is not "
                "regenerated in place: give data.synthetic the settings it was made with, or a "
                "new or empty folder as data.root (evaluate takes the checkpoint's own data "
                "config when no data.* is set)")
    elif root.is_dir() and any(root.iterdir()):
        raise DataError(
            f"data.root={root} is not empty and was not written by the synthetic scene "
            "generator (no synthetic.json in it), which writes only into an empty folder or one "
            "it wrote itself. For KITTI select data=kitti; for synthetic scenes give a new or "
            "empty folder")
    start = time.perf_counter()
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    # Claimed before the first frame: an interrupted generation is still recognised as ours.
    _write_marker(marker, {**params, "complete": False})
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

    def lines(drives: range | list[int]) -> list[SplitEntry]:
        return [SplitEntry(f"{DATE}/{drive_name(i)}", f, "l") for i in drives
                for f in range(1, frames_per_drive - 1)]

    write_split(split_dir / "train_files.txt", lines(range(num_drives - 2)))
    write_split(split_dir / "val_files.txt", lines([val_drive]))
    write_split(split_dir / "test_files.txt", lines([test_drive]))
    for stage, drive in (("val", val_drive), ("test", test_drive)):
        gt_file = save_gt_depths(split_dir / GT_FILE_NAMES[stage], depths[drive] or [])
        # What the ground truth is, for evaluate's record (and its protocol=auto).
        gt_file.with_suffix(".json").write_text(json.dumps({"source": "rendered"}) + "\n")
    _write_marker(marker, params)  # last: it marks the generation complete
    elapsed = time.perf_counter() - start
    logger.info("generated %d synthetic drives x %d frames (%d x %d) at %s in %.1f s",
                num_drives, frames_per_drive, height, width, root, elapsed)
    print(f"synthetic KITTI: {num_drives} drives x {frames_per_drive} frames "
          f"({height} x {width}) in {elapsed:.1f} s -> {root}")
    return root
