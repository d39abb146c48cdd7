"""Frame and label caches: round trip, invalidation, resume, errors, data module equivalence."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning.data import KittiDataModule
from fsre_lightning.data import frame_cache as cache_module
from fsre_lightning.data.array_store import ArrayCache
from fsre_lightning.data.decode import decode_rgb, load_image
from fsre_lightning.data.frame_cache import build_frame_cache, cache_name
from fsre_lightning.errors import DataError
from fsre_lightning.testing.kitti_tree import DRIVE, expected_train_ids, label_ids_image, make_kitti

H, W = 64, 192
SIZE = (H, W)
SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample"


def frame_files(root: Path, frames: range = range(6)) -> tuple[list[str], list[Path]]:
    keys = [f"{DRIVE} {f} l" for f in frames]
    paths = [root / DRIVE / "image_02" / "data" / f"{f:010d}.png" for f in frames]
    return keys, paths


def pil_lanczos(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The yardstick resize, written out independently of the package."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.LANCZOS))


def expected_labels(size: tuple[int, int] = SIZE) -> torch.Tensor:
    """Train ids of the fixture's labels after the nearest-neighbour resize to `size`."""
    native = Image.fromarray(expected_train_ids())
    resized = np.asarray(native.resize((size[1], size[0]), Image.NEAREST))
    return torch.from_numpy(resized.astype(np.int64))


def make_dm(root: Path, cache_dir: Path, **kwargs) -> KittiDataModule:
    args = {"root": root, "split_dir": root / "splits" / "tiny", "height": H, "width": W,
            "batch_size": 2, "num_workers": 0, "eval_crop": "none", "label_format": "label_ids",
            "frame_cache": True, "cache_dir": cache_dir, "cache_workers": 2}
    return KittiDataModule(**{**args, **kwargs})


