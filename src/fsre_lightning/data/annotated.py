"""KITTI's annotated depth maps, the "improved ground truth" (docs/design.md 4.2).

The KITTI depth benchmark's `data_depth_annotated` holds, for most raw frames, a depth map built
from accumulated velodyne scans checked against stereo: one uint16 PNG per frame at the raw
image's size, depth in metres = value / 256, 0 = no data. Monodepth2 scores its eigen_benchmark
split (652 of the 697 Eigen test lines, those that have a map) against them.

Two layouts are read (`layout.annotated_candidates`): the release's own,
`ANNOTATED_DIR/{train,val}/<drive>_sync/proj_depth/groundtruth/image_0X/<frame>.png`, and
Monodepth2's, the same `<drive>_sync/proj_depth` folders copied into the raw tree. Every map a
split needs is located before the first is read; each error is one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from fsre_lightning.data.kitti_layout import (
    ANNOTATED_SPLIT,
    ANNOTATED_SUBSETS,
    SplitEntry,
    annotated_candidates,
    read_split,
    save_gt_depths,
)
from fsre_lightning.errors import DataError, first_line

# The release stores metres x 256 in 16 bits (so depths up to 256 m in 1/256 m steps).
DEPTH_SCALE = 256.0
# Pillow's modes of a 16-bit single-channel PNG ("I" is how older Pillow versions open it).
_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I")
_UINT16_MAX = 65535
# What PIL raises for damaged or unreadable files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)
_RE_EXTRACT = "re-extract it from KITTI's data_depth_annotated.zip"


def decode_annotated_depth(path: Path, values: np.ndarray, image_format: str | None,
                           mode: str) -> np.ndarray:
    """Metres (float32, 0 = no data) from the pixel values of an annotated map read from
    `path`; DataError naming the file when they are not a 16-bit single-channel PNG's."""
    if image_format != "PNG" or mode not in _UINT16_MODES:
        raise DataError(f"annotated depth map {path} is a {image_format} image of mode {mode}, "
                        "not KITTI's 16-bit single-channel PNG (metres x 256): " + _RE_EXTRACT)
    if values.ndim != 2 or values.min() < 0 or values.max() > _UINT16_MAX:
        raise DataError(f"annotated depth map {path} holds values outside 0..{_UINT16_MAX} or "
                        f"is not one channel (shape {values.shape}): " + _RE_EXTRACT)
    depth = values.astype(np.float32) / np.float32(DEPTH_SCALE)
    if not depth.any():
        # An empty map would silently drop the frame from the score (docs/design.md 3.13).
        raise DataError(f"annotated depth map {path} has no valid pixel (every value is 0): "
                        + _RE_EXTRACT)
    return depth


def read_annotated_depth(path: str | os.PathLike[str]) -> np.ndarray:
    """H x W float32 depth in metres (value / 256; 0 = no data) of one annotated PNG."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotated depth map {path} not found")
    try:
        with Image.open(path) as img:
            image_format, mode = img.format, img.mode
            values = np.asarray(img)  # decodes the whole file: truncation shows here
    except _DECODE_ERRORS as err:
        raise DataError(f"annotated depth map {path} cannot be decoded ({first_line(err)}): "
                        + _RE_EXTRACT) from err
    return decode_annotated_depth(path, values, image_format, mode)


def _check_folders(root: Path, annotated_dir: Path | None) -> None:
    if annotated_dir is None:
        if not root.is_dir():
            raise DataError(f"data.root={str(root)!r} does not exist: with annotated_dir=null the "
                            "annotated maps are read inside the KITTI raw tree, <data.root>/<date>/"
                            "<drive>_sync/proj_depth/groundtruth/")
        return
    hint = ("point it at the unpacked data_depth_annotated folder, the one holding train/ and "
            "val/")
    if not annotated_dir.is_dir():
        raise DataError(f"annotated_dir={str(annotated_dir)!r} does not exist: {hint}")
    if not any((annotated_dir / subset).is_dir() for subset in ANNOTATED_SUBSETS):
        raise DataError(f"annotated_dir={str(annotated_dir)!r} has neither train/ nor val/: "
                        f"{hint}")


def locate_annotated(root: Path, annotated_dir: Path | None, entries: Sequence[SplitEntry],
                     split_file: Path) -> list[Path]:
    """The annotated map of every line, in split order; one DataError (one line, naming the
    first missing file and counting the others) before any map is read."""
    _check_folders(root, annotated_dir)
    found: list[Path] = []
    missing: list[tuple[SplitEntry, list[Path]]] = []
    for entry in entries:
        candidates = annotated_candidates(root, annotated_dir, entry)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            missing.append((entry, candidates))
        else:
            found.append(path)
    if missing:
        entry, candidates = missing[0]
        where = " or ".join(str(c) for c in candidates)
        layout = ("set annotated_dir= to the folder holding data_depth_annotated's train/ and "
                  "val/, or copy its <drive>_sync folders into the raw tree"
                  if annotated_dir is None else
                  f"annotated_dir={str(annotated_dir)!r} must be the folder holding train/ and "
                  "val/ of data_depth_annotated, unpacked as released")
        split_hint = ("" if split_file.parent.name == ANNOTATED_SPLIT else
                      "; KITTI annotates no frame at either end of a drive, so score the "
                      f"improved ground truth on Monodepth2's {ANNOTATED_SPLIT} split (652 "
                      "lines), not eigen (697)")
        raise DataError(
            f"annotated depth map {where} not found (line '{entry}' of {split_file}; "
            f"{len(missing)} of {len(entries)} lines have none): {layout}{split_hint}")
    return found


def export_annotated_depths(root: str | os.PathLike[str], split_file: str | os.PathLike[str],
                            output: str | os.PathLike[str],
                            annotated_dir: str | os.PathLike[str] | None = None,
                            progress: bool = True) -> Path:
    """Read the annotated map of every line of `split_file` (the camera of its side) and save
    all, in split order, to `output`; every map is located before the first is read."""
    split_file = Path(split_file)
    folder = None if annotated_dir is None else Path(annotated_dir)
    paths = locate_annotated(Path(root), folder, read_split(split_file), split_file)
    files = track(paths, description="annotated ground truth") if progress else paths
    return save_gt_depths(output, [read_annotated_depth(path) for path in files])
