"""Data: the KITTI-layout DataModule, its files, caches and datasets, the synthetic scenes.

Modules, from the bottom up: `kitti_layout` (where KITTI files lie; numpy and pathlib only),
`decode` (files to arrays), `array_store` and `frame_cache` (decoded-once memory-mapped
splits), `dataset` (one split's samples), `augment`, `resumable` (exact mid-epoch resume),
`kitti` (the DataModule), `textures` and `scenes` (the procedural scenes), `synthetic` (them in
the KITTI layout), `velodyne` and `annotated` (ground truth: projected scans, KITTI's annotated
maps), `video_folder` (your own footage) and `label_caches` (pseudo-labels imported or
predicted).

The names below are imported on first use, so that `fsre_lightning.data.kitti_layout` (which the
scene generator's worker processes import) stays as light as it is.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KittiDataModule": "kitti",
    "KittiDataConfig": "kitti",
    "KittiDataset": "dataset",
    "VideoFolderDataModule": "video_folder",
    "generate_synthetic_kitti": "synthetic",
    "SplitEntry": "kitti_layout",
    "read_split": "kitti_layout",
    "load_gt_depths": "kitti_layout",
    "save_gt_depths": "kitti_layout",
    "velodyne_depth": "velodyne",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
