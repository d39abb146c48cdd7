"""The `data` group with data=video_folder (`VideoFolderDataConfig`) and its rules,
importable without torch: the config checks run before a command imports its work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import fsre_lightning.config.checks as checks
from fsre_lightning.data.kitti_config import KittiDataConfig

INTRINSICS_UNITS = ("normalized", "pixels")


@dataclass(kw_only=True)
class VideoFolderDataConfig(KittiDataConfig):
    """The `data` group with data=video_folder: KittiDataConfig plus the layout adapter's keys
    (`root` is the folder of sequences; the work dir holds splits, caches and labels)."""

    _REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("root",)
    _target_: str = "fsre_lightning.data.video_folder.VideoFolderDataModule"
    root: str | None = None
    work_dir: str = "data_cache/video_folder"
    intrinsics: list[float] | None = None  # type: ignore[assignment]
    intrinsics_units: str = "normalized"
    val_fraction: float = 0.1
    split_seed: int = 0
    split_dir: str | None = None  # type: ignore[assignment]
    label_source: str = "predicted"
    eval_crop: str = "none"
    pseudo_label_model: str | None = None
    pseudo_label_device: str = "auto"
    pseudo_label_batch_size: int = 8

    def __post_init__(self) -> None:
        checks.require(self.root is not None, "root", self.root,
                      "required with data=video_folder: the folder with one subfolder of "
                      "frames per sequence")
        checks.require(self.intrinsics is not None, "intrinsics", self.intrinsics,
                      "required with data=video_folder: your camera's [fx, fy, cx, cy], "
                      "normalised or in pixels (data.intrinsics_units=pixels)")
        super().__post_init__()
        checks.check_path("work_dir", self.work_dir)
        checks.check_choice("intrinsics_units", self.intrinsics_units, INTRINSICS_UNITS)
        checks.check_number("val_fraction", self.val_fraction, lo=0, strict=True,
                           what="a number in (0, 1): some frames must train")
        checks.require(self.val_fraction < 1, "val_fraction", self.val_fraction,
                      "a number in (0, 1): some frames must train")
        checks.check_int("split_seed", self.split_seed)
        checks.check_path("pseudo_label_model", self.pseudo_label_model, nullable=True)
        checks.check_int("pseudo_label_batch_size", self.pseudo_label_batch_size, lo=1)
