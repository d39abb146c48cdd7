"""The KITTI data module's caches: every frame (and label) of a split decoded once.

``frames_<split>_<H>x<W>`` holds every frame a split's lines need (frame 0 and its
neighbours), uint8 H x W x 3, one row per distinct frame; ``labels_files_<split>_<H>x<W>``
holds the label PNGs as train ids (255 void) and ``labels_predicted_<split>_<H>x<W>`` the
labels `pseudolabel predict` made. A sample is then a few row reads (`CachedRows`). The rows
are built by the same decoders as the uncached path (`fsre_lightning.data.decode`), so both
paths give identical batches; the storage itself is `fsre_lightning.data.array_store`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from fsre_lightning.cityscapes import VOID
from fsre_lightning.config.checks import check_choice
from fsre_lightning.data.array_store import ArrayCache, CachedArray, CacheError, file_signature
from fsre_lightning.data.decode import decode_label, decode_rgb
from fsre_lightning.data.kitti_layout import LABEL_FORMATS, SplitEntry, missing_error
from fsre_lightning.errors import DataError


def cache_name(kind: str, split_name: str, height: int, width: int) -> str:
    """File stem of a cache: kind is frames, labels_files or labels_predicted."""
    return f"{kind}_{split_name}_{height}x{width}"


def frame_key(entry: SplitEntry, offset: int = 0) -> str:
    """Cache key of a frame: "<date>/<drive>_sync <frame> <side>"."""
    return f"{entry.folder} {entry.frame + offset} {entry.side}"


_P = TypeVar("_P", bound="Path | None")


def frame_sort_key(key: str) -> tuple[str, str, int]:
    """Drive, camera, frame number: neighbouring frames become neighbouring rows on disk."""
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
    keys = sorted(path_of, key=frame_sort_key)
    row_of = {k: i for i, k in enumerate(keys)}
    rows = np.array([[row_of[k] for k in sample] for sample in keys_per_sample], dtype=np.int64)
    return keys, [path_of[k] for k in keys], rows


def _pool_size(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def _fill_rows(pool: ThreadPoolExecutor, decode: Callable[[int], np.ndarray], rows: np.ndarray,
               row_shape: tuple[int, ...], on_error: str
               ) -> np.ndarray | tuple[np.ndarray, dict[int, str]]:
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
    check_choice("label_format", label_format, LABEL_FORMATS)
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


def frame_cache_rows(cache_dir: Path, split_name: str, root: Path, entries: Sequence[SplitEntry],
               frame_ids: Sequence[int], image_paths: list[list[Path]], size: tuple[int, int],
               workers: int = 0, on_error: str = "raise") -> CachedRows:
    """Every sample's F frame rows in the split's frame cache (built or resumed first)."""
    keys, paths, rows = unique_rows(
        [[frame_key(e, f) for f in frame_ids] for e in entries], image_paths)
    name = cache_name("frames", split_name, *size)
    try:
        cache = build_frame_cache(cache_dir, name, root, keys, paths, size, workers,
                                  on_error=on_error)
    except CacheError as err:
        raise DataError(str(err)) from err
    return CachedRows(cache, rows)


def label_cache_rows(cache_dir: Path, split_name: str, label_dir: Path,
                    entries: Sequence[SplitEntry], label_paths: Sequence[Path | None],
                    image_paths: list[list[Path]], size: tuple[int, int], label_format: str,
                    workers: int = 0, on_error: str = "raise") -> CachedRows:
    """Every sample's label row in the cache of the split's label PNGs (built first)."""
    keys, paths, rows = unique_rows([[frame_key(e)] for e in entries], [[p] for p in label_paths])
    frames = dict(zip([frame_key(e) for e in entries], [p[0] for p in image_paths], strict=True))
    name = cache_name("labels_files", split_name, *size)
    try:
        cache = build_label_cache(cache_dir, name, label_dir, keys, paths,
                                  [frames[k] for k in keys], size, label_format, workers,
                                  on_error=on_error)
    except CacheError as err:
        raise DataError(str(err)) from err
    return CachedRows(cache, rows[:, 0])


def predicted_label_rows(cache_dir: Path, split_name: str, root: Path, split_dir: Path,
                         entries: Sequence[SplitEntry], image_paths: list[list[Path]],
                         size: tuple[int, int], allow_missing: bool) -> CachedRows:
    """Open the label cache of `python -m fsre_lightning.pseudolabel predict` and check it."""
    name = cache_name("labels_predicted", split_name, *size)
    store = ArrayCache(cache_dir, name)
    command = (f"python -m fsre_lightning.pseudolabel predict --root {root} "
               f"--split-dir {split_dir} --split {split_name} --height {size[0]} "
               f"--width {size[1]} --cache-dir {cache_dir} --model <segformer>")
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
    missing = sorted(set(cache.info.get("missing", [])) & set(keys), key=frame_sort_key)
    if missing and not allow_missing:
        raise missing_error("pseudo-labels", missing,
                            f"{store.data_path} has void rows for these frames; set "
                            f"data.allow_missing_labels=true to train them as void.")
    frame_paths = dict(zip(keys, [p[0] for p in image_paths], strict=True))
    signature = cache.info.get("frames_signature")
    if signature is not None and sorted(frame_paths, key=frame_sort_key) == cache.keys:
        current = file_signature([frame_paths[k] for k in cache.keys], root)
        if current != signature:
            raise DataError(f"predicted pseudo-labels {store.data_path} were made from "
                            f"other frames (files changed since): re-run\n  {command}")
    return CachedRows(cache, rows)
