"""What a KITTI preparation fetches: split files, drive and calibration archives, extras.

The part of `fsre_lightning.data.kitti_prepare` that reads no archive (docs/design.md section
4.3): `KittiPrepareConfig` (``data.prepare``), the published splits and where they come from,
KITTI's drive-to-archive rule (`drive_archive`: ``2011_09_26/2011_09_26_drive_0001_sync`` is
``raw_data/2011_09_26_drive_0001/2011_09_26_drive_0001_sync.zip`` on KITTI's server, day
``2011_09_26`` is ``raw_data/2011_09_26_calib.zip``), the archives a set of split files needs
(`plan_archives`), and which drives are already on disk.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fsre_lightning.config.checks import (
    check_choice,
    check_int,
    check_number,
    is_int,
    require,
)
from fsre_lightning.data import downloads
from fsre_lightning.data.downloads import DataError
from fsre_lightning.data.kitti_layout import (
    IMAGE_EXTENSIONS,
    SplitEntry,
    frame_name,
    read_split,
)

log = logging.getLogger(__name__)

# KITTI's public archive server (raw_data/..., data_depth_annotated.zip, ...).
KITTI_ARCHIVE_URL = "https://s3.eu-central-1.amazonaws.com/avg-kitti"
# The repository that defines the splits every paper of the field uses.
MONODEPTH2_SPLITS_URL = "https://raw.githubusercontent.com/nianticlabs/monodepth2/master/splits"
# Published split folder -> its files (Monodepth2's splits/).
PUBLISHED_SPLITS: dict[str, tuple[str, ...]] = {
    "eigen_zhou": ("train_files.txt", "val_files.txt"),
    "eigen": ("test_files.txt",),
    "eigen_benchmark": ("test_files.txt",),
    "odom": ("train_files.txt", "val_files.txt", "test_files_09.txt", "test_files_10.txt"),
}
# Splits whose lines name odometry sequences ("9 0 l"), not raw drives: nothing to fetch.
ODOMETRY_SPLITS = frozenset({"odom"})
EXTRAS = ("annotated", "odometry", "semantics")
PSEUDO_LABELS = ("predict", "import")
# The Cityscapes SegFormer of the field's pseudo-labels (19 outputs in train-id order).
DEFAULT_SEGMENTATION_MODEL = "nvidia/segformer-b5-finetuned-cityscapes-1024-1024"
DRIVE_FOLDER = re.compile(r"^(?P<date>\d{4}_\d{2}_\d{2})/(?P=date)_drive_(?P<number>\d{4})_sync$")
# Where the extras unpack under data.root (what export_gt, evaluate_pose, evaluate read).
EXTRA_FOLDERS = {"annotated": "data_depth_annotated", "odometry": "odometry",
                 "semantics": "data_semantics"}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(kw_only=True)
class KittiPrepareConfig:
    """`data.prepare`: where KITTI comes from and what is made present (`prepare_kitti`)."""

    # KITTI's archive server, or a local folder holding its layout (raw_data/<drive>/...zip).
    archive_url: str = KITTI_ARCHIVE_URL
    # Monodepth2's splits/ (a URL, or a local folder with <split>/<file>).
    splits_url: str = MONODEPTH2_SPLITS_URL
    # Published split folders (siblings of data.split_dir) fetched when missing; the drives of
    # the raw ones among them are fetched too (the default: Eigen-Zhou training, Eigen test).
    splits: list[str] = field(default_factory=lambda: list(PUBLISHED_SPLITS))
    # annotated (data_depth_annotated, the maps of the test splits' drives), odometry (colour
    # images of odometry_sequences, and the poses), semantics (KITTI 2015 data_semantics).
    extras: list[str] = field(default_factory=list)
    odometry_sequences: list[int] = field(default_factory=lambda: [9, 10])
    jpeg: bool = False
    keep_archives: bool = False
    pseudo_labels: str | None = None
    label_model: str = DEFAULT_SEGMENTATION_MODEL
    label_device: str = "auto"
    retries: int = 5
    backoff: float = 2.0
    timeout: float = 60.0
    workers: int = 8

    def __post_init__(self) -> None:
        for key in ("archive_url", "splits_url", "label_model"):
            require(isinstance(getattr(self, key), str) and bool(getattr(self, key)), key,
                    getattr(self, key), "a URL or a local folder")
        require(len(set(self.splits)) == len(self.splits)
                and all(s in PUBLISHED_SPLITS for s in self.splits), "splits", self.splits,
                f"distinct names among {list(PUBLISHED_SPLITS)} (Monodepth2's split folders)")
        require(len(set(self.extras)) == len(self.extras)
                and all(e in EXTRAS for e in self.extras), "extras", self.extras,
                f"distinct names among {list(EXTRAS)}")
        seqs = self.odometry_sequences
        require(len(seqs) > 0 and len(set(seqs)) == len(seqs)
                and all(is_int(s) and 0 <= s <= 21 for s in seqs), "odometry_sequences",
                seqs, "distinct KITTI odometry sequences 0-21 (ground-truth poses: 0-10)")
        check_choice("pseudo_labels", self.pseudo_labels, PSEUDO_LABELS, nullable=True)
        require(self.label_device in DEVICES or (self.label_device.startswith("cuda:")
                                                 and self.label_device[5:].isdigit()),
                "label_device", self.label_device, "auto, cpu, cuda, cuda:<index> or mps")
        check_int("retries", self.retries, lo=0)
        check_number("backoff", self.backoff, lo=0)
        check_number("timeout", self.timeout, lo=0, strict=True)
        check_int("workers", self.workers, lo=1)


class DataSettings(Protocol):
    """What a preparation reads of the `data` config (`data.kitti.KittiDataConfig` has it)."""

    root: str
    split_dir: str
    frame_ids: list[int]
    height: int
    width: int
    img_ext: str
    cache_dir: str | None
    label_dir: str | None
    label_format: str
    train_split: str
    val_split: str
    prepare: KittiPrepareConfig


# ------------------------------------------------------------------- what the splits need
def drive_archive(folder: str) -> str:
    """KITTI's archive of a raw drive folder, relative to the archive server:
    ``2011_09_26/2011_09_26_drive_0001_sync`` -> ``raw_data/2011_09_26_drive_0001/
    2011_09_26_drive_0001_sync.zip``."""
    match = DRIVE_FOLDER.match(folder)
    if match is None:
        raise DataError(f"{folder!r} is not a KITTI raw drive folder (<date>/<date>_drive_<NNNN>"
                        "_sync): only KITTI raw drives can be downloaded")
    drive = f"{match['date']}_drive_{match['number']}"
    return f"raw_data/{drive}/{drive}_sync.zip"


def calibration_archive(date: str) -> str:
    """KITTI's calibration archive of a recording day: ``raw_data/<date>_calib.zip``."""
    return f"raw_data/{date}_calib.zip"