def test_frame_cache_round_trip_equals_decode_and_resize(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_kitti(tmp_path)
    keys, paths = frame_files(root)
    cache = build_frame_cache(tmp_path / "cache", "frames", root, keys, paths, SIZE, workers=2,
                              progress=False)
    assert cache.shape == (6, H, W, 3) and cache.keys == keys
    for i, path in enumerate(paths):
        assert np.array_equal(cache.read(i), pil_lanczos(path, SIZE))
    # plain arrays on disk: no pickle, a JSON index with the keys
    on_disk = np.load(tmp_path / "cache" / "frames.npy", mmap_mode="r", allow_pickle=False)
    assert on_disk.dtype == np.uint8 and on_disk.shape == (6, H, W, 3)
    meta = json.loads((tmp_path / "cache" / "frames.json").read_text())
    assert meta["keys"] == keys and meta["info"]["height"] == H
    assert not list((tmp_path / "cache").glob("*partial*"))
    # several rows at once, in any order
    assert np.array_equal(cache.read(np.array([3, 1])), np.stack([cache.read(3), cache.read(1)]))

    # Reused: an up-to-date cache is opened without decoding anything.
    monkeypatch.setattr(cache_module, "decode_rgb", lambda *a: pytest.fail("rebuilt"))
    again = build_frame_cache(tmp_path / "cache", "frames", root, keys, paths, SIZE,
                              progress=False)
    assert again.path == cache.path and np.array_equal(again.read(5), cache.read(5))
    assert ArrayCache(tmp_path / "cache", "frames").is_current(meta["fingerprint"])


def test_cached_array_pickles_without_its_data(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    keys, paths = frame_files(root)
    cache = build_frame_cache(tmp_path / "c", "frames", root, keys, paths, SIZE, progress=False)
    cache.read(0)  # mapped in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 10_000  # the path and keys, not 6 x 64 x 192 x 3 bytes
    assert np.array_equal(clone.read(5), cache.read(5))


def test_cache_is_rebuilt_when_size_files_or_keys_change(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    keys, paths = frame_files(root)
    cache_dir = tmp_path / "cache"
    build_frame_cache(cache_dir, "frames", root, keys, paths, SIZE, progress=False)
    fingerprint = json.loads((cache_dir / "frames.json").read_text())["fingerprint"]

    # another resolution under the same name: rebuilt at the new size
    small = build_frame_cache(cache_dir, "frames", root, keys, paths, (32, 96), progress=False)
    assert small.shape == (6, 32, 96, 3)
    assert np.array_equal(small.read(2), pil_lanczos(paths[2], (32, 96)))
    assert json.loads((cache_dir / "frames.json").read_text())["fingerprint"] != fingerprint

    # a replaced source file: rebuilt with the new content
    new = np.full((60, 200, 3), 7, np.uint8)
    Image.fromarray(new).save(paths[4])
    os.utime(paths[4], ns=(1, 1))  # a different mtime even on coarse-clock file systems
    rebuilt = build_frame_cache(cache_dir, "frames", root, keys, paths, (32, 96),
                                progress=False)
    assert np.array_equal(rebuilt.read(4), np.full((32, 96, 3), 7, np.uint8))

    # another key set: rebuilt with those rows only
    fewer = build_frame_cache(cache_dir, "frames", root, keys[:3], paths[:3], (32, 96),
                              progress=False)
    assert fewer.shape[0] == 3 and fewer.keys == keys[:3]


def test_an_interrupted_build_is_resumed_and_never_read_half_built(tmp_path: Path) -> None:
    store = ArrayCache(tmp_path, "rows")
    keys = [f"k{i}" for i in range(10)]
    calls: list[list[int]] = []

    def fill(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.tolist())
        if len(calls) == 3:  # Ctrl-C during the third chunk: rows 0..3 are done
            raise KeyboardInterrupt
        return np.stack([np.full((2, 3), r, np.uint8) for r in rows])

    with pytest.raises(KeyboardInterrupt):
        store.ensure(keys, (2, 3), {"v": 1}, fill, chunk_size=2, progress=False)
    assert store.meta() is None and not store.data_path.exists()  # not complete
    assert store.partial_path.exists() and np.load(store.done_path).sum() == 4
    with pytest.raises(Exception, match="no finished cache"):
        store.open()

    calls.clear()
    cache = store.ensure(keys, (2, 3), {"v": 1}, fill, chunk_size=100, progress=False)
    assert calls == [[4, 5, 6, 7, 8, 9]]  # only the rows not done before
    assert [int(cache.read(i)[0, 0]) for i in range(10)] == list(range(10))
    assert not store.partial_path.exists() and not store.done_path.exists()

    # A partial build of another fingerprint is discarded, not resumed.
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        store.ensure(keys, (2, 3), {"v": 2}, fill, chunk_size=2, progress=False)
    assert store.meta() is None  # the old cache is gone before the new one is built
    calls.clear()
    store.ensure(keys, (2, 3), {"v": 3}, fill, chunk_size=100, progress=False)
    assert calls == [list(range(10))]


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    keys, paths = frame_files(root)
    paths[3].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=str(paths[3])):
        build_frame_cache(tmp_path / "cache", "frames", root, keys, paths, SIZE, progress=False)
    with pytest.raises(DataError, match=str(paths[3])):
        load_image(paths[3], SIZE)


def test_data_module_batches_are_identical_with_and_without_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_kitti(tmp_path, frames=8)
    cached = make_dm(root, tmp_path / "cache")
    plain = make_dm(root, tmp_path / "cache", frame_cache=False)
    cached.prepare_data()  # builds the train and val caches
    names = {p.name for p in (tmp_path / "cache").iterdir()}
    assert {f"{cache_name(k, s, H, W)}.npy" for k in ("frames", "labels_files")
            for s in ("train", "val")} <= names
    cached.setup("fit")
    plain.setup("fit")
    assert cached.datasets["train"].frame_rows is not None
    assert plain.datasets["train"].frame_rows is None
    # no decoding per step once the caches are open
    monkeypatch.setattr(cache_module, "decode_rgb", lambda *a: pytest.fail("decoded a PNG"))
    monkeypatch.setattr(cache_module, "decode_label", lambda *a: pytest.fail("decoded a label"))
    batches = []
    for dm in (cached, plain):
        if dm is plain:
            monkeypatch.undo()
        torch.manual_seed(3)  # the same shuffle and flips for both
        batches.append(list(dm.train_dataloader()) + list(dm.val_dataloader()))
    assert len(batches[0]) == len(batches[1]) == 6
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys() and a["name"] == b["name"]
        assert a["frames"].dtype == torch.float32 and a["labels"].dtype == torch.long
        for key in ("frames", "labels", "K", "inv_K", "index"):
            assert torch.equal(a[key], b[key]), key
    labels = batches[0][-1]["labels"]  # validation: never flipped
    assert torch.equal(labels[0], expected_labels())


def test_setup_builds_the_cache_when_prepare_data_did_not_run(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    dm = make_dm(root, tmp_path / "cache", use_labels=False, flip_prob=0.0)
    dm.setup("fit")
    item = dm.datasets["train"][0]
    direct = torch.stack([load_image(p, SIZE) for p in dm.datasets["train"].image_paths[0]])
    assert torch.equal(item["frames"], direct)
    assert (tmp_path / "cache" / "frames_train_64x192.npy").is_file()
    assert not (tmp_path / "cache" / "labels_files_train_64x192.npy").exists()


def test_missing_labels_fail_or_are_void(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    gone = root / "segmentation" / DRIVE / "image_02" / "0000000002.png"
    gone.unlink()
    with pytest.raises(DataError, match="1 pseudo-labels missing") as err:
        make_dm(root, tmp_path / "cache").setup("fit")
    assert str(gone) in str(err.value) and "allow_missing_labels" in str(err.value)

    dm = make_dm(root, tmp_path / "cache", allow_missing_labels=True, flip_prob=0.0)
    dm.setup("fit")
    train = dm.datasets["train"]
    by_frame = {e.frame: train[i]["labels"] for i, e in enumerate(train.entries)}
    assert torch.all(by_frame[2] == 255)
    assert torch.equal(by_frame[1], expected_labels())
    # the uncached path agrees
    plain = make_dm(root, tmp_path / "cache", allow_missing_labels=True, flip_prob=0.0,
                    frame_cache=False)
    plain.setup("fit")
    assert torch.equal(plain.datasets["train"][1]["labels"], by_frame[2])
    # a label appearing later invalidates the label cache
    Image.fromarray(label_ids_image()).save(gone)
    dm = make_dm(root, tmp_path / "cache", flip_prob=0.0)
    dm.setup("fit")
    assert torch.equal(dm.datasets["train"][1]["labels"], by_frame[1])


def test_a_label_of_the_wrong_size_or_format_is_named(tmp_path: Path) -> None:
    root = make_kitti(tmp_path)
    bad = root / "segmentation" / DRIVE / "image_02" / "0000000003.png"
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(bad)
    with pytest.raises(DataError, match=f"{bad}.*60 x 60") as err:
        make_dm(root, tmp_path / "cache").setup("fit")
    assert "200 x 60" in str(err.value)
    # label ids read as train ids: a clear hint instead of a CUDA assert mid-epoch
    Image.fromarray(label_ids_image()).save(bad)
    with pytest.raises(DataError, match="label_format=label_ids"):
        make_dm(root, tmp_path / "cache", label_format="train_ids").setup("fit")


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_source"):
        KittiDataModule(tmp_path, tmp_path, label_source="segformer")
    dm = KittiDataModule(tmp_path, tmp_path)
    assert dm.cache_dir == tmp_path / "cache" and not dm.frame_cache


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_frame_cache_on_real_kitti_frames(tmp_path: Path) -> None:
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    lines = [f"2011_09_26/2011_09_26_drive_0000_sync {f} l" for f in range(1, 5)]
    (split_dir / "train_files.txt").write_text("\n".join(lines))
    dm = KittiDataModule(SAMPLE, split_dir, height=192, width=640, batch_size=2,
                         num_workers=0, use_labels=False, frame_cache=True,
                         cache_dir=tmp_path / "cache", flip_prob=0.0)
    train = dm.build_dataset("train")
    assert train.frame_rows is not None
    cache = train.frame_rows.cache
    assert cache.shape == (6, 192, 640, 3)  # frames 0..5, each decoded once
    frames = train[0]["frames"]
    direct = torch.stack([load_image(p, (192, 640)) for p in train.image_paths[0]])
    assert torch.equal(frames, direct)
    assert np.array_equal(cache.read(0), decode_rgb(train.image_paths[0][1], (192, 640)))
