"""The KITTI raw layout on disk: split files, where each file of a line lies, ground-truth archives.

    ROOT/<date>/calib_cam_to_cam.txt, calib_velo_to_cam.txt
    ROOT/<date>/<drive>_sync/image_0{2,3}/data/<10-digit frame>.{png,jpg}   left, right camera
    ROOT/<date>/<drive>_sync/velodyne_points/data/<10-digit frame>.bin
    ROOT/<date>/<drive>_sync/proj_depth/groundtruth/image_0{2,3}/<10-digit frame>.png
    ANNOTATED_DIR/{train,val}/<drive>_sync/proj_depth/groundtruth/image_0{2,3}/<frame>.png
                                    KITTI's improved ground truth (uint16, metres x 256)
    LABEL_DIR/<date>/<drive>_sync/image_0{2,3}/<10-digit frame>.png          pseudo-labels
    SPLIT_DIR/<split>_files.txt     lines "<date>/<drive>_sync <frame> <l|r>"
    SPLIT_DIR/gt_depths.npz         ground truth of the test lines (gt_depths_val.npz: val)

The built-in synthetic scenes and `data=video_folder` write the same layout, so one data module
reads all three (docs/design.md section 4.2). numpy and pathlib only: the scene
generator's worker processes import this and nothing heavier.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsre_lightning.config.checks import is_number, require
from fsre_lightning.errors import DataError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")  # KITTI is PNG; many users convert it to JPEG
SIDE_TO_CAMERA = {"l": 2, "r": 3}  # split-file side -> KITTI camera (2 = left colour)
CALIB_FILES = ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt")
# Ground-truth archive of each evaluated subset, beside its split file.
GT_FILE_NAMES = {"test": "gt_depths.npz", "val": "gt_depths_val.npz"}
# Where export_gt takes the maps from: projected velodyne scans, or KITTI's annotated depth maps
# (the "improved ground truth" of the depth benchmark); auto: annotated for a split folder named
# ANNOTATED_SPLIT (Monodepth2's 652-line eigen_benchmark), velodyne otherwise.
GT_SOURCES = ("auto", "velodyne", "annotated")
ANNOTATED_SPLIT = "eigen_benchmark"
# data_depth_annotated's two folders; a drive lies in one of them.
ANNOTATED_SUBSETS = ("train", "val")
# KITTI's normalised intrinsics (fx, fy, cx, cy), shared by every frame of the raw set.
KITTI_INTRINSICS = (0.58, 1.92, 0.5, 0.5)

LABEL_FORMATS = ("train_ids", "label_ids")  # what label PNGs store (label_ids: the release's)
LABEL_SOURCES = ("files", "predicted")  # label PNGs, or `pseudolabel predict`'s cache
ON_ERROR = ("raise", "skip")  # a file that cannot be read when it is used


def gt_source(source: str, split_dir: str | os.PathLike[str],
              annotated_dir: str | os.PathLike[str] | None = None) -> str:
    """`velodyne` or `annotated`: `source` itself, or for `auto` what the split folder's name
    picks (annotated for eigen_benchmark). An `annotated_dir` that the source would not read
    is a ConfigError: a mistake, not a default."""
    picked = source
    if source == "auto":
        picked = "annotated" if Path(split_dir).name == ANNOTATED_SPLIT else "velodyne"
    require(annotated_dir is None or picked == "annotated", "annotated_dir", annotated_dir,
            f"read only when the source is annotated; source={source} picks {picked} for split "
            f"folder {Path(split_dir).name!r}: set source=annotated, or leave annotated_dir null")
    return picked


def check_intrinsics(key: str, value: Any) -> None:
    """Four positive numbers fx, fy, cx, cy."""
    require(isinstance(value, list | tuple) and len(value) == 4
            and all(is_number(v) and v > 0 for v in value), key, value,
            "four positive numbers: fx, fy, cx, cy, normalised by the image width and height "
            "(or pixels with data=video_folder's data.intrinsics_units=pixels)")


def camera_folder(camera: int) -> str:
    return f"image_0{camera}"


def frame_name(frame: int) -> str:
    return f"{frame:010d}"


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file."""

    folder: str
    frame: int
    side: str

    @property
    def camera(self) -> str:
        """The camera folder of the line's side, e.g. image_02."""
        return camera_folder(SIDE_TO_CAMERA[self.side])

    @property
    def date(self) -> str:
        return self.folder.split("/")[0]

    def __str__(self) -> str:
        return f"{self.folder} {self.frame} {self.side}"


