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

Input pipeline: with ``frame_cache`` the train and val splits are decoded and resized once, into
memory-mapped uint8 caches in CACHE_DIR (`fsre_lightning.data.cache`): ``frames_<split>_<H>x<W>``
(every frame the split's lines need) and, for label_source=files, ``labels_files_<split>_<H>x<W>``
(train ids, 255 void). A sample is then three row reads plus a label row read, converted to float,
with no image decoding; the resize is the same function as the uncached path's (`decode_rgb`),
so both give identical batches. label_source=predicted reads ``labels_predicted_<split>_<H>x<W>``,
written by ``python -m fsre_lightning.pseudolabel predict``. The test split is never cached (it is
read once per evaluation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fsre_lightning.data.augment import FrameConsistentColorJitter
from fsre_lightning.data.cache import ArrayCache, CachedArray, CacheError, file_signature
from fsre_lightning.data.resumable import ResumableDataLoader
from fsre_lightning.geometry import KITTI_INTRINSICS, intrinsics_matrix

log = logging.getLogger(__name__)

VOID = 255
NUM_CLASSES = 19
SIDE_TO_CAMERA = {"l": "image_02", "r": "image_03"}
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
LABEL_FORMATS = ("train_ids", "label_ids")
LABEL_SOURCES = ("files", "predicted")
ON_ERROR = ("raise", "skip")

# Cityscapes label id -> train id (SPEC section 5); every other id is void.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                         23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_ID_TO_TRAIN_ID = np.full(256, VOID, dtype=np.uint8)
for _label_id, _train_id in _CITYSCAPES_TRAIN_IDS.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id


class DataError(Exception):
    """The data on disk does not match the config: missing files, empty or malformed splits."""


@dataclass(frozen=True)
class SkippedSample:
    """What a dataset yields for a sample whose files cannot be read (data.on_error=skip).

    `collate` drops it from the batch and lists it under ``batch["skipped"]``, so that the
    main process (not a loader worker) logs each bad file once and counts the samples.
    """

    index: int
    name: str
    reason: str


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


def label_path(label_root: Path, entry: SplitEntry) -> Path:
    """Where the pseudo-label of a line's frame 0 lies (the reference release's layout)."""
    return label_root / entry.folder / entry.camera / f"{_frame_name(entry.frame)}.png"


def decode_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """RGB image resized with Lanczos (antialiased, as Monodepth2): uint8 H x W x 3.

    The one resize of both pipelines: the frame cache stores exactly these bytes.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.LANCZOS)
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for damaged files
        raise DataError(f"cannot decode image {path}: {err}; re-extract or re-convert it") from err


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (... x) H x W x 3 -> float (... x) 3 x H x W in [0, 1]."""
    out = np.moveaxis(rgb, -1, -3).astype(np.float32, order="C")
    out /= np.float32(255.0)
    return torch.from_numpy(out)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image resized with Lanczos (antialiased, as Monodepth2) to 3 x H x W in [0, 1]."""
    return rgb_to_tensor(decode_rgb(path, size))


def _aspect_differs(a: tuple[int, int], b: tuple[int, int], tolerance: float = 0.02) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) > tolerance * (b[0] / b[1])


def decode_label(path: Path, size: tuple[int, int], label_format: str,
                 frame_path: Path | None = None) -> np.ndarray:
    """Pseudo-label PNG -> uint8 H x W train ids (255 void), resized with nearest neighbour.

    With `frame_path`, the label must be the frame's size or a scaled copy of it (same aspect
    ratio): a label of another image would otherwise be silently stretched onto the frame.
    """
    try:
        with Image.open(path) as img:
            if len(img.getbands()) != 1:
                raise DataError(f"label {path} has {len(img.getbands())} channels "
                                f"({img.mode}); expected a single-channel PNG of ids")
            if frame_path is not None:
                with Image.open(frame_path) as frame:
                    if _aspect_differs(img.size, frame.size):
                        raise DataError(
                            f"label {path} is {img.size[0]} x {img.size[1]} but its frame "
                            f"{frame_path} is {frame.size[0]} x {frame.size[1]}: the label "
                            f"belongs to another image or was cropped; regenerate it")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode label {path}: {err}; regenerate it") from err
    if arr.max(initial=0) > 255:
        raise DataError(f"label {path} has values up to {arr.max()}; expected 8-bit ids")
    arr = arr.astype(np.uint8)
    if label_format == "label_ids":
        return LABEL_ID_TO_TRAIN_ID[arr]
    bad = (arr >= NUM_CLASSES) & (arr != VOID)
    if bad.any():
        raise DataError(f"label {path} holds {int(arr[bad][0])}, not a train id (0..18, 255): "
                        f"if it stores Cityscapes label ids set data.label_format=label_ids")
    return arr


def load_label(path: Path | None, size: tuple[int, int], label_format: str,
               frame_path: Path | None = None) -> torch.Tensor:
    """Pseudo-label PNG -> H x W long train ids; no path (a missing label) -> all void."""
    if path is None:
        return torch.full(size, VOID, dtype=torch.long)
    return torch.from_numpy(decode_label(path, size, label_format, frame_path).astype(np.int64))


# --------------------------------------------------------------------------- caches
def cache_name(kind: str, split_name: str, height: int, width: int) -> str:
    """File stem of a cache: kind is frames, labels_files or labels_predicted."""
    return f"{kind}_{split_name}_{height}x{width}"


def frame_key(entry: SplitEntry, offset: int = 0) -> str:
    """Cache key of a frame: "<date>/<drive>_sync <frame> <side>"."""
    return f"{entry.folder} {entry.frame + offset} {entry.side}"


_P = TypeVar("_P", bound="Path | None")


def _sort_key(key: str) -> tuple[str, str, int]:
    folder, frame, side = key.split(" ")
    return folder, side, int(frame)


def unique_rows(keys_per_sample: Sequence[Sequence[str]],
                paths_per_sample: Sequence[Sequence[_P]]) -> tuple[list[str], list[_P], np.ndarray]:
    """Distinct frames of a split and each sample's rows into them.

    Keys are sorted by drive, camera and frame, so that neighbouring frames are neighbouring
    rows on disk. Returns (keys, their files, N x F row table).
    """
    path_of: dict[str, _P] = {}
    for keys, paths in zip(keys_per_sample, paths_per_sample, strict=True):
        path_of.update(zip(keys, paths, strict=True))
    keys = sorted(path_of, key=_sort_key)
    row_of = {k: i for i, k in enumerate(keys)}
    rows = np.array([[row_of[k] for k in sample] for sample in keys_per_sample], dtype=np.int64)
    return keys, [path_of[k] for k in keys], rows


def _pool_size(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _fill_rows(pool: ThreadPoolExecutor, decode: Any, rows: np.ndarray, row_shape: tuple[int, ...],
               on_error: str) -> np.ndarray | tuple[np.ndarray, dict[int, str]]:
    """Decode `rows` in the pool; under on_error=skip an unreadable row is zeros, marked bad."""
    if on_error == "raise":
        return np.stack(list(pool.map(decode, rows)))

    def safe(r: int) -> np.ndarray | str:
        try:
            return decode(r)
        except DataError as err:
            return str(err)

    out = list(pool.map(safe, rows))
    # Logged (once per file) by the data module when it drops the samples using these rows.
    bad = {int(r): v for r, v in zip(rows, out, strict=True) if isinstance(v, str)}
    block = np.stack([np.zeros(row_shape, np.uint8) if isinstance(v, str) else v for v in out])
    return block, bad


def build_frame_cache(cache_dir: Path, name: str, root: Path, keys: Sequence[str],
                      paths: Sequence[Path], size: tuple[int, int], workers: int = 0,
                      progress: bool = True, on_error: str = "raise") -> CachedArray:
    """The uint8 N x H x W x 3 frame cache of `paths` (opened, or built/resumed first)."""
    fields = {"kind": "frames", "root": str(Path(root).resolve()), "size": list(size),
              "resize": "PIL RGB Lanczos", "files": file_signature(paths, Path(root))}
    info = {"kind": "frames", "root": str(Path(root).resolve()), "height": size[0],
            "width": size[1]}
    n = _pool_size(workers)
    # PIL releases the GIL while decoding and resizing: threads scale without pickling.
    with ThreadPoolExecutor(n) as pool:
        def fill(rows: np.ndarray) -> np.ndarray | tuple[np.ndarray, dict[int, str]]:
            return _fill_rows(pool, lambda r: decode_rgb(paths[r], size), rows, (*size, 3),
                              on_error)

        return ArrayCache(cache_dir, name).ensure(keys, (*size, 3), fields, fill,
                                                  chunk_size=max(32, 4 * n), info=info,
                                                  progress=progress)


def build_label_cache(cache_dir: Path, name: str, label_root: Path, keys: Sequence[str],
                      label_paths: Sequence[Path | None], frame_paths: Sequence[Path | None],
                      size: tuple[int, int], label_format: str, workers: int = 0,
                      progress: bool = True, on_error: str = "raise") -> CachedArray:
    """The uint8 N x H x W train-id cache of label PNGs; a None path is a void row."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label format {label_format!r}: use one of {LABEL_FORMATS}")
    present = [p for p in label_paths if p is not None]
    missing = [k for k, p in zip(keys, label_paths, strict=True) if p is None]
    fields = {"kind": "labels", "source": "files", "label_root": str(Path(label_root).resolve()),
              "label_format": label_format, "size": list(size), "resize": "PIL nearest",
              "files": file_signature(present, Path(label_root)), "missing": missing}
    info = {"kind": "labels", "source": "files", "label_root": str(Path(label_root).resolve()),
            "label_format": label_format, "height": size[0], "width": size[1],
            "missing": missing}

    def one(r: int) -> np.ndarray:
        path = label_paths[r]
        if path is None:
            return np.full(size, VOID, dtype=np.uint8)
        return decode_label(path, size, label_format, frame_paths[r])

    n = _pool_size(workers)
    with ThreadPoolExecutor(n) as pool:
        def fill(rows: np.ndarray) -> np.ndarray | tuple[np.ndarray, dict[int, str]]:
            return _fill_rows(pool, one, rows, size, on_error)

        return ArrayCache(cache_dir, name).ensure(keys, size, fields, fill,
                                                  chunk_size=max(64, 8 * n), info=info,
                                                  progress=progress)


