"""Train on your own camera: `data=video_folder`, one subfolder of frames per sequence.

    ROOT/
      drive_a/ 000001.jpg 000002.jpg ...     (any names; sorted order is time order)
      drive_b/ frame_0000.png ...

`VideoFolderDataModule` is the KITTI data module on a layout adapter: it links the frames into
the KITTI raw layout under WORK_DIR/frames (`<sequence>/image_02/data/<10-digit index>.<ext>`,
symbolic links, copies where links are not allowed), writes its own split files
(WORK_DIR/splits/{train,val}_files.txt: every frame whose neighbours `frame_ids` exist, a
seeded random `val_fraction` of them for validation) and keeps its caches in WORK_DIR/cache.
Everything else (frame caches, augmentation, pseudo-labels, bad-file policies) is the KITTI
module's. The layout is rebuilt when the frames change.

Intrinsics are the user's: [fx, fy, cx, cy] normalised by the image size (KITTI: 0.58, 1.92,
0.5, 0.5) or, with ``intrinsics_units=pixels``, in pixels of the native frames (then every
sequence must have one frame size, which they are divided by).

Pseudo-labels (``label_source=predicted``, the default) come from
``python -m fsre_lightning.pseudolabel predict`` run on WORK_DIR/frames with the split files
written here: with ``pseudo_label_model`` (a Cityscapes SegFormer folder) the data module runs
it itself; without, setup stops with that exact command until the labels exist.
``model=monodepth2`` (no labels) trains without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import fsre_lightning.config.checks as checks
from fsre_lightning.data import label_caches
from fsre_lightning.data.array_store import ArrayCache, CacheError
from fsre_lightning.data.dataset import KittiDataset
from fsre_lightning.data.frame_cache import cache_name
from fsre_lightning.data.kitti import KittiDataConfig, KittiDataModule, data_config
from fsre_lightning.data.kitti_layout import IMAGE_EXTENSIONS, camera_folder
from fsre_lightning.data.video_folder_config import INTRINSICS_UNITS, VideoFolderDataConfig
from fsre_lightning.errors import DataError

log = logging.getLogger(__name__)

CAMERA = camera_folder(2)  # every sequence is a left camera: split lines end in " l"
MANIFEST = "layout.json"


def scan_sequences(root: Path) -> dict[str, list[Path]]:
    """{sequence name: its frames in sorted order} of ROOT's subfolders holding images."""
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist or is not a folder: point it "
                        "at a folder with one subfolder of frames per sequence")
    sequences: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        frames = sorted(p for p in folder.iterdir()
                        if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)
        if frames:
            sequences[folder.name] = frames
    if not sequences:
        loose = [p for p in root.iterdir() if p.suffix[1:].lower() in IMAGE_EXTENSIONS]
        hint = (f" ({len(loose)} images lie directly in it: move them into a subfolder, one "
                "per sequence)" if loose else "")
        raise DataError(f"data.root={str(root)!r} holds no sequence folders with "
                        f"{'/'.join(IMAGE_EXTENSIONS)} frames{hint}; expected "
                        "ROOT/<sequence>/<frame>.png")
    return sequences


def layout_name(sequence: str) -> str:
    """A split-file-safe folder name (split lines are whitespace separated)."""
    return re.sub(r"\s+", "_", sequence)