def read_split(path: str | os.PathLike[str]) -> list[SplitEntry]:
    """Parse a Monodepth2 split file; a missing side means the left camera."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"split file {path} not found: set data.split_dir to a folder with "
            f"<split>_files.txt (e.g. Monodepth2's splits/eigen_zhou)"
        )
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        side = parts[2] if len(parts) > 2 else "l"
        if len(parts) > 3 or side not in SIDE_TO_CAMERA or (len(parts) > 1 and not
                                                              parts[1].isdigit()):
            raise DataError(f"{path}:{number}: expected '<folder> <frame> <l|r>', got {line!r}")
        frame = int(parts[1]) if len(parts) > 1 else 0
        entries.append(SplitEntry(parts[0], frame, side))
    if not entries:
        raise DataError(f"split file {path} is empty")
    return entries


def write_split(path: Path, entries: Iterable[SplitEntry | str]) -> Path:
    """A split file, one line per entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{e}\n" for e in entries))
    return path


def save_gt_depths(path: str | os.PathLike[str], depths: Sequence[np.ndarray]) -> Path:
    """Ground-truth maps of one split in split order, in one compressed, pickle-free archive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"depth_{i:05d}": np.asarray(d, dtype=np.float32) for i, d in enumerate(depths)}
    np.savez_compressed(path, **arrays)
    return path


def load_gt_depths(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read `save_gt_depths`' archive (allow_pickle=False); checks the keys are complete.
    Monodepth2's archive (one `data` array) is read too when it holds no pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ground-truth file {path} not found")
    with np.load(path, allow_pickle=False) as archive:
        keys = sorted(archive.files)
        if keys == ["data"]:
            return _monodepth2_gt_depths(path, archive)
        expected = [f"depth_{i:05d}" for i in range(len(keys))]
        if keys != expected:
            raise DataError(f"{path}: keys must be depth_00000..depth_{len(keys) - 1:05d}; "
                            f"found {keys[:3]}...: re-export the ground truth")
        return [archive[k] for k in keys]


def _monodepth2_gt_depths(path: Path, archive: Any) -> list[np.ndarray]:
    """Monodepth2's archive: one array `data` of the maps. Read when it is a plain N x H x W
    array; its object-array form can only be unpickled, which this package never does."""
    try:
        data = archive["data"]
    except ValueError as err:  # an object array: allow_pickle would be needed
        raise DataError(
            f"{path} is Monodepth2's gt_depths.npz with maps of different sizes, stored as "
            "pickled objects, which are not loaded (unpickling runs code from the file). "
            "Re-export it with `python -m fsre_lightning.export_gt data.root=<kitti raw> "
            "split_dir=<this folder>`: it projects the scans exactly as Monodepth2 does") from err
    if data.ndim != 3:
        raise DataError(f"{path}: Monodepth2's 'data' array must be N x H x W, found "
                        f"shape {data.shape}: re-export the ground truth")
    return [np.asarray(m, dtype=np.float32) for m in data]


# ------------------------------------------------------------------------------ file paths
def image_file(root: Path, folder: str, camera: str, frame: int, ext: str = "png") -> Path:
    """ROOT/<folder>/<camera>/data/<frame>.<ext>."""
    return root / folder / camera / "data" / f"{frame_name(frame)}.{ext}"


def label_file(label_root: Path, folder: str, camera: str, frame: int) -> Path:
    """LABEL_DIR/<folder>/<camera>/<frame>.png (the published release's layout)."""
    return label_root / folder / camera / f"{frame_name(frame)}.png"


def label_path(label_root: Path, entry: SplitEntry) -> Path:
    """Where the pseudo-label of a line's frame 0 lies."""
    return label_file(label_root, entry.folder, entry.camera, entry.frame)


def _resolve_image(root: Path, entry: SplitEntry, frame: int, ext: str) -> tuple[Path, bool]:
    candidates = IMAGE_EXTENSIONS if ext == "auto" else (ext,)
    for candidate in candidates:
        path = image_file(root, entry.folder, entry.camera, frame, candidate)
        if path.exists():
            return path, True
    return image_file(root, entry.folder, entry.camera, frame, candidates[0]), False


def find_image(root: Path, entry: SplitEntry, frame: int, img_ext: str) -> Path | None:
    """The file of `frame` on the line's drive and camera (png/jpg per img_ext), or None."""
    path, ok = _resolve_image(root, entry, frame, img_ext)
    return path if ok else None


def missing_error(kind: str, missing: Sequence[Path | str], hint: str) -> DataError:
    """A DataError saying how many `kind` are missing and listing the first five."""
    listed = "\n  ".join(str(p) for p in missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    return DataError(f"{len(missing)} {kind} missing, e.g.:\n  {listed}{more}\n{hint}")


def resolve_images(root: Path, entries: Sequence[SplitEntry], frame_ids: Sequence[int],
                   img_ext: str, split_name: str) -> list[list[Path]]:
    """The files of frames `frame_ids` of every line; DataError listing those that are missing."""
    image_paths, missing = [], []
    for entry in entries:
        row = []
        for offset in frame_ids:
            path, ok = _resolve_image(root, entry, entry.frame + offset, img_ext)
            row.append(path)
            if not ok:
                missing.append(path)
        image_paths.append(row)
    if missing:
        raise missing_error(
            "images", missing,
            f"Check data.root ({root}) and data.img_ext ({img_ext}); frames "
            f"{list(frame_ids)} of every line of the {split_name} split must exist.")
    return image_paths


# ------------------------------------------------------------- annotated ground truth
def annotated_file(base: Path, drive: str, camera: str, frame: int) -> Path:
    """BASE/<drive>/proj_depth/groundtruth/<camera>/<frame>.png: the depth benchmark's layout
    below each of its subset folders (drive = <drive>_sync), and Monodepth2's inside the raw tree
    (BASE = ROOT, drive = <date>/<drive>_sync)."""
    return base / drive / "proj_depth" / "groundtruth" / camera / f"{frame_name(frame)}.png"


def annotated_candidates(root: Path, annotated_dir: Path | None, entry: SplitEntry
                         ) -> list[Path]:
    """Where the annotated map of a line may lie, in search order: inside the raw tree
    (annotated_dir None), else under each of annotated_dir's train/ and val/."""
    if annotated_dir is None:
        return [annotated_file(root, entry.folder, entry.camera, entry.frame)]
    drive = entry.folder.split("/")[-1]  # <date>_drive_<NNNN>_sync, without the date folder
    return [annotated_file(annotated_dir / subset, drive, entry.camera, entry.frame)
            for subset in ANNOTATED_SUBSETS]


# ----------------------------------------------------------------- velodyne ground truth
def scan_files(root: Path, entry: SplitEntry) -> tuple[Path, Path]:
    """(calibration folder, velodyne scan) of one split line."""
    scan = root / entry.folder / "velodyne_points" / "data" / f"{frame_name(entry.frame)}.bin"
    return root / entry.date, scan


def check_scans(root: Path, entries: Sequence[SplitEntry]) -> None:
    """Raise one DataError listing what is missing, before any scan is projected."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist: point it at the KITTI raw "
                        "folder (the one holding 2011_09_26/ ...)")
    dates = sorted({e.date for e in entries})
    absent = [d for d in dates if not (root / d).is_dir()]
    if absent:
        raise DataError(f"data.root={str(root)!r} has no folder {absent[0]}/ (of {len(absent)} "
                        f"dates the split needs: {', '.join(absent[:5])}): point data.root at "
                        "the KITTI raw folder holding the date folders with their calibration")
    needed: dict[Path, None] = {}  # ordered and unique: each date's calibration once
    for entry in entries:
        calib_dir, scan = scan_files(root, entry)
        needed.update(dict.fromkeys([*(calib_dir / name for name in CALIB_FILES), scan]))
    missing = [path for path in needed if not path.is_file()]
    if missing:
        raise missing_error("velodyne/calibration files", missing,
                            f"The ground truth needs velodyne_points/ of every drive in the "
                            f"split and the calibration files of every date under {root}.")