@dataclass(frozen=True)
class CachedRows:
    """A sample's rows in a cache: `rows[i]` (one row, or F rows for the frames of sample i)."""

    cache: CachedArray
    rows: np.ndarray


class KittiDataset(Dataset):
    """Frames (and label, ground truth) of one split, with paths resolved up front."""

    def __init__(
        self,
        entries: list[SplitEntry],
        image_paths: list[list[Path]],
        label_paths: Sequence[Path | None] | None,
        gt: list[np.ndarray] | None,
        height: int,
        width: int,
        label_format: str = "train_ids",
        flip_prob: float = 0.0,
        intrinsics: Sequence[float] = KITTI_INTRINSICS,
        frame_rows: CachedRows | None = None,
        label_rows: CachedRows | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}")
        self.on_error = on_error
        self.entries, self.image_paths, self.label_paths, self.gt = (
            entries, image_paths, label_paths, gt)
        self.size = (height, width)
        self.label_format = label_format
        self.flip_prob = flip_prob
        self.intrinsics = tuple(intrinsics)
        # With caches, frames (and labels) are row reads; the paths stay for names and errors.
        self.frame_rows, self.label_rows = frame_rows, label_rows

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        if self.on_error == "raise":
            return self._item(index)
        try:
            return self._item(index)
        except DataError as err:  # decode_rgb / decode_label name the file
            return SkippedSample(index, str(self.entries[index]), str(err))

    def _item(self, index: int) -> dict[str, Any]:
        if self.frame_rows is not None:
            frames = rgb_to_tensor(self.frame_rows.cache.read(self.frame_rows.rows[index]))
        else:
            frames = torch.stack([load_image(p, self.size) for p in self.image_paths[index]])
        flip = self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob
        K = intrinsics_matrix(*self.size, normalized=self.intrinsics, flip=flip)
        item: dict[str, Any] = {
            "K": K, "inv_K": torch.linalg.inv(K), "index": index,
            "name": str(self.entries[index]),
        }
        if self.label_rows is not None:
            row = self.label_rows.cache.read(self.label_rows.rows[index])
            labels = torch.from_numpy(row.astype(np.int64))
            item["labels"] = labels.flip(-1) if flip else labels
        elif self.label_paths is not None:
            labels = load_label(self.label_paths[index], self.size, self.label_format,
                                self.image_paths[index][0])
            item["labels"] = labels.flip(-1) if flip else labels
        item["frames"] = frames.flip(-1) if flip else frames
        if self.gt is not None:
            item["depth_gt"] = torch.from_numpy(np.asarray(self.gt[index], np.float32))[None]
        return item