def normalise_intrinsics(intrinsics: Sequence[float], units: str,
                         sequences: dict[str, list[Path]]) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) normalised by the native frame size (pixels: divided by it)."""
    checks.check_choice("intrinsics_units", units, INTRINSICS_UNITS)
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    if units == "normalized":
        return fx, fy, cx, cy
    sizes: dict[tuple[int, int], str] = {}
    for name, frames in sequences.items():
        try:
            with Image.open(frames[0]) as img:
                sizes.setdefault(img.size, f"{name} ({frames[0]})")
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot decode image {frames[0]}: {err}") from err
    if len(sizes) > 1:
        listed = "; ".join(f"{w} x {h}: {where}" for (w, h), where in sizes.items())
        raise DataError(f"data.intrinsics_units=pixels needs one frame size for all sequences, "
                        f"found {listed}; give normalised intrinsics or one data set per camera")
    (width, height), = sizes
    return fx / width, fy / height, cx / width, cy / height


def split_lines(sequences: dict[str, list[Path]], frame_ids: Sequence[int],
                val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) split lines "<sequence> <index> l" of the frames with all neighbours."""
    lo, hi = -min(frame_ids), max(frame_ids)
    lines = [f"{layout_name(name)} {i} l" for name, frames in sequences.items()
             for i in range(max(lo, 0), len(frames) - max(hi, 0))]
    if len(lines) < 2:
        raise DataError(f"{len(lines)} usable frames in {len(sequences)} sequences: a frame "
                        f"needs its neighbours {list(frame_ids)}, and training and validation "
                        "need at least one each; add frames (>= 4 per sequence)")
    rng = np.random.default_rng(seed)
    n_val = min(len(lines) - 1, max(1, round(val_fraction * len(lines))))
    val = set(rng.choice(len(lines), size=n_val, replace=False).tolist())
    train = [line for i, line in enumerate(lines) if i not in val]
    return train, [line for i, line in enumerate(lines) if i in val]


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_layout(sequences: dict[str, list[Path]], frames_dir: Path) -> None:
    """Link every frame into the KITTI layout; rebuilt from scratch when the frames changed."""
    names = [layout_name(n) for n in sequences]
    if len(set(names)) != len(names):
        raise DataError(f"sequence folders {sorted(sequences)} differ only by whitespace: "
                        "rename them")
    manifest = {"sequences": {layout_name(n): [str(p.resolve()) for p in frames]
                              for n, frames in sequences.items()}}
    manifest_path = frames_dir / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return
    if frames_dir.exists():
        shutil.rmtree(frames_dir)  # ours alone: links (or copies) made by a previous build
    for name, sources in manifest["sequences"].items():
        data = frames_dir / name / CAMERA / "data"
        data.mkdir(parents=True)
        for index, source in enumerate(sources):
            link = data / f"{index:010d}{Path(source).suffix.lower()}"
            try:
                link.symlink_to(source)
            except OSError:  # file systems (or Windows accounts) without symbolic links
                shutil.copy2(source, link)
    _write_if_changed(manifest_path, json.dumps(manifest))
    log.info("video_folder: linked %d frames of %d sequences into %s",
             sum(len(s) for s in sequences.values()), len(sequences), frames_dir)


