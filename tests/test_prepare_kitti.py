"""KITTI made present by `data.download=true` / `python -m fsre_lightning.prepare_kitti`, against
an archive server on 127.0.0.1 that the tests start (`testing.kitti_server`): never the internet.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image, JpegImagePlugin

from fsre_lightning import evaluate, export_gt, prepare_kitti, train
from fsre_lightning.config import validate_config
from fsre_lightning.data import KittiDataModule, downloads, kitti_prepare
from fsre_lightning.data.kitti_layout import read_split
from fsre_lightning.data.kitti_sources import (
    KittiPrepareConfig,
    SplitFiles,
    calibration_archive,
    drive_archive,
    needed_drives,
    plan_archives,
)
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.testing import closed_port, command_env, compose_config, run_main
from fsre_lightning.testing.kitti_server import (
    DATE,
    DRIVE,
    ArchiveServer,
    build_archives,
    make_raw_tree,
    write_published_splits,
    zip_tree,
)

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample"
CALIB = calibration_archive(DATE)
DRIVE_ZIP = drive_archive(DRIVE)
LINES = [f"{DRIVE} {f} l" for f in range(1, 5)]  # frames 0..5 exist: -1 and +1 of each
ODOM = {name: ["9 0 l"] for name in ("train_files.txt", "val_files.txt", "test_files_09.txt",
                                      "test_files_10.txt")}


def published_splits(lines: list[str], test_lines: list[str] | None = None
                     ) -> dict[str, dict[str, list[str]]]:
    test = test_lines or lines
    return {"eigen_zhou": {"train_files.txt": lines, "val_files.txt": lines},
            "eigen": {"test_files.txt": test}, "eigen_benchmark": {"test_files.txt": test[:1]},
            "odom": ODOM}


@pytest.fixture(scope="module")
def served(module_tmp: Callable[[str], Path]) -> Path:
    """KITTI's archive layout of a tiny raw tree (one day, one drive of 6 frames) and
    Monodepth2's split folders naming its frames, ready to serve."""
    base = module_tmp("served")
    raw = make_raw_tree(base / "raw")
    build_archives(raw, base / "site")
    write_published_splits(base / "site" / "splits", published_splits(LINES))
    return base / "site"


@pytest.fixture
def server(served: Path) -> Any:
    with ArchiveServer(served) as running:
        yield running


def args(tmp_path: Path, server: ArchiveServer, *extra: str) -> list[str]:
    return [f"data.root={tmp_path / 'kitti'}",
            f"data.split_dir={tmp_path / 'splits' / 'eigen_zhou'}",
            f"data.prepare.archive_url={server.url}",
            f"data.prepare.splits_url={server.url}/splits", "data.prepare.backoff=0.01",
            "data.prepare.retries=2", "progress=false", *extra]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def archive_gets(server: ArchiveServer) -> dict[str, int]:
    return {path: n for path, n in server.gets.items() if path.endswith(".zip")}


# ---------------------------------------------------------------- the drive-to-archive rule
# Lines of Monodepth2's eigen_zhou/train_files.txt and eigen/test_files.txt, and the archive URLs
# of its kitti_archives_to_download.txt (KITTI's names): the rule derives the one from the other.
REAL_LINES = {
    "2011_09_26/2011_09_26_drive_0022_sync 473 r":
        "2011_09_26_drive_0022/2011_09_26_drive_0022_sync",
    "2011_09_29/2011_09_29_drive_0026_sync 1 l":
        "2011_09_29_drive_0026/2011_09_29_drive_0026_sync",
    "2011_09_26/2011_09_26_drive_0002_sync 0000000069 l":
        "2011_09_26_drive_0002/2011_09_26_drive_0002_sync",
    "2011_10_03/2011_10_03_drive_0047_sync 10 l":
        "2011_10_03_drive_0047/2011_10_03_drive_0047_sync",
}
KITTI_RAW = "https://s3.eu-central-1.amazonaws.com/avg-kitti/raw_data"


