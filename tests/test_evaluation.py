"""The Eigen protocol as one function, flip post-processing, and the evaluate entry point."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict
from PIL import Image

from fsre_lightning.data import read_split
from fsre_lightning.errors import DataError
from fsre_lightning.evaluate import main as evaluate_main
from fsre_lightning.evaluate import run
from fsre_lightning.module import FSREModule
from fsre_lightning.scoring.eigen import (
    EIGEN_KEYS,
    evaluate_eigen,
    format_table_row,
    post_process_disparity,
    ramp_weights,
)
from fsre_lightning.scoring.metrics import DEPTH_METRIC_KEYS, DepthMetrics, garg_crop_box
from fsre_lightning.testing import compose_config, run_main

KEYS = {*EIGEN_KEYS, "num_frames", "num_frames_without_gt"}


def random_gt(seed: int, n: int = 3, size: tuple[int, int] = (30, 50)) -> list[np.ndarray]:
    """Sparse-ish maps in (1, 90) m: some beyond the 80 m cap, a third of the pixels empty."""
    rng = np.random.default_rng(seed)
    maps = []
    for _ in range(n):
        gt = rng.uniform(1.0, 90.0, size).astype(np.float32)
        gt[rng.random(size) < 0.33] = 0
        maps.append(gt)
    return maps


def disp_of(depths: list[np.ndarray]) -> list[np.ndarray]:
    return [np.where(d > 0, 1.0 / np.maximum(d, 1e-6), 1.0) for d in depths]


def test_perfect_prediction() -> None:
    gt = random_gt(0)
    out = evaluate_eigen(disp_of(gt), gt, crop="none")
    assert set(out) == KEYS and out["num_frames"] == 3
    assert out["abs_rel"] < 1e-6 and out["rmse"] < 1e-4 and out["a1"] == 1.0
    assert out["ratio_median"] == pytest.approx(1.0) and out["ratio_std"] < 1e-6


def test_global_scale_is_removed_by_median_scaling_only() -> None:
    gt = random_gt(1)
    rng = np.random.default_rng(2)
    noisy = [g * rng.uniform(0.8, 1.25, g.shape) for g in gt]
    doubled = [2.0 * n for n in noisy]
    scaled_ref = evaluate_eigen(disp_of(noisy), gt)
    scaled = evaluate_eigen(disp_of(doubled), gt)
    raw_ref = evaluate_eigen(disp_of(noisy), gt, median_scaling=False)
    raw = evaluate_eigen(disp_of(doubled), gt, median_scaling=False)
    for key in DEPTH_METRIC_KEYS:
        assert scaled[key] == pytest.approx(scaled_ref[key], rel=1e-6, abs=1e-9)
    assert scaled["ratio_median"] == pytest.approx(scaled_ref["ratio_median"] / 2, rel=1e-6)
    assert raw["abs_rel"] > raw_ref["abs_rel"] + 0.5 and raw["a1"] < raw_ref["a1"] - 0.3
    assert raw["rmse"] > raw_ref["rmse"]
    # Without median scaling the ratio is still reported, but not applied.
    assert raw["ratio_median"] == pytest.approx(scaled["ratio_median"])


def test_hand_computed_values() -> None:
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    disp = np.full((2, 2), 0.5)  # depth 2 everywhere
    raw = evaluate_eigen([disp], [gt], median_scaling=False, crop="none")
    # |g - p| / g = 1, 0, 1/2, 3/4; (g - p)^2 = 1, 0, 4, 36; max(g/p, p/g) = 2, 1, 2, 4
    assert raw["abs_rel"] == pytest.approx((1 + 0 + 0.5 + 0.75) / 4)
    assert raw["sq_rel"] == pytest.approx((1 / 1 + 0 + 4 / 4 + 36 / 8) / 4)
    assert raw["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4 + 36) / 4))
    assert raw["rmse_log"] == pytest.approx(math.log(2) * math.sqrt((1 + 0 + 1 + 4) / 4))
    assert raw["a1"] == raw["a2"] == raw["a3"] == 0.25
    # median(gt) = (2 + 4) / 2 = 3 (numpy's even-count median, as Monodepth2): pred -> 3
    scaled = evaluate_eigen([disp], [gt], crop="none")
    assert scaled["ratio_median"] == pytest.approx(1.5)
    assert scaled["abs_rel"] == pytest.approx((2 / 1 + 1 / 2 + 1 / 4 + 5 / 8) / 4)
    # max(g/p, p/g) = 3, 1.5, 4/3, 8/3 against 1.25, 1.5625, 1.953
    assert (scaled["a1"], scaled["a2"], scaled["a3"]) == (0.0, 0.5, 0.5)
    # caps: gt at 80 m or more is ignored, predictions are clamped to 80 m
    far = evaluate_eigen([np.full((1, 2), 1 / 200.0)], [np.array([[50.0, 80.0]])],
                         median_scaling=False, crop="none")
    assert far["abs_rel"] == pytest.approx(30 / 50) and far["num_frames"] == 1


def test_garg_crop_box_is_the_spec_fractions() -> None:
    h, w = 375, 1242
    top, bottom, left, right = garg_crop_box(h, w)
    assert (top, bottom, left, right) == (int(0.40810811 * h), int(0.99189189 * h),
                                          int(0.03594771 * w), int(0.96405229 * w))
    assert (top, bottom, left, right) == (153, 371, 44, 1197)
    gt = np.full((h, w), 10.0)
    inside = np.full((h, w), 1 / 10.0)
    wrong_outside = np.full((h, w), 1 / 40.0)
    wrong_outside[top:bottom, left:right] = 1 / 10.0
    kwargs = {"median_scaling": False}
    assert evaluate_eigen([wrong_outside], [gt], **kwargs)["abs_rel"] < 1e-9
    assert evaluate_eigen([wrong_outside], [gt], crop="none", **kwargs)["abs_rel"] > 0.5
    for v, u in ((top, left), (bottom - 1, right - 1)):  # the box's corners are inside
        corner = inside.copy()
        corner[v, u] = 1 / 40.0
        assert evaluate_eigen([corner], [gt], **kwargs)["abs_rel"] > 0


def test_predictions_are_resized_to_the_ground_truth() -> None:
    gt = np.full((60, 100), 4.0)
    out = evaluate_eigen([torch.full((1, 1, 12, 20), 0.25)], [gt], crop="none",
                         median_scaling=False)
    assert out["abs_rel"] < 1e-9


def test_same_numbers_as_the_validation_metric() -> None:
    gt = random_gt(3, n=2)
    disp = [d * np.random.default_rng(4).uniform(0.7, 1.4, d.shape) for d in disp_of(gt)]
    metric = DepthMetrics(crop="garg")
    metric.update(torch.from_numpy(np.stack(disp))[:, None],
                  torch.from_numpy(np.stack(gt))[:, None])
    batched = metric.compute()
    ours = evaluate_eigen(disp, gt)
    for key in EIGEN_KEYS:
        assert ours[key] == pytest.approx(float(batched[key]), rel=1e-12)


def test_bad_input() -> None:
    gt = random_gt(5, n=2)
    with pytest.raises(ValueError, match="gt_depths has more entries"):
        evaluate_eigen(disp_of(gt)[:1], gt)
    with pytest.raises(ValueError, match=r"pred_disps\[0\] has shape \(2, 30, 50\)"):
        evaluate_eigen([np.ones((2, 30, 50))], gt[:1])
    with pytest.raises(ValueError, match="no image had a valid ground-truth pixel"):
        evaluate_eigen([np.ones((4, 4))], [np.zeros((4, 4))])


def test_post_processing_blends_towards_each_border() -> None:
    disp = torch.ones(2, 1, 8, 100)
    disp_of_flipped = torch.full((2, 1, 8, 100), 3.0)
    out = post_process_disparity(disp, disp_of_flipped)
    assert torch.allclose(out[..., :5], torch.tensor(3.0))    # x <= 5 %: the mirrored one
    assert torch.allclose(out[..., 10:90], torch.tensor(2.0))  # 10 %..90 %: the average
    assert torch.allclose(out[..., 95:], torch.tensor(1.0))   # x >= 95 %: the direct one
    left, right = ramp_weights(100)
    assert torch.all(left[:-1] >= left[1:]) and torch.equal(right, left.flip(0))
    # the mirrored prediction is flipped back before blending
    ramp = torch.linspace(1, 2, 100).expand(1, 1, 4, 100)
    assert torch.allclose(post_process_disparity(ramp, ramp.flip(-1)), ramp)


def test_table_row() -> None:
    values = dict(zip(DEPTH_METRIC_KEYS, [0.105, 0.722, 4.547, 0.182, 0.886, 0.964, 0.984],
                      strict=True))
    header, row = format_table_row(values).splitlines()
    names = ["AbsRel", "SqRel", "RMSE", "RMSlog", "d1", "d2", "d3"]  # as the report's columns
    assert header.split() == [k for name in names for k in (name, "|")][:-1]
    assert row.count("&") == 7 and row.endswith("\\\\") and "4.547" in row


# ------------------------------------------------------------------- evaluate entry point
TINY_DATA = ["data=synthetic", "data.batch_size=4", "data.num_workers=0",
             "++data.synthetic.num_drives=3", "++data.synthetic.frames_per_drive=8",
             "++data.synthetic.height=64", "++data.synthetic.width=192"]
# The full model (segmentation, CMA) on timm's tiny test ResNet: what is scored does not
# depend on the encoder.
NETWORK = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
           "cma_scales": [4, 3, 2]}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "test_resnet"}


@pytest.fixture(scope="module")
def tiny_run(module_tmp: Callable[[str], Path]) -> Path:
    """A run folder: a randomly initialised model's checkpoint and the run's config.yaml."""
    run_dir = module_tmp("run")
    torch.manual_seed(0)
    module = FSREModule(network=NETWORK, pose_network=POSE, image_log_every_n_steps=0)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "config.yaml").write_text("data:\n  height: 64\n  width: 192\n")
    return run_dir


def _compose(tmp_path: Path, overrides: list[str]):
    """The config as the command line composes it, its overrides recorded where evaluate
    reads them (`data=synthetic` of TINY_DATA is the command line's data group, not the
    checkpoint's training data)."""
    base = [f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'outputs'}", *TINY_DATA]
    cfg = compose_config("evaluate", [*base, *overrides], hydra=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "outputs" / "evaluate")
        cfg.hydra.runtime.cwd = str(tmp_path)
    HydraConfig.instance().set_config(cfg)  # conftest restores Hydra's after the test
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.slow
def test_evaluate_scores_every_test_frame(tmp_path: Path, tiny_run: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    metrics_path = tmp_path / "metrics.json"
    results = run(_compose(tmp_path, [f"ckpt_path={ckpt}", f"metrics_path={metrics_path}"]))
    written = json.loads(metrics_path.read_text())
    assert set(written) >= KEYS and written["num_frames"] == results["num_frames"]
    test_split = tmp_path / "data" / "synthetic" / "splits" / "synthetic" / "test_files.txt"
    assert written["num_frames"] == len(read_split(test_split)) == 6
    assert all(math.isfinite(written[key]) for key in EIGEN_KEYS)
    settings = written["settings"]
    # the training run's resolution, not the data config's default (96 x 320)
    assert (settings["height"], settings["width"]) == (64, 192)
    assert settings["crop"] == "none" and not settings["post_process"]
    assert "miou" not in written
    # Only the test split was read: no train/val cache was built (a corrupt training frame
    # or a 15-20 GB KITTI cache build must not stand between a checkpoint and its score).
    assert not (tmp_path / "data" / "cache").exists()


@pytest.mark.slow
def test_evaluate_reports_missing_checkpoint_and_ground_truth(tmp_path: Path,
                                                              tiny_run: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run(_compose(tmp_path, [f"ckpt_path={tmp_path / 'none.ckpt'}"]))
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    cfg = _compose(tmp_path, [f"ckpt_path={ckpt}", f"data.test_gt_file={tmp_path / 'no.npz'}"])
    with pytest.raises(DataError, match=r"no\.npz not found"):
        run(cfg)
    cfg = _compose(tmp_path, [f"ckpt_path={ckpt}", f"data.split_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"test_files\.txt not found"):
        run(cfg)


def make_semantics(tmp_path: Path) -> Path:
    """Two KITTI 2015 semantic training pairs (label ids: road 7, car 26, void 0)."""
    root = tmp_path / "data_semantics"
    rng = np.random.default_rng(0)
    for name in ("000000_10", "000001_10"):
        image = root / "training" / "image_2" / f"{name}.png"
        label = root / "training" / "semantic" / f"{name}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        label.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (50, 160, 3), dtype=np.uint8)).save(image)
        ids = np.full((50, 160), 7, np.uint8)
        ids[:, 80:], ids[:5] = 26, 0
        Image.fromarray(ids).save(label)
    return root


@pytest.mark.slow
def test_cli_with_post_processing_and_semantics(command_root: Path, tiny_run: Path) -> None:
    tmp_path = command_root
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "post_process=true",
            f"semantics_dir={make_semantics(tmp_path)}", *TINY_DATA]
    result = run_main(evaluate_main, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("&") == 7 and "6 frames scored" in result.stdout
    written = json.loads((ckpt.parent / "last.eval-synthetic-pp.json").read_text())
    assert set(written) >= KEYS and written["num_frames"] == 6
    assert written["settings"]["post_process"] is True
    assert 0.0 <= written["miou"] <= 1.0 and written["num_semantic_images"] == 2

    missing = run_main(evaluate_main, [f"ckpt_path={tmp_path / 'missing.ckpt'}", *TINY_DATA])
    assert missing.returncode == 2 and "missing.ckpt" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "outputs").exists()  # the metrics go beside the checkpoint
