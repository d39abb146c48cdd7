"""Make what a KITTI split needs present under data.root (docs/design.md section 4.3).

`prepare_kitti(data_config)` runs from `KittiDataModule.prepare_data` with
``data.download=true`` and from ``python -m fsre_lightning.prepare_kitti``:

1. **Split files**: every published split folder named (``data.split_dir`` itself, and the
   siblings in ``data.prepare.splits``: eigen_zhou, eigen, eigen_benchmark, odom) that holds no
   ``*_files.txt`` is fetched from ``data.prepare.splits_url`` (Monodepth2's ``splits/``, or a
   local folder of the same layout).
2. **Archives**: the drives the raw split files name, and each of their days' calibration, from
   KITTI's archive server (``data.prepare.archive_url``, or a local folder of the same
   layout). The drive-to-archive rule (`drive_archive`) is KITTI's own naming:
   ``2011_09_26/2011_09_26_drive_0001_sync`` is ``raw_data/2011_09_26_drive_0001/
   2011_09_26_drive_0001_sync.zip``, day ``2011_09_26`` is ``raw_data/2011_09_26_calib.zip``;
   both unpack into the raw layout under data.root. ``data.prepare.extras`` adds the
   annotated depth maps (only the split's drives are unpacked), the odometry colour images of
   ``data.prepare.odometry_sequences`` with the poses, and the KITTI 2015 semantics.
3. **JPEG** (``data.prepare.jpeg``): the left and right colour frames converted as the field
   does (quality 92, 4:2:0), PNG removed, the space saved reported.
4. **Pseudo-labels** (``data.prepare.pseudo_labels``): predicted for the train and val splits
   with a Cityscapes segmentation model (`label_caches.predict_labels`), or imported from the
   label PNGs under data.label_dir (`label_caches.import_labels`).

Downloads, verification, extraction and locking: `fsre_lightning.data.downloads`. A finished
archive leaves ``<root>/.downloads/<archive>.done.json``; a drive whose every file the splits
read is already on disk (a copy unpacked by hand) is not fetched again. Run again, the whole
preparation of a complete root touches no network and takes seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fsre_lightning.data import downloads
from fsre_lightning.data.downloads import DataError, human_bytes
from fsre_lightning.data.kitti_layout import CALIB_FILES
from fsre_lightning.data.kitti_sources import (
    KITTI_ARCHIVE_URL,
    Archive,
    DataSettings,
    KittiPrepareConfig,
    SplitFiles,
    drives_on_disk,
    ensure_split_files,
    needed_drives,
    plan_archives,
    source_hint,
    test_drives,
)

log = logging.getLogger(__name__)

STAGING = ".downloads"  # under data.root: partial downloads, locks, completion records
JPEG_QUALITY = 92
JPEG_SUBSAMPLING = 2  # Pillow's 4:2:0
COLOUR_CAMERAS = ("image_02", "image_03")

# ------------------------------------------------------------------------- what is there
def _marker(staging: Path, archive: Archive) -> Path:
    return staging / f"{archive.name}.done.json"


def is_done(staging: Path, archive: Archive) -> bool:
    """The archive was unpacked completely (with at least the members now wanted)."""
    path = _marker(staging, archive)
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    had = record.get("members")
    return had is None or (archive.members is not None and set(archive.members) <= set(had))


def _calibration_present(root: Path, archive: Archive) -> bool:
    date = archive.name.removesuffix("_calib.zip")
    return all((root / date / name).is_file() for name in CALIB_FILES)


@dataclass
class Item:
    """An archive and what is to be done with it: done, on_disk (found, not ours), local (a
    zip in a local mirror), verified (a checked zip waits in the staging folder), partial
    (a part of `have` bytes) or fetch."""

    archive: Archive
    url: str
    state: str
    size: int | None = None
    have: int = 0
    unpacked: bool = False  # by this run (another process may have done it meanwhile)

    @property
    def todo(self) -> bool:
        return self.state not in ("done", "on_disk")


@dataclass
class Plan:
    """What `prepare_kitti` found and did."""

    root: Path
    splits: SplitFiles
    drives: list[str]
    items: list[Item]
    free: int = 0
    fetched_bytes: int = 0
    jpeg_saved: int = 0
    jpeg_converted: int = 0
    labels: list[str] = field(default_factory=list)
    keep_archives: bool = False

    @property
    def download_bytes(self) -> int:
        return sum(max((i.size or 0) - i.have, 0) for i in self.items
                   if i.todo and i.state != "local")

    @property
    def disk_needed(self) -> int:
        """Downloads, plus the unpacked files (about an archive's size: PNG and scans hardly
        compress); archives are deleted once unpacked (unless kept), so one waits at a time."""
        todo = [i for i in self.items if i.todo]
        unpacked = sum(i.size or 0 for i in todo)
        left = [max((i.size or 0) - i.have, 0) for i in todo if i.state != "local"]
        return unpacked + (sum(left) if self.keep_archives else max(left, default=0))


def _archive_url(options: KittiPrepareConfig, archive: Archive) -> str:
    if downloads.is_url(options.archive_url):
        return downloads.join_url(options.archive_url, archive.path)
    return str(downloads.local_path(options.archive_url) / archive.path)


def _inspect(root: Path, staging: Path, archive: Archive, options: KittiPrepareConfig,
             on_disk: set[str]) -> Item:
    url = _archive_url(options, archive)
    if is_done(staging, archive):
        return Item(archive, url, "done")
    if archive.kind == "drive" and _drive_of(archive) in on_disk:
        return Item(archive, url, "on_disk")
    if archive.kind == "calibration" and _calibration_present(root, archive):
        return Item(archive, url, "on_disk")
    if not downloads.is_url(options.archive_url):
        path = Path(url)
        if not path.is_file():
            raise DataError(f"archive {path} not found: data.prepare.archive_url="
                            f"{options.archive_url!r} must hold KITTI's archive layout "
                            "(raw_data/<drive>/<drive>_sync.zip ...), or be KITTI's URL "
                            f"{KITTI_ARCHIVE_URL}")
        return Item(archive, url, "local", path.stat().st_size)
    if (staging / archive.name).is_file():
        size = (staging / archive.name).stat().st_size
        return Item(archive, url, "verified", size, size)
    part = staging / f"{archive.name}.part"
    if part.is_file():
        return Item(archive, url, "partial", have=part.stat().st_size)
    return Item(archive, url, "fetch")


def _drive_of(archive: Archive) -> str:
    stem = archive.name.removesuffix(".zip")  # <date>_drive_<NNNN>_sync
    return f"{stem[:10]}/{stem}"


def _sizes(items: Sequence[Item], options: KittiPrepareConfig) -> None:
    """HEAD every archive still to fetch, a few at a time (KITTI has ~65 for Eigen)."""
    remote = [i for i in items if i.state in ("fetch", "partial")]
    hint = source_hint("archive_url", KITTI_ARCHIVE_URL)

    def head(item: Item) -> None:
        item.size = downloads.remote_size(item.url, hint, timeout=options.timeout,
                                          retries=min(options.retries, 2),
                                          backoff=options.backoff)

    with ThreadPoolExecutor(options.workers) as pool:
        list(pool.map(head, remote))


# --------------------------------------------------------------------------------- work
def _present_rule(archive: Archive) -> Callable[[Path, zipfile.ZipInfo], bool]:
    """A member counts as extracted when its file has its full size, or when it is a colour
    frame already converted to JPEG."""

    def present(target: Path, info: zipfile.ZipInfo) -> bool:
        if downloads.same_size(target, info):
            return True
        return (archive.kind == "drive" and target.suffix == ".png"
                and target.with_suffix(".jpg").is_file())

    return present


def _fetch_verified(item: Item, staging: Path, options: KittiPrepareConfig,
                    transfers: downloads.Transfers) -> Path:
    """The archive's zip in the staging folder, downloaded and CRC-checked; a corrupt one is
    fetched again once."""
    final = staging / item.archive.name
    if final.is_file():
        return final
    part = staging / f"{item.archive.name}.part"
    hint = source_hint("archive_url", KITTI_ARCHIVE_URL)
    for attempt in (1, 2):
        if item.size is not None:
            have = part.stat().st_size if part.exists() else 0
            downloads.check_free_space(staging, item.size - have + item.size,
                                       f"{item.archive.name} (download and unpacking)")
        downloads.download(item.url, part, hint=hint, retries=options.retries,
                           backoff=options.backoff, timeout=options.timeout,
                           transfers=transfers)
        problem = downloads.zip_problem(part)
        if problem is None:
            os.replace(part, final)
            return final
        part.unlink()
        if attempt == 2:
            raise DataError(f"{item.url} is a corrupt archive twice in a row ({problem}; "
                            f"deleted): the server or a proxy on the way damages it; try again "
                            f"later, or download it by other means into {staging} and run the "
                            "same command again")
        log.warning("%s: %s; fetching it again once", item.url, problem)
    raise AssertionError("unreachable")  # pragma: no cover


def _unpack(item: Item, root: Path, staging: Path, options: KittiPrepareConfig,
            transfers: downloads.Transfers) -> int:
    """Fetch (unless local), check and unpack one archive; record it done. Returns the bytes
    downloaded."""
    archive = item.archive
    before = 0
    if item.state == "local":
        zip_path = Path(item.url)
        problem = downloads.zip_problem(zip_path)
        if problem is not None:
            raise DataError(f"{zip_path} is a corrupt archive ({problem}): replace it with an "
                            "intact copy from KITTI")
    else:
        part = staging / f"{archive.name}.part"
        before = part.stat().st_size if part.exists() else 0
        zip_path = _fetch_verified(item, staging, options, transfers)
    fetched = 0 if item.state in ("local", "verified") else max(
        zip_path.stat().st_size - before, 0)
    started = time.monotonic()
    written, skipped = downloads.extract(zip_path, root / archive.dest, archive.keeps,
                                         _present_rule(archive))
    record = {"url": item.url, "bytes": zip_path.stat().st_size,
              "members": list(archive.members) if archive.members is not None else None,
              "files": len(written) + skipped}
    tmp = _marker(staging, archive).with_suffix(".part")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, _marker(staging, archive))
    if item.state != "local" and not options.keep_archives:
        zip_path.unlink()
    log.info("%s: %d files unpacked into %s (%d already there) in %.0f s", archive.name,
             len(written), root / archive.dest, skipped, time.monotonic() - started)
    return fetched


def to_jpeg(png: Path) -> int:
    """Replace `png` by a JPEG of quality 92 with 4:2:0 chroma (the field's conversion);
    returns the bytes saved. Written beside it first, then renamed: never a short .jpg."""
    from PIL import Image

    jpg = png.with_suffix(".jpg")
    tmp = png.with_name(f".{png.stem}.jpg.part")
    with Image.open(png) as image:
        image.convert("RGB").save(tmp, "JPEG", quality=JPEG_QUALITY,
                                  subsampling=JPEG_SUBSAMPLING)
    os.replace(tmp, jpg)
    saved = png.stat().st_size - jpg.stat().st_size
    png.unlink()
    return saved


def convert_drives(root: Path, drives: Iterable[str], workers: int) -> tuple[int, int]:
    """Every colour PNG of the drives as JPEG; returns (files converted, bytes saved)."""
    pngs = [p for d in drives for cam in COLOUR_CAMERAS
            for p in sorted((root / d / cam / "data").glob("*.png"))]
    if not pngs:
        return 0, 0
    try:
        with ThreadPoolExecutor(workers) as pool:  # Pillow's codecs release the GIL
            saved = sum(pool.map(to_jpeg, pngs))
    except OSError as err:
        if err.errno in downloads.NO_SPACE:
            raise downloads.no_space_error(root, err) from None
        raise DataError(f"JPEG conversion under {root} failed ({type(err).__name__}: "
                        f"{err}): a frame is damaged; delete its drive's "
                        f"{STAGING}/*.done.json record and prepare again") from None
    return len(pngs), saved


def make_pseudo_labels(cfg: DataSettings, progress: bool) -> list[str]:
    """The pseudo-label caches of the train and val splits, as data.prepare.pseudo_labels
    says; returns what was written."""
    from fsre_lightning.data.label_caches import import_labels, predict_labels

    options = cfg.prepare
    root = Path(cfg.root)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else root / "cache"
    size = (cfg.height, cfg.width)
    done = []
    for split in (cfg.train_split, cfg.val_split):
        split_file = Path(cfg.split_dir) / f"{split}_files.txt"
        if not split_file.is_file():
            continue
        if options.pseudo_labels == "predict":
            cache = predict_labels(root, split_file, cache_dir, size, model=options.label_model,
                                   device=options.label_device, allow_download=True,
                                   img_ext=cfg.img_ext, progress=progress)
        else:
            cache = import_labels(root, split_file, cache_dir, size,
                                  label_root=Path(cfg.label_dir) if cfg.label_dir else None,
                                  label_format=cfg.label_format, img_ext=cfg.img_ext,
                                  progress=progress)
        done.append(f"{cache.path} ({len(cache)} frames)")
    return done


def _check_could_write(root: Path) -> None:
    """What a dry run can tell without writing: root, or the folder it would be made in, is a
    writable folder."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise DataError(f"data.root={str(root)!r} cannot be written ({existing} is not a "
                        "writable folder): choose a folder you can write to, or fix its "
                        "permissions")


def prepare_kitti(cfg: DataSettings, dry_run: bool = False, progress: bool | None = None
                  ) -> Plan:
    """Make what `cfg`'s splits need present under cfg.root (module docstring); with
    `dry_run`, only find out what that would take (nothing written, no archive fetched), and
    refuse when the disk cannot hold it. `progress`: bars (default: when stderr is a
    terminal)."""
    options = cfg.prepare
    root = Path(cfg.root)
    staging = root / STAGING
    if progress is None:
        progress = sys.stderr.isatty()
    if dry_run:
        _check_could_write(root)
        # Its locks in a temporary folder: a dry run writes nothing under root.
        with tempfile.TemporaryDirectory(prefix="fsre-prepare-") as tmp:
            splits = ensure_split_files(cfg, Path(tmp), dry_run=True)
    else:
        downloads.check_writable_folder(root)
        staging.mkdir(exist_ok=True)
        splits = ensure_split_files(cfg, staging, dry_run=False)
    drives = needed_drives(splits)
    offsets = sorted(set(cfg.frame_ids))
    on_disk = drives_on_disk(root, splits, offsets)
    archives = plan_archives(drives, options, test_drives(splits) or drives)
    items = [_inspect(root, staging, a, options, on_disk) for a in archives]
    _sizes(items, options)
    plan = Plan(root, splits, drives, items, free=downloads.free_bytes(root),
                keep_archives=options.keep_archives)
    if dry_run:
        return plan
    if plan.disk_needed > plan.free:
        downloads.check_free_space(root, plan.disk_needed, f"the {sum(i.todo for i in items)} "
                                   f"archives left ({human_bytes(plan.download_bytes)} to "
                                   "download)")
    todo = [i for i in items if i.todo]
    with downloads.Transfers(plan.download_bytes or None, enabled=progress and bool(todo)
                             ) as transfers:
        for item in todo:
            with downloads.exclusive(staging / f"{item.archive.name}.lock", item.archive.name):
                if is_done(staging, item.archive):  # another process finished it meanwhile
                    continue
                plan.fetched_bytes += _unpack(item, root, staging, options, transfers)
                item.unpacked = True
    if options.jpeg:
        with downloads.exclusive(staging / "jpeg.lock", "the JPEG conversion"):
            plan.jpeg_converted, plan.jpeg_saved = convert_drives(root, drives,
                                                                  options.workers)
        if plan.jpeg_converted:
            log.info("converted %d frames to JPEG (quality %d, 4:2:0): %s saved",
                     plan.jpeg_converted, JPEG_QUALITY, human_bytes(plan.jpeg_saved))
    if options.pseudo_labels:
        plan.labels = make_pseudo_labels(cfg, progress)
    return plan


# -------------------------------------------------------------------------------- report
_STATES = {"done": "unpacked", "on_disk": "on disk", "local": "to unpack (local copy)",
           "verified": "to unpack (downloaded)", "partial": "to resume", "fetch": "to fetch"}


def format_plan(plan: Plan, dry_run: bool) -> str:
    """The table a dry run prints (and the summary of a real run)."""
    lines = []
    if dry_run:
        lines.append(f"prepare KITTI under {plan.root} (dry run: nothing is fetched or written)")
    fetched = [str(p) for p in plan.splits.fetched]
    if fetched:
        verb = "would write" if dry_run else "wrote"
        lines.append(f"split files: {verb} {len(fetched)}: {', '.join(fetched)}")
    days = len({d.split("/")[0] for d in plan.drives})
    lines.append(f"split folders: {', '.join(str(f) for f in plan.splits.folders)} -> "
                 f"{len(plan.drives)} drive{'s' * (len(plan.drives) != 1)} of {days} "
                 f"day{'s' * (days != 1)}")
    width = max((len(i.archive.path) for i in plan.items), default=10)
    if dry_run:
        lines.append(f"  {'archive':<{width}}  {'size':>9}  state")
        for item in plan.items:
            size = human_bytes(item.size) if item.size is not None else "?"
            state = _STATES[item.state] + (f" ({human_bytes(item.have)} fetched)"
                                           if item.state == "partial" else "")
            lines.append(f"  {item.archive.path:<{width}}  {size:>9}  {state}")
    todo = [i for i in plan.items if i.todo]
    if dry_run:
        unknown = sum(1 for i in todo if i.size is None)
        lines.append(
            f"{len(plan.items)} archives, {len(todo)} to unpack: "
            f"{human_bytes(plan.download_bytes)} to download, about "
            f"{human_bytes(plan.disk_needed)} of disk needed"
            + (f" ({unknown} of unknown size)" if unknown else "")
            + f"; {human_bytes(plan.free)} free on {plan.root}")
    else:
        now = sum(i.unpacked for i in plan.items)
        lines.append(f"{len(plan.items)} archives: {now} unpacked now "
                     f"({human_bytes(plan.fetched_bytes)} downloaded), "
                     f"{len(plan.items) - now} were already there")
    if not dry_run and plan.jpeg_converted:
        lines.append(f"JPEG: {plan.jpeg_converted} frames converted (quality {JPEG_QUALITY}, "
                     f"4:2:0), {human_bytes(plan.jpeg_saved)} saved")
    lines.extend(f"pseudo-labels: {label}" for label in plan.labels)
    return "\n".join(lines)