def test_split_drives_map_to_the_archives_kitti_publishes(tmp_path: Path) -> None:
    split = tmp_path / "eigen" / "test_files.txt"
    split.parent.mkdir()
    split.write_text("".join(f"{line}\n" for line in REAL_LINES))
    splits = SplitFiles([split.parent], [split],
                                      entries={split: read_split(split)})
    drives = needed_drives(splits)
    archives = plan_archives(drives, KittiPrepareConfig())
    urls = [kitti_prepare._archive_url(KittiPrepareConfig(), a) for a in archives]
    assert urls == [f"{KITTI_RAW}/{day}_calib.zip" for day in
                    ("2011_09_26", "2011_09_29", "2011_10_03")] + [
        f"{KITTI_RAW}/{name}.zip" for name in REAL_LINES.values()]
    with pytest.raises(DataError, match=r"'9' is not a KITTI raw drive folder"):
        split.write_text("9 0 l\n")
        needed_drives(SplitFiles(
            [split.parent], [split], entries={split: read_split(split)}))


MONODEPTH2 = os.environ.get("FSRE_MONODEPTH2")


@pytest.mark.skipif(not MONODEPTH2, reason="FSRE_MONODEPTH2 (a checkout of "
                                           "nianticlabs/monodepth2) not set")
def test_eigen_zhou_and_eigen_need_monodepth2s_archive_list() -> None:
    """With Monodepth2's own files: every drive of eigen_zhou + eigen maps to a URL of its
    kitti_archives_to_download.txt, and the derived list is that list but for the one drive
    no split names (2011_09_26_drive_0060, which only eigen_full uses)."""
    splits_dir = Path(str(MONODEPTH2)) / "splits"
    files = [splits_dir / "eigen_zhou" / "train_files.txt",
             splits_dir / "eigen_zhou" / "val_files.txt", splits_dir / "eigen" / "test_files.txt"]
    splits = SplitFiles([], files, entries={
        f: read_split(f) for f in files})
    archives = plan_archives(needed_drives(splits),
                                           KittiPrepareConfig())
    derived = {kitti_prepare._archive_url(KittiPrepareConfig(), a) for a in archives}
    published = set((splits_dir / "kitti_archives_to_download.txt").read_text().split())
    assert derived <= published
    assert published - derived == {f"{KITTI_RAW}/2011_09_26_drive_0060/"
                                   "2011_09_26_drive_0060_sync.zip"}
    assert len(derived) == 65  # 60 drives of 5 days


# --------------------------------------------------------------------------- downloading
def test_prepare_fetches_splits_and_archives_and_resumes_a_cut_download(
        tmp_path: Path, server: ArchiveServer) -> None:
    # The line drops 150 kB into the drive's archive (of 244 kB).
    server.faults[DRIVE_ZIP] = [("cut", 150_000)]
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "kitti"
    # The download resumed where it broke (less the read in progress, 64 kB at most), and the
    # archive passed its CRC check.
    assert archive_gets(server) == {CALIB: 1, DRIVE_ZIP: 2}
    (start,) = server.range_starts[DRIVE_ZIP]
    assert 150_000 - downloads.DOWNLOAD_CHUNK <= start <= 150_000
    frames = sorted((root / DRIVE / "image_02" / "data").iterdir())
    assert [p.name for p in frames] == [f"{f:010d}.png" for f in range(6)]
    assert (root / DATE / "calib_cam_to_cam.txt").is_file()
    # Split files of the four published splits; no archive or part left behind.
    for split, names in published_splits(LINES).items():
        assert sorted(p.name for p in (tmp_path / "splits" / split).iterdir()) == sorted(names)
    left = sorted(p.name for p in (root / ".downloads").iterdir())
    assert not [n for n in left if n.endswith((".zip", ".part"))], left
    assert "1 archives" not in result.stdout and "2 archives: 2 unpacked now" in result.stdout

    # Run again: everything is there; no request at all.
    before = dict(server.gets)
    again = run_main(prepare_kitti.main, args(tmp_path, server))
    assert again.returncode == 0 and "2 were already there" in again.stdout
    assert dict(server.gets) == before and not server.heads.get(DRIVE_ZIP, 0) > 1


