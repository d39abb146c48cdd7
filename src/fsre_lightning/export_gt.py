"""Export a split's velodyne ground truth: `python -m fsre_lightning.export_gt [overrides]`.

    python -m fsre_lightning.export_gt data.root=/data/kitti_raw split=eigen

reads `<split_dir>/test_files.txt` (split_dir defaults to <data_dir>/splits/<split>), projects
the velodyne scan of every line as SPEC section 5 says (`data.kitti.velodyne_depth`, the
camera of the line's side) and writes all maps, in split order, to one compressed file
(default `<split_dir>/gt_depths.npz`, where KittiDataModule and `evaluate` look for it).
`subset=val` does the same for val_files.txt -> gt_depths_val.npz (validation with depth
metrics). Every scan and calibration file is checked before the first is read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.progress import track

from fsre_lightning.config import ConfigError, validate_config
from fsre_lightning.data.kitti import (
    DataError,
    SplitEntry,
    read_split,
    save_gt_depths,
    velodyne_depth,
)
from fsre_lightning.train import CONFIG_DIR, run_or_exit

log = logging.getLogger(__name__)

CALIB_FILES = ("calib_cam_to_cam.txt", "calib_velo_to_cam.txt")
CAMERA_OF_SIDE = {"l": 2, "r": 3}
# The file KittiDataModule reads for each subset when data.{val,test}_gt_file is null.
GT_FILE_NAMES = {"test": "gt_depths.npz", "val": "gt_depths_val.npz"}


def scan_files(root: Path, entry: SplitEntry) -> tuple[Path, Path]:
    """(calibration folder, velodyne scan) of one split line in the KITTI raw layout."""
    date = entry.folder.split("/")[0]
    scan = root / entry.folder / "velodyne_points" / "data" / f"{entry.frame:010d}.bin"
    return root / date, scan


def check_scans(root: Path, entries: Sequence[SplitEntry]) -> None:
    """Raise one DataError listing what is missing, before any scan is projected."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist: point it at the KITTI raw "
                        "folder (the one holding 2011_09_26/ ...)")
    dates = sorted({e.folder.split("/")[0] for e in entries})
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
        listed = "\n  ".join(str(p) for p in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} velodyne/calibration files missing, e.g.:\n  {listed}"
                        f"{more}\nThe ground truth needs velodyne_points/ of every drive in "
                        f"the split and the calibration files of every date under {root}.")


def export_gt_depths(root: str | os.PathLike[str], split_file: str | os.PathLike[str],
                     output: str | os.PathLike[str], progress: bool = True) -> Path:
    """Project the scan of every line of `split_file` and save all maps to `output`."""
    root = Path(root)
    entries = read_split(split_file)
    check_scans(root, entries)
    lines = track(entries, description="velodyne ground truth") if progress else entries
    depths: list[np.ndarray] = []
    for entry in lines:
        calib_dir, scan = scan_files(root, entry)
        depths.append(velodyne_depth(calib_dir, scan, CAMERA_OF_SIDE[entry.side]))
    return save_gt_depths(output, depths)


def run(cfg: DictConfig) -> Path:
    """Export as the config says; returns the written file."""
    validate_config(cfg, "export_gt")
    subset = cfg.subset
    if subset not in GT_FILE_NAMES:
        raise ConfigError(f"subset={subset!r} is not allowed: test or val")
    split_dir = Path(cfg.split_dir)
    split_file = split_dir / f"{subset}_files.txt"
    if not split_file.is_file():
        raise DataError(f"split file {split_file} not found: split={cfg.split} picks "
                        f"{split_dir}; set split_dir= to the folder holding Monodepth2's "
                        f"{subset}_files.txt (e.g. its splits/eigen)")
    output = Path(cfg.output) if cfg.get("output") else split_dir / GT_FILE_NAMES[subset]
    path = export_gt_depths(cfg.data.root, split_file, output, progress=cfg.progress)
    print(f"wrote the ground truth of {split_file} to {path}")
    return path


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export_gt")
def main(cfg: DictConfig) -> None:
    run_or_exit("export_gt", run, cfg)


if __name__ == "__main__":
    main()
