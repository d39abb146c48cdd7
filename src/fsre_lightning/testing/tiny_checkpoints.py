"""Randomly initialised checkpoints in run folders, for the predict and export tests.

ResNet-18 networks by default (what a release holds); `encoder="test_resnet"` (timm's
0.4 M-parameter test ResNet) where the encoder does not matter: faster to run and to export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fsre_lightning.checkpoints import TRAINING_DATA_KEY, training_data_entry
from fsre_lightning.module import FSREModule

POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18",
        "pretrained": False}


def network(segmentation: bool = True, encoder: str = "resnet18") -> dict[str, Any]:
    return {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": encoder,
            "pretrained": False, "segmentation": segmentation,
            "cma_scales": [4, 3, 2] if segmentation else []}


def pose(encoder: str = "resnet18") -> dict[str, Any]:
    return {**POSE, "encoder": encoder}


def save_checkpoint(module: FSREModule, path: Path) -> Path:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


# A camera that is not KITTI's, so a test sees where the intrinsics came from.
INTRINSICS = (0.58, 1.92, 0.5, 0.5)


def make_run(run_dir: Path, segmentation: bool = True, height: int = 64, width: int = 192,
             legacy: bool = False, encoder: str = "resnet18") -> Path:
    """run_dir/checkpoints/last.ckpt describing its training data (size, `INTRINSICS`) as
    training writes it; `legacy=True`: as older versions wrote it, the description only in the
    run's config.yaml. `encoder`: of both networks."""
    torch.manual_seed(0)
    module = FSREModule(network=network(segmentation, encoder), pose_network=pose(encoder),
                        image_log_every_n_steps=0)
    ckpt = save_checkpoint(module, run_dir / "checkpoints" / "last.ckpt")
    if legacy:
        (run_dir / "config.yaml").write_text(
            f"data:\n  height: {height}\n  width: {width}\n  intrinsics: {list(INTRINSICS)}\n")
        return ckpt
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint[TRAINING_DATA_KEY] = training_data_entry(height, width, INTRINSICS, (0, -1, 1),
                                                        segmentation)
    torch.save(checkpoint, ckpt)
    return ckpt


def make_mismatched(path: Path, encoder: str = "resnet18") -> Path:
    """A Monodepth2 checkpoint whose hyper-parameters claim the full model (as when a run
    folder's checkpoint is swapped for another model's)."""
    torch.manual_seed(0)
    module = FSREModule(network=network(False, encoder), pose_network=pose(encoder),
                        image_log_every_n_steps=0)
    save_checkpoint(module, path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["network"] = network(True, encoder)
    torch.save(checkpoint, path)
    return path
