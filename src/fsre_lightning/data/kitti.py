"""KITTI raw (and the synthetic scenes, which share its layout) as a LightningDataModule.

Batch layout (what FSREModule reads):

- ``frames``: float B x F x 3 x H x W in [0, 1], frames in ``frame_ids`` order (frame 0 first),
  never colour-jittered: these are the images of the photometric loss.
- ``frames_aug``: the same with colour jitter while training (added on the device in
  ``on_after_batch_transfer``); equal to ``frames`` otherwise.
- ``K``, ``inv_K``: float B x 4 x 4 pixel intrinsics at (height, width), after any flip.
- ``labels``: long B x H x W pseudo-label train ids of frame 0 (255 void), when ``use_labels``.
- ``depth_gt``: float B x 1 x Hg x Wg metric ground truth (0 = none), zero-padded to the
  largest in the batch, and ``gt_size``: long B x 2 true sizes; val/test with a GT file only.
- ``index``: long B, the line of the split file; ``name``: list of "<folder> <frame> <side>".

Files: ROOT/<date>/<drive>_sync/image_0{2,3}/data/<10-digit frame>.{png,jpg}; pseudo-labels at
LABEL_DIR/<date>/<drive>_sync/image_0X/<frame>.png; split files SPLIT_DIR/<name>_files.txt with
lines "<date>/<drive>_sync <frame> <l|r>"; ground truth SPLIT_DIR/gt_depths[_val].npz (keys
depth_00000, ... in split order, written by `save_gt_depths`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fsre_lightning.data.augment import FrameConsistentColorJitter
from fsre_lightning.geometry import KITTI_INTRINSICS, intrinsics_matrix

log = logging.getLogger(__name__)

VOID = 255
NUM_CLASSES = 19
SIDE_TO_CAMERA = {"l": "image_02", "r": "image_03"}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")

# Cityscapes label id -> train id (SPEC section 5); every other id is void.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                         23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = np.full(256, VOID, dtype=np.uint8)
for _label_id, _train_id in _CITYSCAPES_TRAIN_IDS.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id


class DataError(Exception):
    """The data on disk does not match the config: missing files, empty or malformed splits."""


@dataclass(frozen=True)
class SplitEntry:
    folder: str
    frame: int
    side: str

    @property
    def camera(self) -> str:
        return SIDE_TO_CAMERA[self.side]

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


def save_gt_depths(path: str | os.PathLike[str], depths: Sequence[np.ndarray]) -> Path:
    """Ground-truth maps of one split in split order, in one compressed, pickle-free archive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"depth_{i:05d}": np.asarray(d, dtype=np.float32) for i, d in enumerate(depths)}
    np.savez_compressed(path, **arrays)
    return path


