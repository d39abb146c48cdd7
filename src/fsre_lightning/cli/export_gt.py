"""Export a split's velodyne ground truth: `python -m fsre_lightning.export_gt [overrides]`.

    python -m fsre_lightning.export_gt data.root=/data/kitti_raw split=eigen

reads `<split_dir>/test_files.txt` (split_dir defaults to <data_dir>/splits/<split>), projects
the velodyne scan of every line (`fsre_lightning.data.velodyne`, the camera of the line's
side) and writes all maps, in split order, to one compressed file
(default `<split_dir>/gt_depths.npz`, where KittiDataModule and `evaluate` look for it).
`subset=val` does the same for val_files.txt -> gt_depths_val.npz (validation with depth
metrics). Every scan and calibration file is checked before the first is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.data.layout import GT_FILE_NAMES
from fsre_lightning.data.velodyne import export_gt_depths
from fsre_lightning.errors import DataError
from fsre_lightning.preflight import check_before_hydra
from fsre_lightning.runtime import CONFIG_DIR, call_hydra, run_or_exit


def run(cfg: DictConfig) -> Path:
    """Export as the config says; returns the written file."""
    validate_config(cfg, "export_gt")
    subset = cfg.subset
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
def _hydra_main(cfg: DictConfig) -> None:
    run_or_exit("export_gt", run, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fsre_lightning.export_gt [overrides]`; returns the exit status."""
    return call_hydra(_hydra_main, argv, partial(check_before_hydra, "export_gt"))
