"""`data=video_folder`: layout adapter, own split files, pixel intrinsics, training two steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fsre_lightning.config import validate_config
from fsre_lightning.data.kitti_layout import read_split
from fsre_lightning.data.synthetic import render_drive
from fsre_lightning.data.video_folder import VideoFolderDataModule, split_lines
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.runtime import CONFIG_DIR
from fsre_lightning.testing import compose_config
from fsre_lightning.train import run
from fsre_lightning.trained import training_intrinsics

H, W = 64, 192


def write_sequences(root: Path, lengths: dict[str, int], size: tuple[int, int] = (H, W)
                    ) -> Path:
    """Synthetic drives as one folder of arbitrarily named JPEGs per sequence."""
    for index, (name, n) in enumerate(lengths.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i, frame in enumerate(render_drive(index, n, *size, seed=0)):
            Image.fromarray(frame.rgb).save(folder / f"img_{i * 10:05d}.JPG", quality=95)
    return root


def test_layout_split_and_pixel_intrinsics(tmp_path: Path) -> None:
    root = write_sequences(tmp_path / "videos", {"morning drive": 5, "b": 4})
    (root / "empty").mkdir()
    dm = VideoFolderDataModule(root=root, work_dir=tmp_path / "work",
                               intrinsics=[111.36, 122.88, 96.0, 32.0],
                               intrinsics_units="pixels", val_fraction=0.25, height=H, width=W,
                               frame_cache=False, use_labels=False, num_workers=0,
                               batch_size=2)
    dm.prepare_data()
    # pixels divided by the native 192 x 64 frames
    np.testing.assert_allclose(dm.intrinsics, (0.58, 1.92, 0.5, 0.5))
    assert dm.work_dir.parent == tmp_path / "work" and dm.work_dir.name.startswith("videos-")
    train = read_split(dm.split_dir / "train_files.txt")
    val = read_split(dm.split_dir / "val_files.txt")
    # frames with both neighbours: 5 - 2 + 4 - 2 = 5 lines, a quarter (1) for validation
    assert len(train) + len(val) == 5 and len(val) == 1
    lines = {str(e) for e in train + val}
    assert lines == {"morning_drive 1 l", "morning_drive 2 l", "morning_drive 3 l",
                     "b 1 l", "b 2 l"}
    linked = dm.root / "morning_drive" / "image_02" / "data" / "0000000004.jpg"
    assert linked.resolve() == (root / "morning drive" / "img_00040.JPG").resolve()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (dm.batch_size, 3, 3, H, W)
    assert batch["K"][0, 0, 0] == pytest.approx(0.58 * W)

    # More frames: the layout and the splits follow, the seed keeps the choice reproducible.
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "b" / "img_00099.JPG")
    again = VideoFolderDataModule(root=root, work_dir=tmp_path / "work",
                                  intrinsics=[0.58, 1.92, 0.5, 0.5], val_fraction=0.25,
                                  height=H, width=W, use_labels=False)
    again.prepare_layout()
    assert sum(len(read_split(again.split_dir / f"{again.splits[s]}_files.txt"))
               for s in ("train", "val")) == 6
    manifest = json.loads((again.root / "layout.json").read_text())
    assert len(manifest["sequences"]["b"]) == 5
    assert split_lines({"s": list(range(9))}, [0, -1, 1], 0.3, seed=3) == split_lines(
        {"s": list(range(9))}, [0, -1, 1], 0.3, seed=3)

    # predict's camera_height on such a run: the pixel intrinsics normalised the same way
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"data:\n  root: {root}\n  intrinsics: [111.36, 122.88, 96.0, 32.0]\n"
        "  intrinsics_units: pixels\n")
    np.testing.assert_allclose(training_intrinsics(run_dir / "checkpoints" / "x.ckpt", None),
                               (0.58, 1.92, 0.5, 0.5))


def test_bad_folders_and_settings(tmp_path: Path) -> None:
    common = {"work_dir": tmp_path / "work", "intrinsics": [0.58, 1.92, 0.5, 0.5],
              "height": H, "width": W, "use_labels": False}
    with pytest.raises(DataError, match="missing_root"):
        VideoFolderDataModule(root=tmp_path / "missing_root", **common).prepare_data()
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(loose / "0001.png")
    with pytest.raises(DataError, match="move them into a subfolder"):
        VideoFolderDataModule(root=loose, **common).prepare_data()
    short = write_sequences(tmp_path / "short", {"a": 3})
    with pytest.raises(DataError, match="usable frames"):
        VideoFolderDataModule(root=short, **common).prepare_data()
    mixed = write_sequences(tmp_path / "mixed", {"a": 4})
    write_sequences(tmp_path / "mixed_b", {"b": 4}, size=(96, 320))
    (tmp_path / "mixed_b" / "b").rename(mixed / "b")
    with pytest.raises(DataError, match="one frame size"):
        VideoFolderDataModule(root=mixed, **{**common, "intrinsics_units": "pixels"}
                              ).prepare_data()
    with pytest.raises(ConfigError, match=r"data\.intrinsics"):
        VideoFolderDataModule(root=mixed, **{**common, "intrinsics": None})
    cfg = compose_config("train", ["data=video_folder", f"paths.root_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.root=None .* required with data=video_folder"):
        validate_config(cfg, "train")
    labelled = VideoFolderDataModule(root=mixed, **{**common, "use_labels": True})
    with pytest.raises(DataError, match="pseudolabel predict --root"):
        labelled.prepare_data()


class _StubSegFormer(torch.nn.Module):
    """Stands in for a Cityscapes SegFormer: road in the lower half, sky above."""

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        b, _, h, w = pixel_values.shape
        logits = torch.zeros(b, 19, h // 4, w // 4)
        logits[:, 10, : h // 8] = 1.0
        logits[:, 0, h // 8:] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.slow
def test_video_folder_config_trains_two_steps(tmp_path: Path, monkeypatch) -> None:
    root = write_sequences(tmp_path / "videos", {"a": 6, "b": 6})
    from fsre_lightning.data import label_caches as pseudolabel

    # The data module runs `pseudolabel predict`; only the SegFormer weights are stubbed.
    monkeypatch.setattr(pseudolabel, "load_segformer",
                        lambda model, device, allow_download=False: _StubSegFormer())
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    overrides = [
        "data=video_folder", f"data.root={root}", "data.intrinsics=[0.58,1.92,0.5,0.5]",
        f"data.pseudo_label_model={tmp_path / 'segformer'}", "data.pseudo_label_device=cpu",
        f"data.height={H}", f"data.width={W}", "data.batch_size=2", "data.num_workers=0",
        "data.cache_workers=1", "data.val_fraction=0.25", "logger=csv",
        "callbacks.progress_bar=null", "trainer.max_steps=2", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        # The full model (its segmentation decoder takes the pseudo-labels) on timm's test
        # ResNet; the weights alone at the end, no best checkpoint (only last.ckpt is checked).
        "model.network.pretrained=false", "model.network.encoder=test_resnet",
        "model.pose_network.encoder=test_resnet", "model.network.num_heads=1",
        "final_checkpoint=weights", "callbacks.best_checkpoint=null", f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.run_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(cfg)
    # No ground truth: no depth metrics, and no torchmetrics warning about it every validation.
    assert not [w for w in caught if "before the ``update``" in str(w.message)]
    assert results["global_step"] == 2
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    totals = [float(r.split(",")[header.index("train/total")]) for r in rows[1:]
              if r.split(",")[header.index("train/total")]]
    assert len(totals) == 2 and all(np.isfinite(totals))
    # the stub's road/sky pseudo-labels reached the loss
    segmentation = [r.split(",")[header.index("train/segmentation")] for r in rows[1:]]
    assert any(v and float(v) > 0 for v in segmentation)
    work = next((tmp_path / "data" / "video_folder").iterdir())
    assert (work / "splits" / "train_files.txt").is_file()
    assert list((work / "cache").glob("labels_predicted_train_*"))