def load_gt_depths(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """Read `save_gt_depths`' archive (allow_pickle=False); checks the keys are complete."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ground-truth file {path} not found")
    with np.load(path, allow_pickle=False) as archive:
        keys = sorted(archive.files)
        expected = [f"depth_{i:05d}" for i in range(len(keys))]
        if keys != expected:
            raise DataError(f"{path}: keys must be depth_00000..depth_{len(keys) - 1:05d}; "
                            f"found {keys[:3]}...: re-export the ground truth")
        return [archive[k] for k in keys]


def _frame_name(frame: int) -> str:
    return f"{frame:010d}"


def _resolve_image(root: Path, entry: SplitEntry, frame: int, ext: str) -> tuple[Path, bool]:
    base = root / entry.folder / entry.camera / "data" / _frame_name(frame)
    candidates = IMAGE_EXTENSIONS if ext == "auto" else (ext,)
    for candidate in candidates:
        path = base.with_suffix(f".{candidate}")
        if path.exists():
            return path, True
    return base.with_suffix(f".{candidates[0]}"), False


def _missing_error(kind: str, missing: list[Path], hint: str) -> DataError:
    listed = "\n  ".join(str(p) for p in missing[:5])
    more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
    return DataError(f"{len(missing)} {kind} missing, e.g.:\n  {listed}{more}\n{hint}")


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image resized with Lanczos (antialiased, as Monodepth2) to 3 x H x W in [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.LANCZOS)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_label(path: Path, size: tuple[int, int], label_format: str) -> torch.Tensor:
    """Pseudo-label PNG -> H x W long train ids, resized with nearest neighbour."""
    with Image.open(path) as img:
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.NEAREST)
        arr = np.asarray(img)
    if arr.ndim != 2:
        raise DataError(f"label {path} has shape {arr.shape}; expected a single-channel PNG")
    arr = arr.astype(np.uint8)
    if label_format == "label_ids":
        arr = LABEL_ID_TO_TRAIN_ID[arr]
    return torch.from_numpy(arr.astype(np.int64))


class KittiDataset(Dataset):
    """Frames (and label, ground truth) of one split, with paths resolved up front."""

    def __init__(
        self,
        entries: list[SplitEntry],
        image_paths: list[list[Path]],
        label_paths: list[Path] | None,
        gt: list[np.ndarray] | None,
        height: int,
        width: int,
        label_format: str = "train_ids",
        flip_prob: float = 0.0,
        intrinsics: Sequence[float] = KITTI_INTRINSICS,
    ) -> None:
        self.entries, self.image_paths, self.label_paths, self.gt = (
            entries, image_paths, label_paths, gt)
        self.size = (height, width)
        self.label_format = label_format
        self.flip_prob = flip_prob
        self.intrinsics = tuple(intrinsics)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        frames = torch.stack([load_image(p, self.size) for p in self.image_paths[index]])
        flip = self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob
        K = intrinsics_matrix(*self.size, normalized=self.intrinsics, flip=flip)
        item: dict[str, Any] = {
            "K": K, "inv_K": torch.linalg.inv(K), "index": index,
            "name": str(self.entries[index]),
        }
        if self.label_paths is not None:
            labels = load_label(self.label_paths[index], self.size, self.label_format)
            item["labels"] = labels.flip(-1) if flip else labels
        item["frames"] = frames.flip(-1) if flip else frames
        if self.gt is not None:
            item["depth_gt"] = torch.from_numpy(np.asarray(self.gt[index], np.float32))[None]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; ground-truth maps of different sizes are zero-padded bottom/right."""
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "name":
            batch[key] = values
        elif key == "index":
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif key == "depth_gt":
            h = max(v.shape[-2] for v in values)
            w = max(v.shape[-1] for v in values)
            padded = torch.zeros(len(values), 1, h, w)
            for i, v in enumerate(values):
                padded[i, :, : v.shape[-2], : v.shape[-1]] = v
            batch[key] = padded
            batch["gt_size"] = torch.tensor([v.shape[-2:] for v in values], dtype=torch.long)
        else:
            batch[key] = torch.stack(values)
    return batch


class KittiDataModule(pl.LightningDataModule):
    """KITTI raw or the built-in synthetic scenes (same layout), validated before training.

    `synthetic` (a dict of `generate_synthetic_kitti` arguments) makes `prepare_data` generate
    the scenes into `root` on first use.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split_dir: str | os.PathLike[str],
        height: int = 192,
        width: int = 640,
        frame_ids: Sequence[int] = (0, -1, 1),
        batch_size: int = 12,
        num_workers: int = 4,
        img_ext: str = "auto",
        label_dir: str | os.PathLike[str] | None = None,
        use_labels: bool = True,
        label_format: str = "train_ids",
        flip_prob: float = 0.5,
        jitter_prob: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.1,
        intrinsics: Sequence[float] = KITTI_INTRINSICS,
        val_gt_file: str | os.PathLike[str] | None = None,
        test_gt_file: str | os.PathLike[str] | None = None,
        eval_crop: str = "garg",
        min_depth_eval: float = 1e-3,
        max_depth_eval: float = 80.0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        synthetic: dict[str, Any] | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        for key, value in (("data.height", height), ("data.width", width)):
            if value <= 0 or value % 32:
                raise ValueError(f"{key}={value}: must be a positive multiple of 32")
        if img_ext not in ("auto", *IMAGE_EXTENSIONS):
            raise ValueError(f"data.img_ext={img_ext!r}: use auto, png or jpg")
        if label_format not in ("train_ids", "label_ids"):
            raise ValueError(f"data.label_format={label_format!r}: use train_ids or label_ids")
        if eval_crop not in ("garg", "none"):
            raise ValueError(f"data.eval_crop={eval_crop!r}: use garg or none")
        if list(frame_ids)[:1] != [0]:
            raise ValueError(f"data.frame_ids={list(frame_ids)}: frame 0 must come first")
        self.root = Path(root)
        self.split_dir = Path(split_dir)
        self.label_dir = Path(label_dir) if label_dir else self.root / "segmentation"
        self.height, self.width = height, width
        self.frame_ids = [int(f) for f in frame_ids]
        self.batch_size, self.num_workers = batch_size, num_workers
        self.img_ext, self.use_labels, self.label_format = img_ext, use_labels, label_format
        self.flip_prob = flip_prob
        self.intrinsics = tuple(intrinsics)
        self.jitter = FrameConsistentColorJitter(brightness, contrast, saturation, hue,
                                                 p=jitter_prob)
        self.gt_files = {"val": val_gt_file, "test": test_gt_file}
        self.eval_crop = eval_crop
        self.min_depth_eval, self.max_depth_eval = min_depth_eval, max_depth_eval
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.synthetic = dict(synthetic) if synthetic else None
        self.pin_memory = pin_memory
        self.num_classes = NUM_CLASSES
        self.datasets: dict[str, KittiDataset] = {}

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from fsre_lightning.data.synthetic import generate_synthetic_kitti

            generate_synthetic_kitti(self.root, **self.synthetic)

    def _gt_file(self, stage: str) -> Path | None:
        given = self.gt_files.get(stage)
        if given:
            return Path(given)
        default = self.split_dir / ("gt_depths_val.npz" if stage == "val" else "gt_depths.npz")
        return default if default.is_file() else None

    @property
    def has_val_gt(self) -> bool:
        return self._gt_file("val") is not None

    def build_dataset(self, stage: str) -> KittiDataset:
        """Resolve and check every file the stage will read; raise DataError listing misses."""
        if not self.root.is_dir():
            raise DataError(f"data.root={str(self.root)!r} does not exist: point it at the "
                            f"KITTI raw folder (the one holding 2011_09_26/ ...)")
        if not self.split_dir.is_dir():
            raise DataError(f"data.split_dir={str(self.split_dir)!r} does not exist: it must "
                            f"hold {self.splits[stage]}_files.txt")
        entries = read_split(self.split_dir / f"{self.splits[stage]}_files.txt")
        frame_ids = self.frame_ids if stage in ("train", "val") else [0]
        image_paths, missing = [], []
        for entry in entries:
            row = []
            for offset in frame_ids:
                path, ok = _resolve_image(self.root, entry, entry.frame + offset, self.img_ext)
                row.append(path)
                if not ok:
                    missing.append(path)
            image_paths.append(row)
        if missing:
            raise _missing_error(
                "images", missing,
                f"Check data.root ({self.root}) and data.img_ext ({self.img_ext}); frames "
                f"{frame_ids} of every line of the {self.splits[stage]} split must exist.")
        label_paths = None
        if self.use_labels and stage in ("train", "val"):
            label_paths = [self.label_dir / e.folder / e.camera / f"{_frame_name(e.frame)}.png"
                           for e in entries]
            missing = [p for p in label_paths if not p.exists()]
            if missing:
                raise _missing_error(
                    "pseudo-labels", missing,
                    f"Put label PNGs under data.label_dir ({self.label_dir}), or set "
                    f"data.use_labels=false for a model without semantic losses.")
        gt = None
        gt_file = self._gt_file(stage) if stage in ("val", "test") else None
        if gt_file is not None:
            gt = load_gt_depths(gt_file)
            if len(gt) != len(entries):
                raise DataError(f"{gt_file} has {len(gt)} maps but the {self.splits[stage]} "
                                f"split has {len(entries)} lines: re-export the ground truth")
        return KittiDataset(entries, image_paths, label_paths, gt, self.height, self.width,
                            self.label_format, self.flip_prob if stage == "train" else 0.0,
                            self.intrinsics)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"],
                  "predict": ["test"], None: ["train", "val"]}[stage]
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self.build_dataset(split)
                log.info("%s split: %d samples", split, len(self.datasets[split]))

    # ------------------------------------------------------------ dataloaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int
                                ) -> dict[str, Any]:
        training = self.trainer is not None and self.trainer.training
        batch["frames_aug"] = self.jitter(batch["frames"]) if training else batch["frames"]
        return batch
