"""KITTI raw (and the synthetic scenes, which share its layout) as a LightningDataModule.

The batch it serves (what FSREModule reads) is documented once, in docs/design.md section 4.1:
``frames`` (never jittered), ``frames_aug`` (jittered on the device while training), ``K`` and
``inv_K``, ``labels``, ``depth_gt`` and ``gt_size``, ``index``, ``name``, ``skipped`` and
``num_skipped``.

Files: the KITTI raw layout of `fsre_lightning.data.kitti_layout`. Input pipeline: with
``frame_cache`` the train and val splits are decoded and resized once into memory-mapped uint8
caches (`fsre_lightning.data.frame_cache`); a sample is then a few row reads with no image
decoding, and identical to the uncached path's. label_source=predicted reads the cache written
by ``python -m fsre_lightning.pseudolabel predict``. The test split is never cached (it is read
once per evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from fsre_lightning.data.augment import FrameConsistentColorJitter
from fsre_lightning.data.dataset import KittiDataset, collate
from fsre_lightning.data.frame_cache import (
    CachedRows,
    frame_cache_rows,
    label_cache_rows,
    predicted_label_rows,
)
from fsre_lightning.data.kitti_config import KittiDataConfig, data_config
from fsre_lightning.data.kitti_layout import (
    GT_FILE_NAMES,
    SplitEntry,
    label_path,
    load_gt_depths,
    missing_error,
    read_split,
    resolve_images,
)
from fsre_lightning.data.kitti_prepare import format_plan, prepare_kitti
from fsre_lightning.data.resumable import (
    ResumableDataLoader,
    WorkerSafeDataLoader,
    ignore_stop_signals,
    shutdown_workers,
)
from fsre_lightning.data.synthetic import generate_synthetic_kitti
from fsre_lightning.errors import DataError

log = logging.getLogger(__name__)


class KittiDataModule(pl.LightningDataModule):
    """KITTI raw or the built-in synthetic scenes (same layout), validated before training.

    `root` and `split_dir` locate the files; every other option is a `KittiDataConfig` field,
    with its default and rules (direct calls are checked as configs are). `synthetic` (a dict
    of `generate_synthetic_kitti` arguments) makes `prepare_data` generate the scenes into
    `root` on first use. `config` holds the checked options.
    """

    def __init__(self, root: str | os.PathLike[str], split_dir: str | os.PathLike[str],
                 **options: Any) -> None:
        super().__init__()
        # Defaults and rules written once, in KittiDataConfig (options are its other fields).
        self.config = cfg = data_config(KittiDataConfig, root=root, split_dir=split_dir,
                                         **options)
        self.root = Path(cfg.root)
        self.split_dir = Path(cfg.split_dir)
        self.label_dir = Path(cfg.label_dir) if cfg.label_dir else self.root / "segmentation"
        self.height, self.width = cfg.height, cfg.width
        self.frame_ids = [int(f) for f in cfg.frame_ids]
        self.batch_size, self.num_workers = cfg.batch_size, cfg.num_workers
        self._loaders: list[DataLoader] = []  # to shut their workers down at teardown
        self._told_workers = False
        self.img_ext, self.use_labels = cfg.img_ext, cfg.use_labels
        self.label_format = cfg.label_format
        self.flip_prob = cfg.flip_prob
        self.intrinsics = tuple(cfg.intrinsics)
        self.jitter = FrameConsistentColorJitter(cfg.brightness, cfg.contrast, cfg.saturation,
                                                 cfg.hue, p=cfg.jitter_prob)
        self.gt_files = {"val": cfg.val_gt_file, "test": cfg.test_gt_file}
        self.eval_crop = cfg.eval_crop
        self.min_depth_eval, self.max_depth_eval = cfg.min_depth_eval, cfg.max_depth_eval
        self.splits = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
        self.synthetic = dataclasses.asdict(cfg.synthetic) if cfg.synthetic else None
        self.pin_memory = cfg.pin_memory
        self.frame_cache = cfg.frame_cache
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.root / "cache"
        self.cache_workers = cfg.cache_workers
        self.label_source = cfg.label_source
        self.allow_missing_labels = cfg.allow_missing_labels
        self.datasets: dict[str, KittiDataset] = {}
        # Files met unreadable after setup's checks: train follows on_error, val/test
        # eval_on_error (raise by default: metrics must never silently cover fewer frames).
        self.on_error, self.eval_on_error = cfg.on_error, cfg.eval_on_error
        self.bad_files: set[str] = set()  # reasons (they name the file), each logged once
        self.skipped_samples: set[str] = set()  # split lines ("<folder> <frame> <side>")

    # ------------------------------------------------------------------ setup
    def prepare_data(self, splits: Sequence[str] = ("train", "val")) -> None:
        """Generate the synthetic scenes (or with `download`, make KITTI's files present:
        `kitti_prepare.prepare_kitti`), then build the caches of `splits` (once per node;
        evaluation passes none: a test score must not wait for, or fail on, training frames).

        `setup` only opens the caches; it builds them too when prepare_data did not run (a
        file lock makes concurrent builders wait for one another).
        """
        if self.synthetic is not None:
            generate_synthetic_kitti(self.root, **self.synthetic)
        if self.config.download:
            # Locked per file: DDP ranks (each runs this) and other commands fetch each once.
            log.info(format_plan(prepare_kitti(self.config), dry_run=False))
        if self.frame_cache:
            for split in splits:
                if (self.split_dir / f"{self.splits[split]}_files.txt").is_file():
                    self.build_dataset(split)

    def _gt_file(self, stage: str) -> Path | None:
        given = self.gt_files.get(stage)
        if given:
            return Path(given)
        default = self.split_dir / GT_FILE_NAMES[stage]
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
        size = (self.height, self.width)
        frame_rows = frame_cache_rows(self.cache_dir, split_name, self.root, entries,
                                      frame_ids, image_paths, size, self.cache_workers,
                                      on_error) if cached else None
        label_rows = None
        if labelled and self.label_source == "predicted":
            label_rows = predicted_label_rows(self.cache_dir, split_name, self.root,
                                              self.split_dir, entries, image_paths, size,
                                              self.allow_missing_labels)
        elif labelled and cached:
            label_rows = label_cache_rows(self.cache_dir, split_name, self.label_dir, entries,
                                          label_paths, image_paths, size, self.label_format,
                                          self.cache_workers, on_error)
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
        workers = self._workers()
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": workers > 0,
            "collate_fn": collate,
            # SIGTERM/SIGINT to the process group must not kill a worker mid-batch: the main
            # process stops at a step boundary and shuts its workers down.
            "worker_init_fn": ignore_stop_signals if workers > 0 else None,
        }
        if shuffle:
            # Order and flips a function of (seed, epoch, sample): a killed run resumes exactly.
            # The seed is the one pl.seed_everything set (torch's initial seed).
            loader: DataLoader = ResumableDataLoader(
                self.datasets[split], seed=torch.initial_seed(), drop_last=True, **common)
        else:
            # Own generator: iterating a validation loader must not consume the global torch
            # RNG, or training after a mid-epoch validation would differ from a resumed run's.
            loader = WorkerSafeDataLoader(self.datasets[split], shuffle=False, drop_last=False,
                                          generator=torch.Generator(), **common)
        self._loaders.append(loader)
        return loader

    def _workers(self) -> int:
        """data.num_workers, at most the CPUs this process may use: more only time-share them
        (PyTorch warned about it once per loader; the samples do not depend on the count)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        if self.num_workers > cpus and not self._told_workers:
            self._told_workers = True
            log.info("data.num_workers=%d on %d CPUs: %d loader workers", self.num_workers,
                     cpus, cpus)
        return min(self.num_workers, cpus)

    def teardown(self, stage: str) -> None:
        self._shut_workers_down()

    def on_exception(self, exception: BaseException) -> None:
        # A stop on a signal or a crash: Lightning calls this, not teardown.
        self._shut_workers_down()

    def _shut_workers_down(self) -> None:
        # Persistent workers outlive a SIGTERM for a while (ignore_stop_signals): end them
        # when fit or validate ends, however it ends, or the interpreter's exit waits for them.
        for loader in self._loaders:
            shutdown_workers(loader)
        self._loaders.clear()

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
        if self.skipped_samples:
            batch["num_skipped"] = len(self.skipped_samples)
        if "frames" not in batch:  # every sample unreadable: the module skips the step
            return batch
        training = self.trainer is not None and self.trainer.training
        batch["frames_aug"] = self.jitter(batch["frames"]) if training else batch["frames"]
        return batch
