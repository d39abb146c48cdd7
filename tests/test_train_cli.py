"""The training entry point end to end: Hydra composition, a short run, resume, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fsre_lightning.testing import (
    TINY_SYNTHETIC,
    command_env,
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


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(command: Any) -> None:
    result = command("train", ["+experiment=ablation_cma", "--cfg", "job"])
    assert result.returncode == 0, result.stderr
    assert "sgt_kernel_size: 5" in result.stdout and "cma_scales:" in result.stdout


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
    result = command("train", [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
                               "eval_before=true", f"hydra.run.dir={run_dir}"])
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


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_last_checkpoint(tmp_path: Path, command: Any) -> None:
    run_dir = tmp_path / "run"
    env = command_env(tmp_path)
    args = [*TINY, "model=monodepth2", "trainer.max_steps=100000",
            "callbacks.last_checkpoint.every_n_train_steps=1000", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "fsre_lightning.train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_csv = run_dir / "csv" / "version_0" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # The CSV logger flushes every log_every_n_steps: training is under way.
        if metrics_csv.exists() and "train/total" in metrics_csv.read_text():
            break
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.exists(), output[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert step >= 1

    resumed_dir = tmp_path / "resumed"
    result = command("train", [*TINY, "model=monodepth2", f"trainer.max_steps={step + 2}",
                               f"ckpt_path={last}", f"hydra.run.dir={resumed_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((resumed_dir / "metrics.json").read_text())["global_step"] == step + 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("encoder", "pose_encoder"),
    [("convnext_atto", "resnet18"), ("efficientnet_b0", "resnet18"),
     ("regnetx_002", "regnetx_002")],
)
def test_smoke_trains_with_other_encoder_families(tmp_path: Path, command: Any, encoder: str,
                                                  pose_encoder: str) -> None:
    """Any timm features_only encoder (docs/design.md 3.1): ConvNeXt (maps from 1/4),
    EfficientNet and RegNet (from 1/2, also as the pose encoder) run +experiment=smoke, and the
    checkpoint rebuilds the same networks on its own."""
    from fsre_lightning.module import FSREModule

    run_dir = tmp_path / "run"
    result = command("train", ["+experiment=smoke", f"model.network.encoder={encoder}",
                               "model.network.pretrained=false",
                               f"model.pose_network.encoder={pose_encoder}", "logger=csv",
                               f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["after"]["abs_rel"] > 0
    module = FSREModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt",
                                             map_location="cpu")
    assert module.net.encoder.name == encoder and module.pose_net.encoder.name == pose_encoder


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
@pytest.mark.slow
def test_bad_input_fails_before_training_with_a_clear_message(
    tmp_path: Path, command: Any, override: str, fragment: str
) -> None:
    result = command("train", [*TINY, "data.synthetic=null", override])
    assert result.returncode == 2, result.stderr[-3000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    # No run folder of Hydra's bookkeeping only is left behind.
    assert not list((tmp_path / "outputs").rglob("*"))


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
@pytest.mark.slow
def test_what_only_the_machine_knows_fails_before_any_data_work(
    tmp_path: Path, command: Any, override: str, fragment: str
) -> None:
    """Encoder name, ImageNet weights (offline: the suite sets HF_HUB_OFFLINE), a GPU, a
    logger's optional package: each one line and exit 2, before the synthetic scenes exist."""
    key = override.split("=")[0]
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith(f"{key}=")]
    result = command("train", [*overrides, "logger=csv", override])
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
    assert not list((tmp_path / "outputs").rglob("*"))