class VideoFolderDataModule(KittiDataModule):
    """KittiDataModule over ROOT/<sequence>/<frames> (see the module docstring).

    Takes `VideoFolderDataConfig`'s fields: every KittiDataModule option, but `root` means the
    folder of sequences and `split_dir`/`cache_dir`/`label_dir` default to folders of the work
    dir.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, **options: Any) -> None:
        cfg = data_config(VideoFolderDataConfig, root=root, **options)
        assert cfg.root is not None and cfg.intrinsics is not None  # its rules say so
        self.source_root = Path(cfg.root)
        # One work dir per source folder: two data sets never overwrite each other's layout.
        digest = hashlib.sha256(str(self.source_root.resolve()).encode()).hexdigest()[:8]
        self.work_dir = Path(cfg.work_dir) / f"{self.source_root.resolve().name}-{digest}"
        self.raw_intrinsics = tuple(float(v) for v in cfg.intrinsics)
        self.intrinsics_units = cfg.intrinsics_units
        self.val_fraction, self.split_seed = float(cfg.val_fraction), int(cfg.split_seed)
        self.pseudo_label_model = cfg.pseudo_label_model
        self.pseudo_label_device = cfg.pseudo_label_device
        self.pseudo_label_batch_size = int(cfg.pseudo_label_batch_size)
        own = {f.name for f in dataclasses.fields(VideoFolderDataConfig)} - {
            f.name for f in dataclasses.fields(KittiDataConfig)}
        kitti = {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in own and k != "_target_"}
        kitti.update(root=self.work_dir / "frames",
                     split_dir=cfg.split_dir or self.work_dir / "splits",
                     cache_dir=cfg.cache_dir or self.work_dir / "cache",
                     label_dir=cfg.label_dir or self.work_dir / "segmentation",
                     intrinsics=(1.0, 1.0, 0.5, 0.5))  # the real ones: `prepare_layout`
        super().__init__(**kitti)
        self.config = cfg
        self._layout_ready = False

    def prepare_layout(self) -> None:
        """Scan ROOT, link the frames, write the split files and resolve the intrinsics."""
        if self._layout_ready:
            return
        sequences = scan_sequences(self.source_root)
        self.intrinsics = normalise_intrinsics(self.raw_intrinsics, self.intrinsics_units,
                                               sequences)
        build_layout(sequences, self.root)
        train, val = split_lines(sequences, self.frame_ids, self.val_fraction, self.split_seed)
        _write_if_changed(self.split_dir / f"{self.splits['train']}_files.txt",
                          "\n".join(train) + "\n")
        _write_if_changed(self.split_dir / f"{self.splits['val']}_files.txt",
                          "\n".join(val) + "\n")
        log.info("video_folder: %d train / %d val frames from %d sequences of %s "
                 "(intrinsics %s, normalised)", len(train), len(val), len(sequences),
                 self.source_root, [round(v, 4) for v in self.intrinsics])
        self._layout_ready = True

    def pseudolabel_command(self) -> str:
        return (f"python -m fsre_lightning.pseudolabel predict --root {self.root} "
                f"--split-dir {self.split_dir} --split {self.splits['train']} "
                f"{self.splits['val']} --height {self.height} --width {self.width} "
                f"--cache-dir {self.cache_dir} --model <Cityscapes SegFormer folder>")

    def make_pseudo_labels(self) -> None:
        """`pseudolabel predict` for train and val with `pseudo_label_model` (up-to-date
        caches are kept as they are; an interrupted run resumes)."""
        for split in ("train", "val"):
            try:
                label_caches.predict_labels(
                    self.root, self.split_dir / f"{self.splits[split]}_files.txt",
                    self.cache_dir, (self.height, self.width), str(self.pseudo_label_model),
                    device=self.pseudo_label_device, batch_size=self.pseudo_label_batch_size,
                    # SegFormer sees more detail at twice the depth network's input size.
                    infer_size=(2 * self.height, 2 * self.width), img_ext=self.img_ext,
                    workers=self.cache_workers, load_model=label_caches.load_segformer)
            except ImportError as err:  # transformers missing: the seg extra
                raise DataError(f"data.pseudo_label_model: {err}") from err

    def _check_predicted_labels(self) -> None:
        """Stop before the (slow) frame caches when the pseudo-labels are not made yet."""
        if not (self.use_labels and self.label_source == "predicted"):
            return
        if self.pseudo_label_model:
            self.make_pseudo_labels()
            return
        for split in ("train", "val"):
            name = cache_name("labels_predicted", self.splits[split], self.height, self.width)
            try:
                ArrayCache(self.cache_dir, name).open()
            except CacheError as err:
                raise DataError(
                    f"no pseudo-labels for the {split} split of data.root={self.source_root} "
                    f"yet ({err}). Make them with a Cityscapes SegFormer (pip install "
                    f"'fsre-lightning[seg]'):\n  {self.pseudolabel_command()}\nthen train "
                    "again (or set data.pseudo_label_model=<that folder> to have it run "
                    "here); or train without semantics: model=monodepth2") from err

    def prepare_data(self, splits: Sequence[str] = ("train", "val")) -> None:
        self.prepare_layout()
        self._check_predicted_labels()
        super().prepare_data(splits)

    def build_dataset(self, stage: str) -> KittiDataset:
        self.prepare_layout()  # setup on a process where prepare_data did not run (DDP ranks)
        if stage == "test":
            raise DataError("data=video_folder has no test split (no ground truth): use "
                            "`python -m fsre_lightning.predict` to look at its depth")
        return super().build_dataset(stage)
