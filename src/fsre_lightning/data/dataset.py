"""One split's samples (`KittiDataset`) and how a batch of them is stacked (`collate`).

The batch layout is documented in `fsre_lightning.data.kitti` (and docs/design.md). A sample
reads its frames from the frame cache when there is one, else decodes the files; both give
the same tensors. The horizontal flip is the only random draw of a sample (its seed is a
function of the run's seed, the epoch and the sample: `fsre_lightning.data.resumable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fsre_lightning.data.decode import load_image, load_label, rgb_to_tensor
from fsre_lightning.data.frame_cache import CachedRows
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS, SplitEntry
from fsre_lightning.errors import DataError
from fsre_lightning.geometry import intrinsics_matrix


@dataclass(frozen=True)
class SkippedSample:
    """What a dataset yields for a sample whose files cannot be read (data.on_error=skip).

    `collate` drops it from the batch and lists it under ``batch["skipped"]``, so that the
    main process (not a loader worker) logs each bad file once and counts the samples.
    """

    index: int
    name: str
    reason: str



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
            batch[key] = stack(values)
    return batch


def stack(values: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack`; in a DataLoader worker, straight into shared memory.

    A worker hands each batch to the main process in shared memory: a batch stacked in private
    memory is copied once more on the way out (the cost per sample, with and without:
    benchmarks/README.md, "Keeping the GPU fed"). `UntypedStorage._new_shared` is how
    PyTorch's own default collate does it.
    """
    if get_worker_info() is None:
        return torch.stack(values)
    first = values[0]
    storage = torch.UntypedStorage._new_shared(len(values) * first.nbytes)
    out = torch.empty(0, dtype=first.dtype).set_(storage, 0, (len(values), *first.shape))
    return torch.stack(values, out=out)
