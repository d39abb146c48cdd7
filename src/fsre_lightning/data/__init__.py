"""Data: the KITTI-layout DataModule, the synthetic scene generator, velodyne ground truth."""

from fsre_lightning.data.augment import FrameConsistentColorJitter
from fsre_lightning.data.kitti import (
    DataError,
    KittiDataModule,
    KittiDataset,
    SplitEntry,
    load_gt_depths,
    read_split,
    save_gt_depths,
    velodyne_depth,
)
from fsre_lightning.data.synthetic import generate_synthetic_kitti, render_drive
from fsre_lightning.data.velodyne import read_calib_file

__all__ = [
    "DataError",
    "FrameConsistentColorJitter",
    "KittiDataModule",
    "KittiDataset",
    "SplitEntry",
    "generate_synthetic_kitti",
    "load_gt_depths",
    "read_calib_file",
    "read_split",
    "render_drive",
    "save_gt_depths",
    "velodyne_depth",
]
