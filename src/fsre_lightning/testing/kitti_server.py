"""KITTI's archive server on 127.0.0.1, for the download tests (no test touches the internet).

- `make_raw_tree`: a tiny KITTI-raw folder (real calibration text, noise frames, scans);
- `build_archives`: zips of a raw folder in KITTI's archive layout (``raw_data/<date>_calib.zip``
  holding ``<date>/calib_*.txt``; ``raw_data/<drive>/<drive>_sync.zip`` holding
  ``<date>/<drive>_sync/...``), as KITTI serves them;
- `write_published_splits`: split files in Monodepth2's ``splits/<split>/`` layout;
- `ArchiveServer`: an HTTP server of a folder with what KITTI's server does (HEAD, byte
  ranges) and what networks do (a connection cut mid-file, a 404, a 503, a damaged archive, a
  slow line), counting the requests per path.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fsre_lightning.data.kitti_layout import frame_name

DATE = "2011_09_26"
DRIVE = f"{DATE}/{DATE}_drive_0001_sync"
CALIBRATION = {
    "calib_cam_to_cam.txt": (
        "calib_time: 09-Jan-2012 13:57:47\nR_rect_00: 1 0 0 0 1 0 0 0 1\n"
        "P_rect_02: 100 0 96 0 0 100 32 0 0 0 1 0\nS_rect_02: 1.920000e+02 6.400000e+01\n"),
    "calib_velo_to_cam.txt": "R: 0 -1 0 0 0 -1 1 0 0\nT: 0 0 0\n",
}


def make_raw_tree(root: Path, drive: str = DRIVE, frames: int = 6,
                  size: tuple[int, int] = (64, 192), seed: int = 0) -> Path:
    """Frames 0..frames-1 of `drive` (left camera, noise PNGs) with scans and calibration."""
    rng = np.random.default_rng(seed)
    date = drive.split("/")[0]
    for name, text in CALIBRATION.items():
        (root / date).mkdir(parents=True, exist_ok=True)
        (root / date / name).write_text(text)
    for frame in range(frames):
        image = root / drive / "image_02" / "data" / f"{frame_name(frame)}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(image)
        scan = root / drive / "velodyne_points" / "data" / f"{frame_name(frame)}.bin"
        scan.parent.mkdir(parents=True, exist_ok=True)
        points = np.column_stack([rng.uniform(5, 50, 200), rng.uniform(-5, 5, 200),
                                  rng.uniform(-1, 1, 200), np.ones(200)])
        points.astype(np.float32).tofile(scan)
    return root


def zip_tree(path: Path, base: Path, members: Iterable[Path]) -> Path:
    """A zip at `path` of `members` (files under `base`), named relative to `base`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member in sorted(members):
            archive.write(member, member.relative_to(base).as_posix())
    return path


def build_archives(raw_root: Path, out: Path) -> dict[str, Path]:
    """KITTI's archives of every day and drive of `raw_root`, under `out` as KITTI's server
    lays them out; returns {path below the server: file}."""
    made = {}
    for day in sorted(p for p in raw_root.iterdir() if p.is_dir()):
        calib = [p for p in day.iterdir() if p.is_file()]
        rel = f"raw_data/{day.name}_calib.zip"
        made[rel] = zip_tree(out / rel, raw_root, calib)
        for drive in sorted(p for p in day.iterdir() if p.is_dir()):
            name = drive.name.removesuffix("_sync")
            rel = f"raw_data/{name}/{drive.name}.zip"
            made[rel] = zip_tree(out / rel, raw_root,
                                 [p for p in drive.rglob("*") if p.is_file()])
    return made


def write_published_splits(out: Path, splits: Mapping[str, Mapping[str, Iterable[str]]]
                           ) -> Path:
    """`out/<split>/<file>` with the given lines (Monodepth2's splits/ layout)."""
    for split, files in splits.items():
        for name, lines in files.items():
            path = out / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{line}\n" for line in lines))
    return out


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (what the tests make clients do) is not an error to print."""


def corrupted(data: bytes) -> bytes:
    """`data` with one byte flipped in the middle (a member's contents: its CRC fails)."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


class ArchiveServer:
    """Serve `folder` on 127.0.0.1 (a free port) in a thread; `url` is its base URL.

    Faults, by path below the server (e.g. ``raw_data/2011_09_26_calib.zip``):
    `faults[path]`: a list the next GETs of the path take one each from, then served normally:
    ``("cut", n)`` sends n bytes of the answer, then closes the connection (the line drops);
    ``("corrupt", 0)`` sends the file with a byte flipped; ``("status", code)`` answers that
    status (503, ...). `status[path] = code` answers every request of the path so (404).
    `delay_per_mb`: seconds of sleep per MB sent (a slow line).
    `gate[path] = n`: GETs of the path wait (up to a minute) until n HEADs of it came: with
    n = 2, two clients have both planned to fetch the file before either may.
    `gets` counts the GET requests per path, `heads` the HEADs, and `range_starts` lists the
    first byte each ranged GET asked for.
    """

    def __init__(self, folder: Path, delay_per_mb: float = 0.0) -> None:
        self.folder = Path(folder)
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.status: dict[str, int] = {}
        self.delay_per_mb = delay_per_mb
        self.gets: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.range_starts: defaultdict[str, list[int]] = defaultdict(list)
        self.gate: dict[str, int] = {}
        self._lock = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle's algorithm each small
            # answer waited for the client's delayed ACK (40 ms a request).
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                server._serve(self, head=True)

            def do_GET(self) -> None:
                server._serve(self, head=False)

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # Polled every 50 ms, not 0.5 s: shutdown() waits for the next poll, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self) -> ArchiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------------ requests
    def _serve(self, handler: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?")[0].lstrip("/")
        range_header = handler.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        with self._lock:
            (self.heads if head else self.gets)[path] += 1
            self._lock.notify_all()
            if not head and path in self.gate:
                self._lock.wait_for(lambda: self.heads[path] >= self.gate[path], timeout=60)
            if match and not head:
                self.range_starts[path].append(int(match[1]))
            fault = ("", 0)
            if not head and self.faults.get(path):
                fault = self.faults[path].pop(0)
        forced = self.status.get(path) or (fault[1] if fault[0] == "status" else None)
        cut = fault[1] if fault[0] == "cut" else None
        damage = fault[0] == "corrupt"
        file = self.folder / path
        if forced is not None or not file.is_file():
            code = forced or 404
            handler.send_response(code)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        data = file.read_bytes()
        if damage:
            data = corrupted(data)
        size = len(data)
        start = 0
        if match:
            start = int(match[1])
            if start >= size:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{size}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            handler.send_response(200)
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(size - start))
        handler.end_headers()
        if head:
            return
        body = data[start:] if cut is None else data[start:start + cut]
        self._send(handler, body)
        if cut is not None:  # the line drops mid-file
            handler.close_connection = True
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        step = 1 << 16
        for offset in range(0, len(body), step):
            try:
                handler.wfile.write(body[offset:offset + step])
            except OSError:  # the client went away
                return
            if self.delay_per_mb:
                time.sleep(self.delay_per_mb * step / 1e6)