def collate(items: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Stack a batch; ground-truth maps of different sizes are zero-padded bottom/right.

    Unreadable samples (`SkippedSample`) are dropped and listed under "skipped" as
    (name, reason) pairs; a batch of only those has just "name" (empty) and "skipped".
    """
    skipped = [(s.name, s.reason) for s in items if isinstance(s, SkippedSample)]
    good = [item for item in items if not isinstance(item, SkippedSample)]
    batch: dict[str, Any] = {"skipped": skipped} if skipped else {}
    if not good:
        return {"name": [], **batch}
    items = good
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
        frame_cache: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_workers: int = 0,
        label_source: str = "files",
        allow_missing_labels: bool = False,
        on_error: str = "skip",
        eval_on_error: str = "raise",
    ) -> None:
        super().__init__()
        for key, value in (("data.height", height), ("data.width", width)):
            if value <= 0 or value % 32:
                raise ValueError(f"{key}={value}: must be a positive multiple of 32")
        if img_ext not in ("auto", *IMAGE_EXTENSIONS):
            raise ValueError(f"data.img_ext={img_ext!r}: use auto, png or jpg")
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"data.label_format={label_format!r}: use train_ids or label_ids")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"data.label_source={label_source!r}: use files or predicted")
        for key, value in (("data.on_error", on_error), ("data.eval_on_error", eval_on_error)):
            if value not in ON_ERROR:
                raise ValueError(f"{key}={value!r}: use raise or skip")
        if cache_workers < 0:
            raise ValueError(f"data.cache_workers={cache_workers}: use 0 (all cores) or more")
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
        self.frame_cache = frame_cache
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "cache"
        self.cache_workers = cache_workers
        self.label_source = label_source
        self.allow_missing_labels = allow_missing_labels
        self.num_classes = NUM_CLASSES
        self.datasets: dict[str, KittiDataset] = {}
        # Files met unreadable after setup's checks: train follows on_error, val/test
        # eval_on_error (raise by default: metrics must never silently cover fewer frames).
        self.on_error, self.eval_on_error = on_error, eval_on_error
        self.bad_files: set[str] = set()  # reasons (they name the file), each logged once
        self.skipped_samples: set[str] = set()  # split lines ("<folder> <frame> <side>")

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Generate the synthetic scenes, then build the train/val caches (once per node).

        `setup` only opens the caches; it builds them too when prepare_data did not run (a
        file lock makes concurrent builders wait for one another).
        """
        if self.synthetic is not None:
            from fsre_lightning.data.synthetic import generate_synthetic_kitti

            generate_synthetic_kitti(self.root, **self.synthetic)
        if self.frame_cache:
            for split in ("train", "val"):
                if (self.split_dir / f"{self.splits[split]}_files.txt").is_file():
                    self.build_dataset(split)

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
        split_name = self.splits[stage]
        entries = read_split(self.split_dir / f"{split_name}_files.txt")
        frame_ids = self.frame_ids if stage in ("train", "val") else [0]
        image_paths = resolve_images(self.root, entries, frame_ids, self.img_ext, split_name)
        labelled = self.use_labels and stage in ("train", "val")
        label_paths = None
        if labelled and self.label_source == "files":
            label_paths = self._label_paths(entries)
        gt = None
        gt_file = self._gt_file(stage) if stage in ("val", "test") else None
        if gt_file is not None:
            gt = load_gt_depths(gt_file)
            if len(gt) != len(entries):
                raise DataError(f"{gt_file} has {len(gt)} maps but the {split_name} "
                                f"split has {len(entries)} lines: re-export the ground truth")
        on_error = self.on_error if stage == "train" else self.eval_on_error
        # The test split is read once per evaluation: caching it would not pay.
        cached = self.frame_cache and stage in ("train", "val")
        frame_rows = self._frame_rows(split_name, entries, frame_ids, image_paths,
                                      on_error) if cached else None
        label_rows = None
        if labelled and self.label_source == "predicted":
            label_rows = self._predicted_label_rows(split_name, entries, image_paths)
        elif labelled and cached:
            label_rows = self._file_label_rows(split_name, entries, label_paths, image_paths,
                                               on_error)
        dataset = KittiDataset(entries, image_paths, label_paths, gt, self.height, self.width,
                               self.label_format, self.flip_prob if stage == "train" else 0.0,
                               self.intrinsics, frame_rows, label_rows, on_error)
        return self._drop_bad_cached(dataset, split_name, on_error)

    def _drop_bad_cached(self, dataset: KittiDataset, split_name: str,
                         on_error: str) -> KittiDataset:
        """Samples using a cache row that could not be decoded: an error, or dropped."""
        keep = np.ones(len(dataset), dtype=bool)
        reasons: list[str] = []
        for rows in (dataset.frame_rows, dataset.label_rows):
            if rows is None or not rows.cache.bad:
                continue
            bad_rows = set(rows.cache.rows_of(list(rows.cache.bad)).tolist())
            table = rows.rows.reshape(len(dataset), -1)
            keep &= ~np.isin(table, list(bad_rows)).any(axis=1)
            reasons.extend(rows.cache.bad.values())
        if not reasons:
            return dataset
        if on_error == "raise":
            raise DataError(f"{len(reasons)} files of the {split_name} split could not be read "
                            f"when its cache was built, e.g. {reasons[0]}\nFix or remove them "
                            f"(the cache is rebuilt when files change), or set data.on_error="
                            f"skip (train) / data.eval_on_error=skip (val/test)")
        for reason in reasons:
            self._note_bad(reason)
        dropped = [str(dataset.entries[i]) for i in np.flatnonzero(~keep)]
        self.skipped_samples.update(dropped)
        if keep.all() or not keep.any():
            if not keep.any():
                raise DataError(f"every sample of the {split_name} split uses an unreadable "
                                f"file, e.g. {reasons[0]}")
            return dataset
        log.warning("%s split: dropped %d of %d samples using %d unreadable files "
                    "(data.on_error=skip)", split_name, len(dropped), len(dataset), len(reasons))
        idx = np.flatnonzero(keep)

        def pick(rows: CachedRows | None) -> CachedRows | None:
            return None if rows is None else CachedRows(rows.cache, rows.rows[idx])

        return KittiDataset(
            [dataset.entries[i] for i in idx], [dataset.image_paths[i] for i in idx],
            None if dataset.label_paths is None else [dataset.label_paths[i] for i in idx],
            None if dataset.gt is None else [dataset.gt[i] for i in idx],
            *dataset.size, dataset.label_format, dataset.flip_prob, dataset.intrinsics,
            pick(dataset.frame_rows), pick(dataset.label_rows), on_error)

    def _note_bad(self, reason: str) -> None:
        if reason not in self.bad_files:
            self.bad_files.add(reason)
            log.warning("skipped an unreadable sample (data.on_error=skip): %s", reason)

    def note_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        """Record samples a loader dropped: each file is logged once, the samples counted."""
        for name, reason in skipped:
            self._note_bad(reason)
            self.skipped_samples.add(name)

    def _label_paths(self, entries: Sequence[SplitEntry]) -> list[Path | None]:
        paths = [label_path(self.label_dir, e) for e in entries]
        missing = [p for p in paths if not p.exists()]
        if missing and not self.allow_missing_labels:
            raise missing_error(
                "pseudo-labels", missing,
                f"Put label PNGs under data.label_dir ({self.label_dir}) (or make them: python "
                f"-m fsre_lightning.pseudolabel --help), set data.allow_missing_labels=true to "
                f"train those frames as void, or data.use_labels=false for a model without "
                f"semantic losses.")
        if missing:
            log.warning("%d of %d frames have no pseudo-label under %s: void (255) everywhere",
                        len(missing), len(paths), self.label_dir)
        absent = set(missing)
        return [None if p in absent else p for p in paths]

    def _size(self) -> tuple[int, int]:
        return self.height, self.width

    def _frame_rows(self, split_name: str, entries: Sequence[SplitEntry],
                    frame_ids: Sequence[int], image_paths: list[list[Path]],
                    on_error: str = "raise") -> CachedRows:
        keys, paths, rows = unique_rows(
            [[frame_key(e, f) for f in frame_ids] for e in entries], image_paths)
        name = cache_name("frames", split_name, self.height, self.width)
        try:
            cache = build_frame_cache(self.cache_dir, name, self.root, keys, paths, self._size(),
                                      self.cache_workers, on_error=on_error)
        except CacheError as err:
            raise DataError(str(err)) from err
        return CachedRows(cache, rows)

    def _file_label_rows(self, split_name: str, entries: Sequence[SplitEntry],
                         label_paths: Sequence[Path | None] | None,
                         image_paths: list[list[Path]], on_error: str = "raise") -> CachedRows:
        assert label_paths is not None
        keys, paths, rows = unique_rows(
            [[frame_key(e)] for e in entries], [[p] for p in label_paths])
        frames = dict(zip([frame_key(e) for e in entries], [p[0] for p in image_paths],
                          strict=True))
        name = cache_name("labels_files", split_name, self.height, self.width)
        try:
            cache = build_label_cache(self.cache_dir, name, self.label_dir, keys, paths,
                                      [frames[k] for k in keys], self._size(),
                                      self.label_format, self.cache_workers,
                                      on_error=on_error)
        except CacheError as err:
            raise DataError(str(err)) from err
        return CachedRows(cache, rows[:, 0])

    def _predicted_label_rows(self, split_name: str, entries: Sequence[SplitEntry],
                              image_paths: list[list[Path]]) -> CachedRows:
        """Open the label cache of `python -m fsre_lightning.pseudolabel predict` and check it."""
        name = cache_name("labels_predicted", split_name, self.height, self.width)
        store = ArrayCache(self.cache_dir, name)
        command = (f"python -m fsre_lightning.pseudolabel predict --root {self.root} "
                   f"--split-dir {self.split_dir} --split {split_name} --height {self.height} "
                   f"--width {self.width} --cache-dir {self.cache_dir} --model <segformer>")
        try:
            cache = store.open()
        except CacheError as err:
            raise DataError(f"data.label_source=predicted but {err}: run\n  {command}\nor set "
                            f"data.label_source=files") from err
        keys = [frame_key(e) for e in entries]
        try:
            rows = cache.rows_of(keys)
        except KeyError as err:
            raise DataError(f"predicted pseudo-labels {store.data_path}: {err.args[0]}; "
                            f"re-run\n  {command}") from err
        missing = sorted(set(cache.info.get("missing", [])) & set(keys), key=_sort_key)
        if missing and not self.allow_missing_labels:
            raise missing_error("pseudo-labels", missing,
                                 f"{store.data_path} has void rows for these frames; set "
                                 f"data.allow_missing_labels=true to train them as void.")
        frame_paths = dict(zip(keys, [p[0] for p in image_paths], strict=True))
        signature = cache.info.get("frames_signature")
        if signature is not None and sorted(frame_paths, key=_sort_key) == cache.keys:
            current = file_signature([frame_paths[k] for k in cache.keys], self.root)
            if current != signature:
                raise DataError(f"predicted pseudo-labels {store.data_path} were made from "
                                f"other frames (files changed since): re-run\n  {command}")
        return CachedRows(cache, rows)

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
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "collate_fn": collate,
        }
        if shuffle:
            # Order and flips a function of (seed, epoch, sample): a killed run resumes exactly.
            # The seed is the one pl.seed_everything set (torch's initial seed).
            return ResumableDataLoader(self.datasets[split], seed=torch.initial_seed(),
                                       drop_last=True, **common)
        # Own generator: iterating a validation loader must not consume the global torch RNG,
        # or training after a mid-epoch validation would differ from a resumed run's.
        return DataLoader(self.datasets[split], shuffle=False, drop_last=False,
                          generator=torch.Generator(), **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int
                                ) -> dict[str, Any]:
        if batch.get("skipped"):
            self.note_skipped(batch["skipped"])
        if "frames" not in batch:  # every sample unreadable: the module skips the step
            return batch
        training = self.trainer is not None and self.trainer.training
        batch["frames_aug"] = self.jitter(batch["frames"]) if training else batch["frames"]
        return batch


def velodyne_depth(calib_dir: str | os.PathLike[str], velo_file: str | os.PathLike[str],
                   cam: int = 2) -> np.ndarray:
    """Velodyne ground truth of one frame, H x W float32 metres (0 = no point), SPEC section 5.

    The projection is `fsre_lightning.data.velodyne.velodyne_depth`; here a missing file, a
    missing calibration key or a truncated scan becomes a DataError naming the file, like every
    other data problem of the package.
    """
    from fsre_lightning.data import velodyne  # numpy only; no import cycle either way

    try:
        return velodyne.velodyne_depth(calib_dir, velo_file, cam)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(str(err)) from err
