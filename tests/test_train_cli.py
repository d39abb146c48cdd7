"""The training entry point end to end: Hydra composition, a short run, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fsre_lightning import train
from fsre_lightning.testing import (
    TINY_SYNTHETIC,
    compose_config,
    experiments,
    installed,
)

EXPERIMENTS = experiments()

TINY = [*TINY_SYNTHETIC, "logger=csv", "trainer.limit_val_batches=2",
        "callbacks.progress_bar=null"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    from fsre_lightning.config import validate_config

    cfg = compose_config("train", [f"+experiment={experiment}"])
    validate_config(cfg, "train")
    assert cfg.model.network._target_ == "fsre_lightning.models.FSRENetwork"


def test_monodepth2_model_drops_every_semantic_part() -> None:
    cfg = compose_config("train", ["model=monodepth2"])
    assert cfg.model.network.segmentation is False
    assert list(cfg.model.network.cma_scales) == []
    assert cfg.loss.segmentation_weight == 0 and cfg.loss.sgt_weight == 0
    assert cfg.data.use_labels is False
    assert cfg.model._target_ == "fsre_lightning.module.FSREModule"


@pytest.mark.slow
def test_two_steps_write_checkpoints_config_and_metrics(tmp_path: Path, command: Any) -> None:
    run_dir = tmp_path / "run"
    # eval_before then mid-training validation: metric states reset under inference mode
    # must still accept updates during fit.
    # The full model (segmentation, CMA, SGT) on timm's tiny test ResNet.
    result = command("train", [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
                               "eval_before=true", "model.network.encoder=test_resnet",
                               "model.pose_network.encoder=test_resnet",
                               "model.network.num_heads=1", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing that says nothing about the run: each such warning was fixed or silenced for
    # its reason (runtime.quiet_known_noise), so that a real one is seen.
    noise = [line for line in (result.stdout + result.stderr).splitlines()
             if "warn" in line.lower() or "Tip:" in line]
    assert not noise, noise
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert {"abs_rel", "rmse", "a1"} <= set(metrics["after"]) <= set(metrics["before"])
    last = run_dir / "checkpoints" / "last.ckpt"
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert "sgt_kernel_size: 5" in (run_dir / "config.yaml").read_text()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"]
    # best-*.ckpt: the weights and what they need to be used alone; the optimiser state,
    # two thirds of last.ckpt, is for resuming, which starts from last.ckpt.
    best_ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best_ckpt and "callbacks" not in best_ckpt
    assert best_ckpt["training_data"] == ckpt["training_data"]
    assert best_ckpt["training_data"]["input_size"] == [64, 192]
    assert best.stat().st_size < 0.5 * last.stat().st_size


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.height=100", "data.height=100"),
        ("loss.sgt_kernel_size=4", "loss.sgt_kernel_size=4"),
        ("model.network.num_heads=0", "model.network.num_heads=0"),
        ("model.network.cma_scales=[5]", "model.network.cma_scales"),
        ("loss.sgt_scales=[7]", "loss.sgt_scales"),
        ("data.root=/nonexistent/kitti", "/nonexistent/kitti"),
    ],
)
@pytest.mark.slow  # the command line end to end (in-process)
def test_bad_input_fails_before_training_with_a_clear_message(
    command_root: Path, capsys: pytest.CaptureFixture[str], override: str, fragment: str
) -> None:
    status = train.main([*TINY, "data.synthetic=null", override])
    stderr = capsys.readouterr().err
    assert status == 2, stderr[-3000:]
    assert fragment in stderr
    assert "Traceback" not in stderr
    # No run folder of Hydra's bookkeeping only is left behind.
    assert not list((command_root / "outputs").rglob("*"))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.network.encoder=notamodel", "model.network.encoder='notamodel' is not allowed"),
        ("model.network.encoder=vit_tiny_patch16_224",
         "model.network.encoder='vit_tiny_patch16_224' is not allowed: its features_only levels "
         "are at reductions [16, 16, 16]"),
        ("model.pose_network.encoder=swin_tiny_patch4_window7_224",
         "model.pose_network.encoder='swin_tiny_patch4_window7_224' is not allowed: it fails"),
        ("model.network.pretrained=true", "ImageNet weights of encoder 'resnet18.tv_in1k'"),
        pytest.param("trainer=gpu", "no CUDA device is visible", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param("logger=tensorboard", "needs a package that is not installed",
                     marks=pytest.mark.skipif(installed("tensorboard"),
                                              reason="tensorboard is installed")),
    ],
)
@pytest.mark.slow  # the command line end to end (in-process)
def test_what_only_the_machine_knows_fails_before_any_data_work(
    command_root: Path, capsys: pytest.CaptureFixture[str], no_network: None, override: str,
    fragment: str
) -> None:
    """Encoder name, ImageNet weights (offline: the suite sets HF_HUB_OFFLINE), a GPU, a
    logger's optional package: each one line and exit 2, before the synthetic scenes exist."""
    key = override.split("=")[0]
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith(f"{key}=")]
    status = train.main([*overrides, "logger=csv", override])
    stderr = capsys.readouterr().err
    assert status == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (command_root / "data").exists()
    assert not list((command_root / "outputs").rglob("*"))