def test_a_missing_archive_is_one_line_naming_the_url(tmp_path: Path,
                                                      server: ArchiveServer) -> None:
    server.status[DRIVE_ZIP] = 404
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("fsre_lightning.prepare_kitti: error: ")
    assert f"{server.url}/{DRIVE_ZIP} answered HTTP 404" in line
    assert "data.prepare.archive_url" in line
    assert not archive_gets(server)  # found by the size query, before any download


def test_a_missing_split_file_is_one_line_naming_the_url(tmp_path: Path,
                                                         server: ArchiveServer) -> None:
    server.status["splits/eigen/test_files.txt"] = 404
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    line = one_line(result.stderr)
    assert result.returncode == 2 and "splits/eigen/test_files.txt answered HTTP 404" in line
    assert "data.prepare.splits_url" in line
    assert not (tmp_path / "splits" / "eigen").exists()  # no half-written split folder


def test_a_corrupt_archive_is_fetched_again_once_then_refused(tmp_path: Path,
                                                              server: ArchiveServer) -> None:
    server.faults[DRIVE_ZIP] = [("corrupt", 0)]
    ok = run_main(prepare_kitti.main, args(tmp_path / "a", server))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert archive_gets(server)[DRIVE_ZIP] == 2
    assert (tmp_path / "a" / "kitti" / DRIVE / "image_02" / "data" / "0000000005.png").is_file()

    server.gets.clear()
    server.faults[DRIVE_ZIP] = [("corrupt", 0), ("corrupt", 0)]
    bad = run_main(prepare_kitti.main, args(tmp_path / "b", server))
    assert bad.returncode == 2 and archive_gets(server)[DRIVE_ZIP] == 2
    line = one_line(bad.stderr)
    assert f"{server.url}/{DRIVE_ZIP} is a corrupt archive twice in a row" in line
    assert "CRC" in line or "not a readable zip" in line
    root = tmp_path / "b" / "kitti"
    assert not (root / DRIVE).exists()  # nothing of it unpacked
    # nor kept as if it were good
    assert not [p for p in (root / ".downloads").iterdir() if p.name.endswith((".zip", ".part"))]


def test_a_connection_that_keeps_failing_keeps_what_was_fetched(tmp_path: Path,
                                                                server: ArchiveServer) -> None:
    server.faults[DRIVE_ZIP] = [("cut", 150_000)] + [("status", 503)] * 3
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    assert result.returncode == 2
    part = tmp_path / "kitti" / ".downloads" / f"{Path(DRIVE_ZIP).name}.part"
    line = one_line(result.stderr)
    assert f"could not download {server.url}/{DRIVE_ZIP}: HTTP 503 (3 attempts" in line
    kept = part.stat().st_size
    assert kept > 0 and f"{downloads.human_bytes(kept)} fetched so far are kept in {part}" in line
    # The network is back: the next run resumes from the bytes kept.
    again = run_main(prepare_kitti.main, args(tmp_path, server))
    assert again.returncode == 0, again.stderr[-3000:]
    assert server.range_starts[DRIVE_ZIP][-1] == kept and not part.exists()


def test_no_server_is_one_line_after_the_retries(tmp_path: Path, server: ArchiveServer) -> None:
    closed = closed_port()
    result = run_main(prepare_kitti.main, [*args(tmp_path, server),
                                           f"data.prepare.archive_url=http://127.0.0.1:{closed}"])
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert f"cannot reach http://127.0.0.1:{closed}/{CALIB}" in line
    assert "Connection refused" in line and "check the network" in line


