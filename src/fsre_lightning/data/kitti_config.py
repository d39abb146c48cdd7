"""The `data` group of the KITTI-layout data module (`KittiDataConfig`, data=kitti and
data=synthetic) and its rules, importable without torch: the config checks run before a
command imports its work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fsre_lightning.config.checks import (
    arguments,
    check_choice,
    check_int,
    check_number,
    check_path,
    require,
)
from fsre_lightning.data.kitti_layout import (
    IMAGE_EXTENSIONS,
    KITTI_INTRINSICS,
    LABEL_FORMATS,
    LABEL_SOURCES,
    ON_ERROR,
    check_intrinsics,
)
from fsre_lightning.data.kitti_sources import KittiPrepareConfig
from fsre_lightning.data.synthetic import SyntheticConfig
from fsre_lightning.models.network_config import check_image_size
from fsre_lightning.scoring.conventions import EVAL_CROPS


def check_frame_ids(key: str, value: Any) -> None:
    """Frame 0 (the target) first, then distinct integer source offsets, e.g. [0, -1, 1]."""
    ids = list(value) if isinstance(value, list | tuple) else None
    require(ids is not None and len(ids) >= 2 and all(isinstance(i, int) for i in ids)
            and ids[0] == 0 and 0 not in ids[1:] and len(set(ids)) == len(ids), key, value,
            "frame 0 first, then distinct integer source frames, e.g. [0, -1, 1]")


@dataclass(kw_only=True)
class KittiDataConfig:
    """The `data` group (data=kitti, data=synthetic): KittiDataModule's arguments and rules."""

    _target_: str = "fsre_lightning.data.KittiDataModule"
    root: str
    split_dir: str
    height: int = 192
    width: int = 640
    frame_ids: list[int] = field(default_factory=lambda: [0, -1, 1])
    batch_size: int = 12
    num_workers: int = 4
    img_ext: str = "auto"
    label_dir: str | None = None
    use_labels: bool = True
    label_format: str = "train_ids"
    flip_prob: float = 0.5
    jitter_prob: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    intrinsics: list[float] = field(default_factory=lambda: list(KITTI_INTRINSICS))
    val_gt_file: str | None = None
    test_gt_file: str | None = None
    eval_crop: str = "garg"
    min_depth_eval: float = 1e-3
    max_depth_eval: float = 80.0
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Generate the built-in scenes into root first (None: the files are already there).
    synthetic: SyntheticConfig | None = None
    pin_memory: bool = True
    frame_cache: bool = False
    cache_dir: str | None = None
    cache_workers: int = 0
    label_source: str = "files"
    allow_missing_labels: bool = False
    on_error: str = "skip"
    eval_on_error: str = "raise"
    # prepare_data makes what the splits need present under root first (fetched from KITTI,
    # as `python -m fsre_lightning.prepare_kitti` does; how: `prepare`).
    download: bool = False
    prepare: KittiPrepareConfig = field(default_factory=KittiPrepareConfig)

    # Paths that must be given (the others have defaults relative to them).
    _REQUIRED_PATHS: ClassVar[tuple[str, ...]] = ("root", "split_dir")

    def __post_init__(self) -> None:
        for key in ("root", "split_dir", "label_dir", "val_gt_file", "test_gt_file",
                    "cache_dir"):
            check_path(key, getattr(self, key), nullable=key not in self._REQUIRED_PATHS)
        check_image_size("height", self.height)
        check_image_size("width", self.width)
        check_frame_ids("frame_ids", self.frame_ids)
        check_int("batch_size", self.batch_size, lo=1)
        check_int("num_workers", self.num_workers, lo=0)
        check_int("cache_workers", self.cache_workers, lo=0,
                  what="an integer >= 0 (0 = all CPU cores)")
        check_choice("img_ext", self.img_ext, ("auto", *IMAGE_EXTENSIONS))
        check_choice("label_format", self.label_format, LABEL_FORMATS)
        check_choice("label_source", self.label_source, LABEL_SOURCES)
        check_choice("eval_crop", self.eval_crop, EVAL_CROPS)
        check_choice("on_error", self.on_error, ON_ERROR)
        check_choice("eval_on_error", self.eval_on_error, ON_ERROR)
        for key in ("flip_prob", "jitter_prob"):
            check_number(key, getattr(self, key), lo=0, hi=1)
        for key in ("brightness", "contrast", "saturation"):
            check_number(key, getattr(self, key), lo=0)
        check_number("hue", self.hue, lo=0, hi=0.5)
        check_intrinsics("intrinsics", self.intrinsics)
        check_number("min_depth_eval", self.min_depth_eval, lo=0, strict=True)
        check_number("max_depth_eval", self.max_depth_eval, lo=self.min_depth_eval, strict=True,
                     what=f"a number > min_depth_eval (= {self.min_depth_eval})")
        for key in ("train_split", "val_split", "test_split"):
            require(isinstance(getattr(self, key), str) and bool(getattr(self, key)), key,
                    getattr(self, key), "the name of a split file <name>_files.txt")
        self._check_download()

    def _check_download(self) -> None:
        """What data.download and data.prepare may be combined with."""
        require(not self.download or (self._target_ == KittiDataConfig._target_
                                       and self.synthetic is None), "download", self.download,
                "only with data=kitti (KITTI raw is downloaded; data=synthetic generates its "
                "scenes, data=video_folder reads your frames)")
        wanted = {"predict": "predicted", "import": "files"}.get(self.prepare.pseudo_labels)
        require(wanted is None or (self.label_source == wanted and self.use_labels),
                "prepare.pseudo_labels", self.prepare.pseudo_labels,
                f"with data.label_source={wanted} and data.use_labels=true, which read what it "
                f"makes (now label_source={self.label_source}, use_labels={self.use_labels})")


def data_config(schema: type, **values: Any) -> Any:
    """`schema(**values)` with paths as strings, sequences as lists and the nested synthetic
    node as its dataclass: what a data module keeps as `config`."""
    values = arguments(values)
    values.update({k: str(v) for k, v in values.items() if isinstance(v, os.PathLike)})
    synthetic = values.get("synthetic")
    if isinstance(synthetic, Mapping):
        values["synthetic"] = SyntheticConfig(**synthetic)
    if isinstance(values.get("prepare"), Mapping):
        values["prepare"] = KittiPrepareConfig(**arguments(values["prepare"]))
    return schema(**values)
