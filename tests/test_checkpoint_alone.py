"""A checkpoint stands alone: it records its training data, loads without the ImageNet file it
started from, and older checkpoints still load from their run folder (with a warning)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch

from fsre_lightning.checkpoints import TRAINING_DATA_KEY, load_checkpoint_weights_only
from fsre_lightning.cityscapes import CLASS_NAMES, NUM_CLASSES
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.errors import ConfigError
from fsre_lightning.module import FSREModule
from fsre_lightning.testing.tiny_checkpoints import (
    INTRINSICS,
    POSE,
    make_run,
    network,
    save_checkpoint,
)
from fsre_lightning.trained import load_module, training_intrinsics, training_resolution


def _alone(ckpt: Path, folder: Path) -> Path:
    folder.mkdir()
    return Path(shutil.copy(ckpt, folder / "model.ckpt"))


def test_a_copied_checkpoint_knows_its_size_and_camera(tmp_path: Path, caplog) -> None:
    ckpt = _alone(make_run(tmp_path / "run", height=96, width=320), tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        height, width, source = training_resolution(ckpt)
        assert (height, width) == (96, 320) and str(ckpt) in source
        assert training_intrinsics(ckpt, None) == pytest.approx(INTRINSICS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    entry = load_checkpoint_weights_only(ckpt)[TRAINING_DATA_KEY]
    assert entry["frame_ids"] == [0, -1, 1]
    assert entry["class_names"] == list(CLASS_NAMES) and len(CLASS_NAMES) == NUM_CLASSES


def test_an_older_checkpoint_reads_its_run_folder_with_a_warning(tmp_path: Path, caplog) -> None:
    ckpt = make_run(tmp_path / "run", height=96, width=320, legacy=True)
    with caplog.at_level(logging.WARNING):
        assert training_resolution(ckpt)[:2] == (96, 320)
        assert training_intrinsics(ckpt, None) == pytest.approx(INTRINSICS)
    assert "does not describe its training data" in caplog.text
    alone = _alone(ckpt, tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="set height= and width="):
        training_resolution(alone)
    assert training_intrinsics(alone, None) == KITTI_INTRINSICS
    assert training_resolution(alone, 64, 192)[:2] == (64, 192)


def test_a_model_started_from_imagenet_loads_without_that_file(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    torch.manual_seed(0)
    pretrained = {**network(segmentation=False), "pretrained": True, "weights_path": str(weights)}
    module = FSREModule(network=pretrained, pose_network={**POSE, "pretrained": True,
                                                          "weights_path": str(weights)})
    ckpt = save_checkpoint(module, tmp_path / "run" / "checkpoints" / "last.ckpt")
    weights.unlink()  # another machine: the ImageNet file is not there
    assert module.hparams["network"]["pretrained"] is True  # the live module is unchanged
    loaded = FSREModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert loaded.hparams["network"]["pretrained"] is False
    assert load_module(ckpt, torch.device("cpu")).hparams["pose_network"]["weights_path"] is None