@dataclass(frozen=True)
class Archive:
    """One archive to make present: `path` below the archive server, unpacked into
    data.root/`dest`; with `members`, only the members whose path component number `select_at`
    is one of them (the split's drives of data_depth_annotated, the chosen sequences)."""

    kind: str
    path: str
    dest: str = ""
    members: tuple[str, ...] | None = None
    select_at: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name

    def keeps(self, member: str) -> bool:
        if self.members is None:
            return True
        parts = member.split("/")
        return len(parts) > self.select_at + 1 and parts[self.select_at] in self.members


@dataclass
class SplitFiles:
    """The split folders prepared, and the raw split files among them."""

    folders: list[Path]
    raw_files: list[Path]
    fetched: list[Path] = field(default_factory=list)
    entries: dict[Path, list[SplitEntry]] = field(default_factory=dict)


def _has_split_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*_files.txt"))


def split_folders(split_dir: Path, names: Sequence[str]) -> list[Path]:
    """data.split_dir, then the published split folders beside it (each once)."""
    folders = [split_dir, *(split_dir.parent / name for name in names)]
    seen: dict[str, Path] = {}
    for folder in folders:
        seen.setdefault(str(folder.absolute()), folder)
    return list(seen.values())


def source_hint(key: str, default: str) -> str:
    return f"check data.prepare.{key} (the public one is {default})"


def _split_text(source: str, split: str, name: str, cfg: KittiPrepareConfig) -> str:
    hint = source_hint("splits_url", MONODEPTH2_SPLITS_URL)
    if downloads.is_url(source):
        return downloads.read_text(downloads.join_url(source, split, name), hint,
                                   timeout=cfg.timeout, retries=cfg.retries,
                                   backoff=cfg.backoff)
    path = downloads.local_path(source) / split / name
    if not path.is_file():
        raise DataError(f"split file {path} not found: data.prepare.splits_url={source!r} must "
                        "be Monodepth2's splits/ folder (<split>/<file>) or its URL")
    return path.read_text()


