"""Memory-mapped uint8 caches of decoded, resized rows (frames, pseudo-labels), built once.

A cache called NAME in a folder is two files:

- ``NAME.npy``: one plain uint8 array, N x row_shape (frames: N x H x W x 3; labels: N x H x W),
  opened with ``np.load(mmap_mode="r", allow_pickle=False)``: reading it runs no code and costs
  no decoding, only the page reads of the rows asked for;
- ``NAME.json``: the index and meta data: the N row keys in row order (the KITTI caches use
  "<folder> <frame> <side>"), the row shape, a fingerprint of everything that determines the
  content, and human-readable ``info`` (source folder, size, missing keys, ...).

``NAME.json`` is written last, by an atomic rename, and only once every row is written: a cache
without it, or whose fingerprint differs from the one asked for, is rebuilt. The fingerprint
always covers the cache format version, the keys (their set and order) and the row shape; the
caller adds what else matters (resolution, source folder and kind, file sizes and times,
label format).

Building writes ``NAME.partial.npy`` (a memmap), ``NAME.done.npy`` (one byte per row, set once
the row is flushed to disk) and ``NAME.partial.json``; an interrupted build (Ctrl-C, a killed
job) is resumed by the next call with the same fingerprint, which only fills the rows not yet
done. A row whose source cannot be read may be marked bad instead (the fill function returns
``(block, {row: reason})``): it is stored as zeros, flagged 2 in ``NAME.done.npy`` (so a resumed
build keeps the mark) and listed with its reason under ``bad`` in ``NAME.json``; readers decide
what to do with it (the KITTI data module drops the samples using it).

A file lock (``NAME.lock``) lets concurrent processes (DDP ranks, two runs) share a folder:
one builds, the others wait and then open the finished cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

try:  # POSIX; elsewhere concurrent builders are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPE = np.uint8
BAD = 2  # done-flag value of a row whose source could not be read (stored as zeros)

# What a fill function returns: the rows, or the rows plus {row number: why it is bad}.
FillResult = np.ndarray | tuple[np.ndarray, Mapping[int, str]]


class CacheError(Exception):
    """A cache cannot be built or opened (no space, unreadable files, wrong shape)."""


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted), as hex."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_signature(paths: Sequence[Path], root: Path | None = None) -> str:
    """Digest of (path, size, mtime) of each file, in order: changes when a file is replaced.

    Paths are taken relative to `root` when under it, so the signature names the source kind
    (png or jpg) but not where the folder is mounted; callers put the root in separately.
    """
    h = hashlib.sha256()
    for path in paths:
        st = path.stat()
        name = str(path)
        if root is not None:
            with contextlib.suppress(ValueError):
                name = str(path.relative_to(root))
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json_atomic(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, released by the kernel even if the process is killed."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # some network file systems have no locks
            log.warning("cannot lock %s (%s): concurrent builders are not serialised", path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CachedArray:
    """Read access to a finished cache: rows by index or by key, opened lazily per process.

    Only the file name travels when a DataLoader pickles its dataset to worker processes (a
    pickled np.memmap would copy the whole array); each process maps the file on first read.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], keys: Sequence[str],
                 info: Mapping[str, Any] | None = None,
                 bad: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.shape = tuple(shape)
        self.keys = list(keys)
        self.info = dict(info or {})
        # Keys whose rows are zeros because their source could not be read -> the reason.
        self.bad = dict(bad or {})
        self._array: np.ndarray | None = None
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            if array.shape != self.shape or array.dtype != DTYPE:
                raise CacheError(f"cache {self.path} holds {array.dtype} {array.shape}, its index "
                                 f"says uint8 {self.shape}: delete it to rebuild")
            self._array = array
        return self._array

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers of `keys`; KeyError listing the first absent ones."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        absent = [k for k in keys if k not in self._index]
        if absent:
            raise KeyError(f"{len(absent)} keys not in cache {self.path}, e.g. {absent[:3]}")
        return np.array([self._index[k] for k in keys], dtype=np.int64)

    def read(self, rows: int | np.ndarray) -> np.ndarray:
        """A private (writable, not memory-mapped) copy of one row or of several rows."""
        if np.ndim(rows) == 0:
            return np.array(self.array[int(rows)])
        # Fancy indexing already copies; view drops the memmap subclass.
        return self.array[np.asarray(rows)].view(np.ndarray)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state