def test_a_full_disk_is_one_line_keeping_what_was_fetched(
        tmp_path: Path, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real = requests.models.Response.iter_content

    def fill_up(self: Any, *a: Any, **k: Any) -> Any:
        for i, chunk in enumerate(real(self, *a, **k)):
            if i == 0 and self.url.endswith(DRIVE_ZIP):
                yield chunk[:4096]
                raise OSError(errno.ENOSPC, "No space left on device")
            yield chunk

    monkeypatch.setattr(requests.models.Response, "iter_content", fill_up)
    server.faults[DRIVE_ZIP] = []
    result = run_main(prepare_kitti.main, [*args(tmp_path, server), "data.prepare.workers=1"])
    line = one_line(result.stderr)
    part = tmp_path / "kitti" / ".downloads" / f"{Path(DRIVE_ZIP).name}.part"
    assert result.returncode == 2 and f"the disk is full writing {part}" in line
    assert "free some space or point data.root at a larger disk" in line
    assert "4.1 kB fetched so far are kept" in line and part.stat().st_size == 4096


def test_not_enough_disk_is_refused_before_downloading(
        tmp_path: Path, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downloads, "free_bytes", lambda path: 1000)
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    line = one_line(result.stderr)
    assert result.returncode == 2 and "not enough free disk for the 2 archives left" in line
    assert "1.0 kB free" in line and not archive_gets(server)


def test_an_unwritable_root_is_one_line(tmp_path: Path, server: ArchiveServer) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = run_main(prepare_kitti.main, [*args(tmp_path, server),
                                           f"data.root={tmp_path / 'file' / 'kitti'}"])
    line = one_line(result.stderr)
    assert result.returncode == 2
    assert f"data.root='{tmp_path / 'file' / 'kitti'}' cannot be written" in line
    assert not server.gets
    dry = run_main(prepare_kitti.main, [*args(tmp_path, server), "dry_run=true",
                                        f"data.root={tmp_path / 'file' / 'kitti'}"])
    assert dry.returncode == 2 and "cannot be written" in one_line(dry.stderr)


def test_dry_run_fetches_nothing_and_refuses_what_does_not_fit(
        tmp_path: Path, server: ArchiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_main(prepare_kitti.main, [*args(tmp_path, server), "dry_run=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "dry run: nothing is fetched or written" in out
    size = (Path(server.folder) / DRIVE_ZIP).stat().st_size
    assert f"{DRIVE_ZIP}  {downloads.human_bytes(size):>9}  to fetch" in out
    assert "2 archives, 2 to unpack" in out and "free on" in out
    assert not archive_gets(server) and server.heads[DRIVE_ZIP] == 1
    assert not (tmp_path / "kitti").exists() and not (tmp_path / "splits").exists()

    monkeypatch.setattr(downloads, "free_bytes", lambda path: 1000)
    small = run_main(prepare_kitti.main, [*args(tmp_path, server), "dry_run=true"])
    assert small.returncode == 2 and "to fetch" in small.stdout  # the table, then the refusal
    assert "not enough free disk for the 2 archives to unpack" in one_line(small.stderr)


def test_drives_unpacked_by_hand_are_not_fetched_again(tmp_path: Path, server: ArchiveServer,
                                                       served: Path) -> None:
    make_raw_tree(tmp_path / "kitti")  # the files the splits read, without any record of ours
    result = run_main(prepare_kitti.main, args(tmp_path, server))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not archive_gets(server) and "2 were already there" in result.stdout


def test_jpeg_frames_at_quality_92_and_420_and_the_space_saved(
        tmp_path: Path, server: ArchiveServer) -> None:
    result = run_main(prepare_kitti.main, [*args(tmp_path, server), "data.prepare.jpeg=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "kitti" / DRIVE / "image_02" / "data"
    assert sorted(p.name for p in folder.iterdir()) == [f"{f:010d}.jpg" for f in range(6)]
    assert "JPEG: 6 frames converted (quality 92, 4:2:0)" in result.stdout
    with Image.open(folder / "0000000002.jpg") as jpg:
        assert JpegImagePlugin.get_sampling(jpg) == 2  # 4:2:0
        reference = tmp_path / "q92.jpg"
        Image.new("RGB", (16, 16)).save(reference, quality=92, subsampling=2)
        with Image.open(reference) as ref:
            assert jpg.quantization == ref.quantization
    # The data module reads them (img_ext=auto); a second run converts nothing and fetches none.
    dm = KittiDataModule(tmp_path / "kitti", tmp_path / "splits" / "eigen_zhou", height=64,
                         width=192, num_workers=0, use_labels=False, frame_cache=False)
    dm.setup("fit")
    assert dm.datasets["train"][0]["frames"].shape == (3, 3, 64, 192)
    gets = dict(server.gets)
    assert run_main(prepare_kitti.main, [*args(tmp_path, server),
                                         "data.prepare.jpeg=true"]).returncode == 0
    assert dict(server.gets) == gets and not list(folder.glob("*.png"))


def test_local_folders_as_sources_are_unpacked_in_place(tmp_path: Path, served: Path) -> None:
    result = run_main(prepare_kitti.main, [
        f"data.root={tmp_path / 'kitti'}", f"data.split_dir={tmp_path / 'splits' / 'eigen'}",
        f"data.prepare.archive_url={served}", f"data.prepare.splits_url={served / 'splits'}",
        "data.prepare.splits=[]", "progress=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "kitti" / DRIVE / "velodyne_points" / "data" / "0000000004.bin").is_file()
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["eigen"]
    assert (served / DRIVE_ZIP).is_file()  # the local archive stays where it is


def test_extras_unpack_only_what_the_splits_need(tmp_path: Path, module_tmp: Any) -> None:
    site = tmp_path / "site"
    raw = make_raw_tree(tmp_path / "raw")
    build_archives(raw, site)
    write_published_splits(site / "splits", published_splits(LINES))
    other = "2011_09_26_drive_0099_sync"  # a drive no split names
    extra = tmp_path / "extra"
    for subset, drive in (("train", f"{DATE}_drive_0001_sync"), ("val", other)):
        path = extra / "annotated" / subset / drive / "proj_depth" / "groundtruth" / "image_02"
        path.mkdir(parents=True)
        (path / "0000000001.png").write_bytes(b"png")
    zip_tree(site / "data_depth_annotated.zip", extra / "annotated",
             [p for p in (extra / "annotated").rglob("*") if p.is_file()])
    for seq in ("00", "09", "10"):
        image = extra / "odometry" / "dataset" / "sequences" / seq / "image_2" / "000000.png"
        image.parent.mkdir(parents=True)
        image.write_bytes(b"png")
    (extra / "poses" / "dataset" / "poses").mkdir(parents=True)
    (extra / "poses" / "dataset" / "poses" / "09.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n")
    zip_tree(site / "data_odometry_color.zip", extra / "odometry",
             [p for p in (extra / "odometry").rglob("*") if p.is_file()])
    zip_tree(site / "data_odometry_poses.zip", extra / "poses",
             [p for p in (extra / "poses").rglob("*") if p.is_file()])
    (extra / "sem" / "training" / "semantic").mkdir(parents=True)
    (extra / "sem" / "training" / "semantic" / "000000_10.png").write_bytes(b"png")
    zip_tree(site / "data_semantics.zip", extra / "sem", [
        extra / "sem" / "training" / "semantic" / "000000_10.png"])
    with ArchiveServer(site) as server:
        result = run_main(prepare_kitti.main, [*args(tmp_path, server),
                                               "data.prepare.extras=[annotated,odometry,semantics]"])
        assert result.returncode == 0, result.stderr[-3000:]
        root = tmp_path / "kitti"
        annotated = sorted(p.relative_to(root / "data_depth_annotated").parts[:2] for p in
                           (root / "data_depth_annotated").rglob("*.png"))
        assert annotated == [("train", f"{DATE}_drive_0001_sync")]
        sequences = sorted(p.name for p in (root / "odometry/dataset/sequences").iterdir())
        assert sequences == ["09", "10"]
        assert (root / "odometry/dataset/poses/09.txt").is_file()
        assert (root / "data_semantics/training/semantic/000000_10.png").is_file()
        # Sequence 00 asked later: its archive again, the others not.
        server.gets.clear()
        more = run_main(prepare_kitti.main, [*args(tmp_path, server), "data.prepare.extras="
                                             "[odometry]", "data.prepare.odometry_sequences=[0]"])
        assert more.returncode == 0 and archive_gets(server) == {"data_odometry_color.zip": 1}
        assert (root / "odometry/dataset/sequences/00/image_2/000000.png").is_file()


# ------------------------------------------------------------------- the data module's hook
def test_data_download_true_prepares_in_prepare_data(tmp_path: Path,
                                                     server: ArchiveServer) -> None:
    prepare = {"archive_url": server.url, "splits_url": f"{server.url}/splits", "backoff": 0.01}
    dm = KittiDataModule(tmp_path / "kitti", tmp_path / "splits" / "eigen_zhou", height=64,
                         width=192, num_workers=0, use_labels=False, frame_cache=False,
                         download=True, prepare=prepare)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4
    gets = dict(server.gets)
    dm.prepare_data()  # Lightning calls it again in fit: nothing is asked of the network
    assert dict(server.gets) == gets


@pytest.mark.parametrize(("options", "key"), [
    ({"download": True, "synthetic": {"num_drives": 3}}, "download"),
    ({"prepare": {"pseudo_labels": "predict"}}, "prepare.pseudo_labels"),
    ({"prepare": {"extras": ["velodyne"]}}, "extras"),
    ({"prepare": {"splits": ["eigen_full"]}}, "splits"),
    ({"prepare": {"retries": -1}}, "retries"),
])
def test_download_options_are_checked_before_any_work(tmp_path: Path, options: dict,
                                                      key: str) -> None:
    with pytest.raises(ConfigError) as err:
        KittiDataModule(tmp_path, tmp_path, **options)
    assert err.value.key == key


def test_the_command_checks_its_config_first(tmp_path: Path, server: ArchiveServer) -> None:
    result = run_main(prepare_kitti.main, [*args(tmp_path, server), "data.prepare.jpeg=maybe"])
    assert result.returncode == 2 and not server.gets
    assert "data.prepare.jpeg" in result.stderr


# ------------------------------------------------------------------- smoke on KITTI
def test_smoke_shrinks_a_kitti_run_instead_of_generating_scenes(tmp_path: Path) -> None:
    kitti = compose_config("train", ["+experiment=smoke", "data=kitti",
                                     f"data.root={tmp_path / 'kitti'}",
                                     f"data.split_dir={tmp_path / 'splits'}"], root=tmp_path)
    validate_config(kitti, "train")
    data = kitti.data
    assert data.synthetic is None and data.root == str(tmp_path / "kitti")
    assert (data.height, data.width, data.batch_size, data.frame_cache) == (64, 192, 2, False)
    assert kitti.trainer.max_steps == 2 and kitti.trainer.limit_val_batches == 3
    # Without a data group on the command line: its own tiny synthetic world, as before.
    synthetic = compose_config("train", ["+experiment=smoke"], root=tmp_path)
    assert synthetic.data.synthetic.num_drives == 3
    assert synthetic.data.root.endswith("synthetic_smoke")


# ----------------------------------------------------------------- two processes at once
@pytest.mark.slow
def test_two_processes_preparing_one_root_fetch_each_file_once(tmp_path: Path,
                                                               served: Path) -> None:
    # The drive's archive is served once both processes have asked its size (both planned to
    # fetch it), and slowly (about 1 s): the second meets the first one's lock.
    with ArchiveServer(served, delay_per_mb=4.0) as server:
        server.gate[DRIVE_ZIP] = 2
        env = command_env(tmp_path)
        command = [sys.executable, "-m", "fsre_lightning.prepare_kitti", *args(tmp_path, server)]
        children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-3000:]
    assert server.heads[DRIVE_ZIP] == 2 and archive_gets(server) == {CALIB: 1, DRIVE_ZIP: 1}
    assert all(n == 1 for n in server.gets.values()), server.gets  # split files too
    unpacked = [int(out.split(" unpacked now")[0].rsplit(" ", 1)[1]) for out, _ in outputs]
    assert sum(unpacked) == 2, unpacked  # each archive unpacked by one of them
    frames = tmp_path / "kitti" / DRIVE / "image_02" / "data"
    assert len(list(frames.iterdir())) == 6


# ------------------------------------------------ end to end on real frames: prepare, train
SAMPLE_TRAIN = [f"{DATE}/{DATE}_drive_0000_sync {f} l" for f in range(1, 5)]
SAMPLE_TEST = [f"{DATE}/{DATE}_drive_0005_sync 0 l", *SAMPLE_TRAIN]


@pytest.mark.slow
@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_download_then_smoke_training_export_gt_and_evaluate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's acceptance: archives of the real sample frames served in KITTI's layout,
    `+experiment=smoke data=kitti data.download=true` trains on what it fetched, then
    export_gt and evaluate score that checkpoint on the downloaded Eigen-style test split."""
    site = tmp_path / "site"
    build_archives(SAMPLE, site)
    write_published_splits(site / "splits", published_splits(SAMPLE_TRAIN, SAMPLE_TEST))
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    root, splits = tmp_path / "kitti_raw", tmp_path / "splits"
    with ArchiveServer(site) as server:
        started = time.monotonic()
        trained = run_main(train.main, [
            "+experiment=smoke", "data=kitti", f"data.root={root}",
            f"data.split_dir={splits / 'eigen_zhou'}", "data.download=true",
            f"data.prepare.archive_url={server.url}",
            f"data.prepare.splits_url={server.url}/splits", "model=monodepth2",
            "model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet",
            "logger=csv", "name=kitti_smoke"])
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert archive_gets(server) == {calibration_archive(DATE): 1,
                                        drive_archive(f"{DATE}/{DATE}_drive_0000_sync"): 1,
                                        drive_archive(f"{DATE}/{DATE}_drive_0005_sync"): 1}
    (run_dir,) = (tmp_path / "outputs" / "kitti_smoke").iterdir()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and json.loads((run_dir / "metrics.json").read_text())

    exported = run_main(export_gt.main, [f"data.root={root}", f"split_dir={splits / 'eigen'}",
                                         "progress=false"])
    assert exported.returncode == 0, exported.stderr[-3000:]
    scored = run_main(evaluate.main, [
        f"ckpt_path={ckpt}", "data=kitti", f"data.root={root}",
        f"data.split_dir={splits / 'eigen'}", "data.num_workers=0", "device=cpu",
        f"metrics_path={tmp_path / 'eigen.json'}"])
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((tmp_path / "eigen.json").read_text())
    assert metrics["num_frames"] == 5 and math.isfinite(metrics["abs_rel"])
    print(f"download + smoke training + export_gt + evaluate: "
          f"{time.monotonic() - started:.0f} s")


def test_unchanged_zip_helpers_report_damage(tmp_path: Path) -> None:
    good = zip_tree(tmp_path / "a.zip", tmp_path, [_file(tmp_path / "x.bin", 5000)])
    assert downloads.zip_problem(good) is None
    data = bytearray(good.read_bytes())
    data[100] ^= 0xFF  # inside x.bin's bytes
    (tmp_path / "b.zip").write_bytes(bytes(data))
    assert "CRC" in (downloads.zip_problem(tmp_path / "b.zip") or "")
    (tmp_path / "c.zip").write_bytes(bytes(data[:2000]))
    assert "not a readable zip" in (downloads.zip_problem(tmp_path / "c.zip") or "")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as evil:
        evil.writestr("../outside.txt", "x")
    with pytest.raises(DataError, match="outside"):
        downloads.extract(tmp_path / "evil.zip", tmp_path / "out")


def _file(path: Path, size: int) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(size))
    return path