def _parse_split_text(text: str, origin: str) -> list[SplitEntry]:
    """The lines of a split file read from `origin`, checked as read_split checks a file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split_files.txt"
        path.write_text(text)
        try:
            return read_split(path)
        except DataError as err:
            raise DataError(f"{origin} is not a split file ({str(err).replace(str(path), 'it')}"
                            "): check data.prepare.splits_url") from None


def ensure_split_files(cfg: DataSettings, staging: Path, dry_run: bool) -> SplitFiles:
    """Fetch the published split folders that are named and missing (in a dry run: read them,
    write nothing); DataError for a named folder without split files that cannot be fetched."""
    options = cfg.prepare
    split_dir = Path(cfg.split_dir)
    folders = split_folders(split_dir, options.splits)
    result = SplitFiles(folders, [])
    for folder in folders:
        published = folder.name in PUBLISHED_SPLITS
        if not _has_split_files(folder):
            if not published:
                raise DataError(
                    f"data.split_dir={str(folder)!r} holds no <split>_files.txt and is not named "
                    f"after a published split ({', '.join(PUBLISHED_SPLITS)}) that could be "
                    "fetched: put your split files there, or point data.split_dir at a folder "
                    "named after the published split you want")
            with downloads.exclusive(staging / f"splits-{folder.name}.lock",
                                     f"the split files of {folder.name}"):
                if not _has_split_files(folder):  # another process may have fetched them
                    _fetch_split(folder, options, dry_run, result)
        if folder.name in ODOMETRY_SPLITS:
            continue
        for split_file in sorted(folder.glob("*_files.txt")) if folder.is_dir() else []:
            result.raw_files.append(split_file)
            if split_file not in result.entries:
                result.entries[split_file] = read_split(split_file)
    return result


def _fetch_split(folder: Path, options: KittiPrepareConfig, dry_run: bool,
                 result: SplitFiles) -> None:
    texts = {}
    for name in PUBLISHED_SPLITS[folder.name]:
        text = _split_text(options.splits_url, folder.name, name, options)
        origin = f"{options.splits_url.rstrip('/')}/{folder.name}/{name}"
        entries = _parse_split_text(text, origin)
        texts[name] = text
        if folder.name not in ODOMETRY_SPLITS:
            result.entries[folder / name] = entries
            if dry_run:
                result.raw_files.append(folder / name)
    if dry_run:
        result.fetched.extend(folder / n for n in texts)
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            tmp = folder / f".{name}.part"
            tmp.write_text(text)
            os.replace(tmp, folder / name)
            result.fetched.append(folder / name)
    except OSError as err:
        raise DataError(f"cannot write the split files into {folder} ({type(err).__name__}: "
                        f"{err.strerror or err}): choose a data.split_dir you can write to"
                        ) from None
    log.info("split files of %s written to %s", folder.name, folder)


def needed_drives(splits: SplitFiles) -> list[str]:
    """The raw drive folders the split files name, in first-seen order; DataError naming the
    file of a line that is not a KITTI raw drive."""
    drives: dict[str, None] = {}
    for split_file, entries in splits.entries.items():
        for entry in entries:
            if entry.folder not in drives:
                if DRIVE_FOLDER.match(entry.folder) is None:
                    raise DataError(f"{split_file}: {entry.folder!r} is not a KITTI raw drive "
                                    "folder (<date>/<date>_drive_<NNNN>_sync), so it cannot be "
                                    "downloaded: fix the split file, or prepare without "
                                    "data.download")
                drives[entry.folder] = None
    return list(drives)


def test_drives(splits: SplitFiles) -> list[str]:
    """The drives of the test split files (what export_gt scores against ground truth)."""
    return list(dict.fromkeys(e.folder for path, entries in splits.entries.items()
                              if path.name.startswith("test") for e in entries))


def plan_archives(drives: Sequence[str], options: KittiPrepareConfig,
                  annotated_drives: Sequence[str] | None = None) -> list[Archive]:
    """Every archive to make present: each day's calibration, each drive, then the extras; of
    data_depth_annotated only the maps of `annotated_drives` (default: every drive), the
    test splits' in a preparation, are unpacked."""
    dates = sorted({d.split("/")[0] for d in drives})
    archives = [Archive("calibration", calibration_archive(d)) for d in dates]
    archives += [Archive("drive", drive_archive(d)) for d in drives]
    if "annotated" in options.extras:
        chosen = drives if annotated_drives is None else annotated_drives
        names = tuple(sorted(d.split("/")[1] for d in chosen))
        archives.append(Archive("annotated", "data_depth_annotated.zip",
                                EXTRA_FOLDERS["annotated"], names, select_at=1))
    if "odometry" in options.extras:
        sequences = tuple(f"{s:02d}" for s in sorted(options.odometry_sequences))
        archives.append(Archive("odometry", "data_odometry_color.zip",
                                EXTRA_FOLDERS["odometry"], sequences, select_at=2))
        archives.append(Archive("odometry", "data_odometry_poses.zip",
                                EXTRA_FOLDERS["odometry"]))
    if "semantics" in options.extras:
        archives.append(Archive("semantics", "data_semantics.zip", EXTRA_FOLDERS["semantics"]))
    return archives


def _image_present(root: Path, folder: str, camera: str, frame: int) -> bool:
    base = root / folder / camera / "data" / frame_name(frame)
    return any(base.with_suffix(f".{ext}").is_file() for ext in IMAGE_EXTENSIONS)


def drives_on_disk(root: Path, splits: SplitFiles, offsets: Sequence[int]) -> set[str]:
    """Drives whose every file the split files read is already on disk (a copy made by other
    means): every image of each line's frames (`offsets`), and for test files the scans."""
    complete: dict[str, bool] = {}
    for split_file, entries in splits.entries.items():
        test = split_file.name.startswith("test")
        for entry in entries:
            if not complete.get(entry.folder, True):
                continue
            ok = all(_image_present(root, entry.folder, entry.camera, entry.frame + o)
                     for o in ([0] if test else offsets))
            if ok and test:
                ok = (root / entry.folder / "velodyne_points" / "data"
                      / f"{frame_name(entry.frame)}.bin").is_file()
            complete[entry.folder] = ok
    return {folder for folder, ok in complete.items() if ok}


