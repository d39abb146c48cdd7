"""Fetching and unpacking archives so that nothing half-made is taken for complete.

Used by `fsre_lightning.data.kitti_prepare` (docs/design.md section 4.3). The rules:

- A download is written to ``<name>.part``; an interrupted one resumes with an HTTP range
  request (a server that ignores the range sends the whole file again, which starts the part
  over). Connection failures, time-outs and 5xx answers are retried with exponential backoff;
  the count restarts whenever bytes arrived, so a flaky but working line finishes. What was
  fetched stays on disk when the retries run out.
- A finished download is an archive only once every member passed its CRC check
  (`zipfile.ZipFile.testzip`); only then is the part renamed to its final name.
- Extraction writes each member to ``<file>.part`` and renames it into place, and skips
  members already present with their full size: a killed extraction resumes, and no file
  with its final name is ever short.
- `FileLock` on ``<name>.lock`` makes two processes (two commands, or the DDP ranks of a node)
  fetch each file once: the second waits and then finds it done.

Every failure is a `DataError` of one line naming the URL or file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock, Timeout
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fsre_lightning.errors import DataError, first_line

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per copy when unpacking
# Bytes per read when downloading: a connection that drops loses the read in progress (urllib3
# raises without returning it), so reads are kept small enough to lose little.
DOWNLOAD_CHUNK = 1 << 16
# Answers worth asking again: the server or a proxy is overloaded or restarting.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Answers that say the file is not there (S3 answers 403 for a key it does not hold).
MISSING_STATUS = frozenset({403, 404, 410})
MAX_BACKOFF_S = 60.0
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def human_bytes(count: float) -> str:
    """1536 -> '1.5 kB' (decimal units, as disk sizes and download sites give them)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover - the loop returns


def is_url(source: str) -> bool:
    """http(s) URL, as opposed to a local folder (file:// counts as a folder)."""
    return urlparse(str(source)).scheme in ("http", "https")


def local_path(source: str) -> Path:
    """The folder of a local source: a path, or a file:// URL."""
    parsed = urlparse(str(source))
    return Path(parsed.path) if parsed.scheme == "file" else Path(source).expanduser()


def join_url(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def free_bytes(path: Path) -> int:
    """Free space of the disk holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def no_space_error(path: Path, err: OSError, kept: str = "") -> DataError:
    return DataError(f"the disk is full writing {path} ({human_bytes(free_bytes(path))} free): "
                     f"free some space or point data.root at a larger disk, then run the same "
                     f"command again{kept} ({first_line(err)})")


def check_free_space(folder: Path, need: int, what: str) -> None:
    """DataError when the disk holding `folder` has less than `need` bytes free."""
    free = free_bytes(folder)
    if need > free:
        raise DataError(f"not enough free disk for {what}: about {human_bytes(need)} needed, "
                        f"{human_bytes(free)} free on {folder}: free some space or point "
                        "data.root at a larger disk")


def check_writable_folder(folder: Path, key: str = "data.root") -> None:
    """Create `folder` and write a file in it, or one DataError saying it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"{key}={str(folder)!r} cannot be written ({type(err).__name__}: "
                        f"{first_line(err)}): choose a folder you can write to, or fix its "
                        "permissions") from None


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `lock_path`; say once that another process holds it when we wait."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is preparing %s: waiting for it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------------------ progress
class Transfers:
    """Rich progress bars: one for everything to fetch, one per file (bytes, rate, ETA).
    Disabled (every call a no-op) when `enabled` is false or stderr is not a terminal."""

    def __init__(self, total: int | None, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), transient=False, disable=not enabled)
        self.overall: TaskID | None = None
        self._total = total
        self._file: TaskID | None = None

    def __enter__(self) -> Transfers:
        self.progress.start()
        self.overall = self.progress.add_task("all files", total=self._total)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def start_file(self, name: str, total: int | None, done: int = 0) -> None:
        if self._file is not None:
            self.progress.remove_task(self._file)
        self._file = self.progress.add_task(name, total=total, completed=done)

    def restart_file(self, lost: int) -> None:
        """The server ignored a range: the part starts over, and its `lost` bytes are
        fetched again (the overall total grows by them)."""
        if self._file is not None:
            self.progress.reset(self._file)
        if self.overall is not None and self._total is not None:
            self._total += lost
            self.progress.update(self.overall, total=self._total)

    def advance(self, count: int) -> None:
        for task in (self._file, self.overall):
            if task is not None:
                self.progress.advance(task, count)

    def end_file(self) -> None:
        if self._file is not None:
            self.progress.remove_task(self._file)
            self._file = None


