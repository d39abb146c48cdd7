"""KittiDataModule on a tiny hand-made KITTI-layout folder (and the real sample when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsre_lightning.cityscapes import LABEL_ID_TO_TRAIN_ID
from fsre_lightning.data import KittiDataModule, load_gt_depths, read_split, save_gt_depths
from fsre_lightning.data.augment import FrameConsistentColorJitter
from fsre_lightning.data.dataset import collate
from fsre_lightning.errors import DataError

DRIVE = "2011_01_01/2011_01_01_drive_0001_sync"
H, W = 64, 192
SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "kitti_sample" / "2011_09_26"


def make_root(tmp_path: Path, frames: int = 6, ext: str = "png", size=(70, 230)) -> Path:
    """A drive of `frames` random images with train-id labels; frames 1..frames-2 in splits."""
    root = tmp_path / "root"
    rng = np.random.default_rng(0)
    for f in range(frames):
        img = root / DRIVE / "image_02" / "data" / f"{f:010d}.{ext}"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(img)
        label = root / "segmentation" / DRIVE / "image_02" / f"{f:010d}.png"
        label.parent.mkdir(parents=True, exist_ok=True)
        lab = np.zeros(size, dtype=np.uint8)
        lab[:, size[1] // 2:] = 13  # left half road, right half car
        Image.fromarray(lab).save(label)
    splits = root / "splits" / "tiny"
    splits.mkdir(parents=True)
    lines = [f"{DRIVE} {f} l" for f in range(1, frames - 1)]
    for name in ("train", "val", "test"):
        (splits / f"{name}_files.txt").write_text("\n".join(lines) + "\n")
    save_gt_depths(splits / "gt_depths_val.npz", [np.full((30, 40), 5.0)] * len(lines))
    save_gt_depths(splits / "gt_depths.npz",
                   [np.full((30 + i, 40), 5.0) for i in range(len(lines))])
    return root


def make_dm(root: Path, **kwargs) -> KittiDataModule:
    args = {"root": root, "split_dir": root / "splits" / "tiny", "height": H, "width": W,
            "batch_size": 2, "num_workers": 0, "eval_crop": "none"}
    return KittiDataModule(**{**args, **kwargs})


def test_batch_keys_shapes_and_intrinsics(tmp_path: Path) -> None:
    dm = make_dm(make_root(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (2, 3, 3, H, W) and batch["frames"].dtype == torch.float32
    assert float(batch["frames"].min()) >= 0.0 and float(batch["frames"].max()) <= 1.0
    assert batch["labels"].shape == (2, H, W) and batch["labels"].dtype == torch.long
    assert set(torch.unique(batch["labels"]).tolist()) <= {0, 13}
    K = batch["K"][0]
    assert K[0, 0] == pytest.approx(0.58 * W) and K[1, 1] == pytest.approx(1.92 * H)
    assert K[0, 2] == pytest.approx(0.5 * W) and K[1, 2] == pytest.approx(0.5 * H)
    assert torch.allclose(batch["inv_K"] @ batch["K"], torch.eye(4).expand(2, 4, 4), atol=1e-5)
    assert batch["index"].dtype == torch.long and len(batch["name"]) == 2
    out = dm.on_after_batch_transfer(batch, 0)  # no trainer: not training, no jitter
    assert torch.equal(out["frames_aug"], out["frames"])

    val = next(iter(dm.val_dataloader()))
    assert val["depth_gt"].shape == (2, 1, 30, 40) and val["gt_size"].tolist() == [[30, 40]] * 2
    assert dm.has_val_gt

    dm.setup("test")
    test = next(iter(dm.test_dataloader()))
    assert test["frames"].shape == (2, 1, 3, H, W)
    assert test["depth_gt"].shape == (2, 1, 31, 40)  # padded to the larger map
    assert test["gt_size"].tolist() == [[30, 40], [31, 40]]
    assert float(test["depth_gt"][0, 0, 30].abs().sum()) == 0


def test_frame_order_follows_frame_ids(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    dm = make_dm(root, flip_prob=0.0)
    dm.setup("fit")
    item = dm.datasets["train"][0]  # line "<drive> 1 l": frames 1, 0, 2
    direct = dm.datasets["train"].image_paths[0]
    assert [p.stem for p in direct] == ["0000000001", "0000000000", "0000000002"]
    assert item["frames"].shape[0] == 3


def test_flip_mirrors_frames_labels_and_principal_point(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    plain = make_dm(root, flip_prob=0.0, intrinsics=(0.58, 1.92, 0.3, 0.5))
    flipped = make_dm(root, flip_prob=1.0, intrinsics=(0.58, 1.92, 0.3, 0.5))
    plain.setup("fit")
    flipped.setup("fit")
    a, b = plain.datasets["train"][1], flipped.datasets["train"][1]
    assert torch.equal(b["frames"], a["frames"].flip(-1))
    assert torch.equal(b["labels"], a["labels"].flip(-1))
    assert a["K"][0, 2] == pytest.approx(0.3 * W) and b["K"][0, 2] == pytest.approx(0.7 * W)
    # validation is never flipped
    assert torch.equal(flipped.datasets["val"][1]["frames"], plain.datasets["val"][1]["frames"])


def test_colour_jitter_is_shared_by_the_frames_of_a_sample() -> None:
    torch.manual_seed(0)
    base = torch.rand(4, 1, 3, 16, 16)
    frames = base.expand(4, 3, 3, 16, 16).contiguous()  # three identical frames per sample
    out = FrameConsistentColorJitter(p=1.0)(frames)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 0], out[:, 2])
    assert not torch.allclose(out[0, 0], frames[0, 0])
    per_sample = (out[:, 0] - frames[:, 0]).abs().mean((1, 2, 3))
    assert len(set(per_sample.round(decimals=4).tolist())) == 4  # samples differ
    assert torch.equal(FrameConsistentColorJitter(p=0.0)(frames), frames)


def test_label_ids_map_to_train_ids() -> None:
    assert LABEL_ID_TO_TRAIN_ID[7] == 0 and LABEL_ID_TO_TRAIN_ID[26] == 13
    assert LABEL_ID_TO_TRAIN_ID[33] == 18 and LABEL_ID_TO_TRAIN_ID[0] == 255
    assert LABEL_ID_TO_TRAIN_ID[255] == 255


def test_jpg_frames_and_split_parsing(tmp_path: Path) -> None:
    root = make_root(tmp_path, ext="jpg")
    dm = make_dm(root)
    dm.setup("fit")
    assert dm.datasets["train"].image_paths[0][0].suffix == ".jpg"
    split = tmp_path / "s.txt"
    split.write_text("a/b_sync 5 r\na/b_sync 7\n\n")
    entries = read_split(split)
    assert [(e.frame, e.camera) for e in entries] == [(5, "image_03"), (7, "image_02")]
    split.write_text("a/b_sync five l\n")
    with pytest.raises(DataError, match=r"s\.txt:1"):
        read_split(split)


def test_gt_roundtrip_is_pickle_free(tmp_path: Path) -> None:
    maps = [np.random.rand(3, 4).astype(np.float32), np.zeros((5, 2), np.float32)]
    path = save_gt_depths(tmp_path / "gt.npz", maps)
    loaded = load_gt_depths(path)
    assert all(np.array_equal(a, b) for a, b in zip(maps, loaded, strict=True))
    np.savez_compressed(tmp_path / "bad.npz", data=np.zeros(2))
    with pytest.raises(DataError, match=r"bad\.npz"):
        load_gt_depths(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("root", "does not exist"),
        ("split_dir", "does not exist"),
        ("empty_split", "is empty"),
        ("label", "1 pseudo-labels missing"),
        ("frame", "images missing"),
    ],
)
def test_bad_data_is_reported_at_setup(tmp_path: Path, change: str, fragment: str) -> None:
    root = make_root(tmp_path)
    kwargs = {}
    if change == "root":
        kwargs = {"split_dir": root / "splits" / "tiny"}
        root = tmp_path / "nowhere"
    elif change == "split_dir":
        kwargs["split_dir"] = tmp_path / "nosplits"
    elif change == "empty_split":
        (root / "splits" / "tiny" / "train_files.txt").write_text("\n")
    elif change == "label":
        missing = root / "segmentation" / DRIVE / "image_02" / "0000000002.png"
        missing.unlink()
        fragment = f"{fragment}, e.g.:\n  {missing}"
    elif change == "frame":
        (root / DRIVE / "image_02" / "data" / "0000000005.png").unlink()
    dm = make_dm(root, **kwargs)
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert fragment in str(err.value)


def test_size_must_be_a_multiple_of_32(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"height=100 is not allowed: .*multiple of 32"):
        KittiDataModule(tmp_path, tmp_path, height=100, width=192)


def test_collate_pads_ground_truth() -> None:
    items = [{"depth_gt": torch.ones(1, 2, 3), "index": 0, "name": "a"},
             {"depth_gt": torch.ones(1, 3, 2), "index": 1, "name": "b"}]
    batch = collate(items)
    assert batch["depth_gt"].shape == (2, 1, 3, 3)
    assert batch["gt_size"].tolist() == [[2, 3], [3, 2]]


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="shared/kitti_sample not present")
def test_real_kitti_frames_load(tmp_path: Path) -> None:
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    lines = [f"2011_09_26/2011_09_26_drive_0000_sync {f} l" for f in range(1, 5)]
    (split_dir / "train_files.txt").write_text("\n".join(lines))
    (split_dir / "val_files.txt").write_text("\n".join(lines[:2]))
    dm = KittiDataModule(SAMPLE.parent, split_dir, height=H, width=W, batch_size=2,
                         num_workers=0, use_labels=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (2, 3, 3, H, W) and "labels" not in batch
    # the native frames are 1242 x 375
    with Image.open(dm.datasets["train"].image_paths[0][0]) as img:
        assert img.size == (1242, 375)