class ArrayCache:
    """The files of the cache NAME in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], name: str) -> None:
        self.directory = Path(directory)
        self.name = name
        base = self.directory / name
        self.data_path = base.with_name(f"{name}.npy")
        self.meta_path = base.with_name(f"{name}.json")
        self.partial_path = base.with_name(f"{name}.partial.npy")
        self.partial_meta_path = base.with_name(f"{name}.partial.json")
        self.done_path = base.with_name(f"{name}.done.npy")
        self.lock_path = base.with_name(f"{name}.lock")

    # ------------------------------------------------------------------ reading
    def meta(self) -> dict[str, Any] | None:
        """The finished cache's index, or None when there is no finished cache."""
        meta = _read_json(self.meta_path)
        if meta is None or meta.get("version") != CACHE_VERSION or not self.data_path.is_file():
            return None
        return meta

    def is_current(self, fingerprint: str) -> bool:
        meta = self.meta()
        return meta is not None and meta.get("fingerprint") == fingerprint

    def open(self) -> CachedArray:
        meta = self.meta()
        if meta is None:
            raise CacheError(f"no finished cache {self.data_path} (with {self.meta_path.name})")
        shape = (len(meta["keys"]), *meta["row_shape"])
        cached = CachedArray(self.data_path, shape, meta["keys"], meta.get("info"),
                             meta.get("bad"))
        cached.array  # noqa: B018 -- check the header against the index now, not mid-epoch
        return cached

    # ------------------------------------------------------------------ building
    def ensure(
        self,
        keys: Sequence[str],
        row_shape: Sequence[int],
        fields: Mapping[str, Any],
        fill: Callable[[np.ndarray], FillResult],
        chunk_size: int = 64,
        info: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> CachedArray:
        """Open the cache if its fingerprint matches, else build (or resume building) it.

        `fill(rows)` returns the uint8 rows (len(rows) x row_shape) for the row numbers `rows`
        (positions in `keys`); it is called chunk by chunk, and each chunk is flushed to disk
        and marked done before the next one, so an interrupted build loses at most a chunk.
        """
        keys = list(keys)
        row_shape = tuple(int(s) for s in row_shape)
        if not keys:
            raise CacheError(f"cache {self.name}: no rows to cache")
        if len(set(keys)) != len(keys):
            raise CacheError(f"cache {self.name}: duplicate keys")
        fingerprint = digest({"version": CACHE_VERSION, "keys": digest(keys),
                              "row_shape": row_shape, "fields": dict(fields)})
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cannot create the cache folder {self.directory}: {err}; set "
                             f"data.cache_dir to a writable folder") from err
        with _locked(self.lock_path):
            if self.is_current(fingerprint):
                return self.open()
            if self.meta_path.exists() or self.data_path.exists():
                log.info("cache %s is stale (different source, size or keys): rebuilding",
                         self.data_path)
            # The index goes first, so a reader never pairs an old index with new data.
            self.meta_path.unlink(missing_ok=True)
            self.data_path.unlink(missing_ok=True)
            meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "keys": keys,
                    "row_shape": list(row_shape), "dtype": "uint8", "info": dict(info or {})}
            self._build(meta, fill, chunk_size, progress)
        return self.open()

    def _open_partial(self, meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        shape = (len(meta["keys"]), *meta["row_shape"])
        previous = _read_json(self.partial_meta_path)
        if (previous is not None and previous.get("fingerprint") == meta["fingerprint"]
                and self.partial_path.is_file() and self.done_path.is_file()):
            try:
                data = np.load(self.partial_path, mmap_mode="r+", allow_pickle=False)
                done = np.load(self.done_path, mmap_mode="r+", allow_pickle=False)
                if data.shape == shape and done.shape == shape[:1]:
                    log.info("resuming %s: %d of %d rows done", self.partial_path,
                             int(done.sum()), shape[0])
                    return data, done
            except (OSError, ValueError):
                pass  # unreadable leftovers: start over
        self._discard_partial()
        nbytes = int(np.prod(shape))
        free = shutil.disk_usage(self.directory).free
        if nbytes > free:
            # A memmap that runs out of disk kills the process with SIGBUS: refuse up front.
            raise CacheError(f"cache {self.data_path} needs {nbytes / 1e9:.1f} GB but "
                             f"{self.directory} has {free / 1e9:.1f} GB free: set "
                             f"data.cache_dir elsewhere or data.frame_cache=false")
        data = np.lib.format.open_memmap(self.partial_path, mode="w+", dtype=DTYPE, shape=shape)
        done = np.lib.format.open_memmap(self.done_path, mode="w+", dtype=np.uint8,
                                         shape=shape[:1])
        done.flush()
        _write_json_atomic(self.partial_meta_path, {"fingerprint": meta["fingerprint"]})
        return data, done

    def _discard_partial(self) -> None:
        for path in (self.partial_meta_path, self.partial_path, self.done_path):
            path.unlink(missing_ok=True)

    def _build(self, meta: dict[str, Any], fill: Callable[[np.ndarray], FillResult],
               chunk_size: int, progress: bool) -> None:
        data, done = self._open_partial(meta)
        row_shape = tuple(meta["row_shape"])
        # The partial index keeps the reasons too, so that a resumed build still names the files.
        previous = _read_json(self.partial_meta_path) or {}
        reasons: dict[int, str] = {int(r): str(v) for r, v in (previous.get("bad") or {}).items()}
        todo = np.flatnonzero(done == 0)
        total = len(done)
        with tqdm(total=total, initial=total - len(todo), desc=f"caching {self.name}",
                  unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0) as bar:
            for start in range(0, len(todo), max(1, chunk_size)):
                rows = todo[start:start + chunk_size]
                result = fill(rows)
                bad_rows: Mapping[int, str] = {}
                if isinstance(result, tuple):
                    result, bad_rows = result
                block = np.asarray(result)
                if block.shape != (len(rows), *row_shape) or block.dtype != DTYPE:
                    raise CacheError(f"cache {self.name}: the fill function returned "
                                     f"{block.dtype} {block.shape}, expected uint8 "
                                     f"{(len(rows), *row_shape)}")
                data[rows] = block
                # Rows hit the disk before their done flags: a resume never trusts unwritten rows.
                data.flush()
                done[rows] = 1
                for row, reason in bad_rows.items():
                    done[int(row)] = BAD
                    reasons[int(row)] = reason
                if bad_rows:
                    _write_json_atomic(self.partial_meta_path,
                                       {"fingerprint": meta["fingerprint"], "bad": reasons})
                done.flush()
                bar.update(len(rows))
        keys = meta["keys"]
        meta["bad"] = {keys[r]: reasons.get(int(r), "unreadable when the cache was built")
                       for r in np.flatnonzero(done == BAD)}
        del data, done  # unmap before the rename
        os.replace(self.partial_path, self.data_path)
        _write_json_atomic(self.meta_path, meta)
        self._discard_partial()
        log.info("cache %s: %d rows of %s", self.data_path, total, row_shape)