# --------------------------------------------------------------------------------- HTTP
class _TransientError(Exception):
    """A failure worth retrying (cut connection, time-out, 5xx)."""


def _session() -> Any:
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = "fsre-lightning (KITTI preparation)"
    return session


_local = threading.local()


def session() -> Any:
    """One requests session per thread (connections are reused within a thread)."""
    if not hasattr(_local, "session"):
        _local.session = _session()
    return _local.session


def _not_found(url: str, status: int, hint: str) -> DataError:
    return DataError(f"{url} answered HTTP {status} (no such file): {hint}")


def _total_size(response: Any) -> int | None:
    """The whole file's size from Content-Range ('bytes a-b/N') or Content-Length."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _small_request(method: str, url: str, hint: str, timeout: float, retries: int,
                   backoff: float) -> Any:
    """A HEAD or a GET of a small file, retried on connection failures and 5xx answers; a
    missing file or another error status is a DataError at once."""
    import requests

    for attempt in range(retries + 1):
        try:
            response = session().request(method, url, allow_redirects=True,
                                         timeout=(10, timeout))
        except (requests.ConnectionError, requests.Timeout) as err:
            if attempt == retries:
                raise DataError(f"cannot reach {url} ({_reason(err)}) after {retries + 1} "
                                f"attempts: check the network, or {hint}") from None
            time.sleep(min(backoff * 2 ** attempt, MAX_BACKOFF_S))
            continue
        if response.status_code in MISSING_STATUS:
            raise _not_found(url, response.status_code, hint)
        if response.status_code in RETRY_STATUS and attempt < retries:
            time.sleep(min(backoff * 2 ** attempt, MAX_BACKOFF_S))
            continue
        if response.status_code >= 400:
            raise DataError(f"{url} answered HTTP {response.status_code}: {hint}")
        return response
    raise AssertionError("unreachable")  # pragma: no cover


def remote_size(url: str, hint: str, timeout: float = 30.0, retries: int = 2,
                backoff: float = 1.0) -> int | None:
    """The size of `url` in bytes by a HEAD request (None when the server does not say)."""
    return _total_size(_small_request("HEAD", url, hint, timeout, retries, backoff))


def read_text(url: str, hint: str, timeout: float = 30.0, retries: int = 2,
              backoff: float = 1.0) -> str:
    """A small text file (a split file) from `url`, in memory."""
    return _small_request("GET", url, hint, timeout, retries, backoff).text


def download(url: str, part: Path, *, hint: str, retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, transfers: Transfers | None = None,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Fetch `url` into `part`, appending to what it already holds; returns the size.

    The part is complete when this returns. A missing file (404/403/410) is a DataError at
    once; a connection that keeps failing is one after `retries` attempts without a byte
    (`backoff`, doubled each time, up to a minute, between them), with the part kept.
    """
    import requests

    failures = 0
    started = False  # the file's progress bar exists
    part.parent.mkdir(parents=True, exist_ok=True)
    while True:
        have = part.stat().st_size if part.exists() else 0
        received = 0
        try:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with session().get(url, headers=headers, stream=True,
                               timeout=(10, timeout)) as response:
                status = response.status_code
                if status == 416 and have:  # asked past the end: the part may be complete
                    total = _total_size(response)
                    if total == have:
                        return have
                    part.unlink()  # longer than the file: not this file, start over
                    continue
                if status in MISSING_STATUS:
                    raise _not_found(url, status, hint)
                if status in RETRY_STATUS:
                    raise _TransientError(f"HTTP {status}")
                if status >= 400:
                    raise DataError(f"{url} answered HTTP {status}: {hint}")
                total = _total_size(response)
                append = status == 206
                if append and not response.headers.get("Content-Range", "").startswith(
                        f"bytes {have}-"):
                    raise _TransientError(f"the server sent another range "
                                     f"({response.headers.get('Content-Range')!r})")
                if transfers is not None and not started:
                    transfers.start_file(part.name.removesuffix(".part"), total, have)
                started = True
                if not append and have:
                    log.info("%s: the server ignored the range request; fetching it whole", url)
                    if transfers is not None:
                        transfers.restart_file(have)
                    have = 0
                try:
                    with open(part, "ab" if append else "wb") as out:
                        for chunk in response.iter_content(DOWNLOAD_CHUNK):
                            out.write(chunk)
                            received += len(chunk)
                            if transfers is not None:
                                transfers.advance(len(chunk))
                except OSError as err:
                    if err.errno in NO_SPACE:
                        raise no_space_error(part, err, f"; the {human_bytes(have + received)} "
                                             f"fetched so far are kept in {part}") from None
                    raise
                size = part.stat().st_size
                if total is not None and size < total:
                    raise _TransientError(f"the connection closed at {size} of {total} bytes")
                if transfers is not None:
                    transfers.end_file()
                return size
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError, _TransientError) as err:
            failures = 0 if received else failures + 1
            kept = part.stat().st_size if part.exists() else 0
            if failures > retries:
                raise DataError(
                    f"could not download {url}: {_reason(err)} ({retries + 1} attempts in a "
                    f"row without data, with backoff); the {human_bytes(kept)} fetched so far "
                    f"are kept in {part} and the next run resumes there: check the network, "
                    "then run the same command again") from None
            wait = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF_S)
            log.info("%s: %s at %s; resuming in %.1f s", url, _reason(err), human_bytes(kept),
                     wait)
            sleep(wait)


def _reason(err: BaseException) -> str:
    """What went wrong with a connection, in words (requests nests urllib3's reprs)."""
    import requests

    if isinstance(err, _TransientError):
        return str(err)
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "the connection broke mid-file"
    if isinstance(err, requests.Timeout):
        return "no answer within the time-out"
    text = first_line(err)
    for known in ("Connection refused", "Name or service not known", "Network is unreachable",
                  "No route to host", "Temporary failure in name resolution",
                  "Connection reset by peer"):
        if known in text:
            return f"{type(err).__name__}: {known}"
    return f"{type(err).__name__}: {text[:200]}"


# --------------------------------------------------------------------------------- zips
def zip_problem(path: Path) -> str | None:
    """Why `path` is not an intact zip (None when every member passes its CRC check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        return f"not a readable zip: {first_line(err)}"
    except OSError as err:
        if err.errno in NO_SPACE:
            raise
        return f"unreadable: {first_line(err)}"
    return None if bad is None else f"member {bad} fails its CRC check"


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refusing members that would land outside `folder` (../, /abs)."""
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise DataError(f"archive member {name!r} would be written outside {folder}: the "
                        "archive is not one of KITTI's; delete it and fetch it again")
    return folder / name


def same_size(target: Path, info: zipfile.ZipInfo) -> bool:
    """The default test of a member already extracted: a file of its full size."""
    try:
        return target.stat().st_size == info.file_size
    except OSError:
        return False


def extract(archive: Path, folder: Path, keep: Callable[[str], bool] | None = None,
            present: Callable[[Path, zipfile.ZipInfo], bool] = same_size
            ) -> tuple[list[Path], int]:
    """Unpack the members `keep` accepts into `folder`, skipping those `present`; returns the
    files written and how many were skipped. Each member goes to <file>.part first, then is
    renamed, so an interrupted extraction leaves no short file under a final name."""
    written: list[Path] = []
    skipped = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir() or (keep is not None and not keep(info.filename)):
                continue
            target = _inside(folder, info.filename)
            if present(target, info):
                skipped += 1
                continue
            tmp = target.with_name(target.name + ".part")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                os.replace(tmp, target)
            except OSError as err:
                if err.errno in NO_SPACE:
                    raise no_space_error(target, err, f"; {archive} is kept and the extraction "
                                         "resumes with the files not yet written") from None
                raise DataError(f"cannot write {target} ({type(err).__name__}: "
                                f"{first_line(err)}): check the folder's permissions") from None
            written.append(target)
    return written, skipped
