"""Evaluate a checkpoint: `python -m fsre_lightning.evaluate ckpt_path=... [overrides]`.

    # KITTI Eigen test (after `python -m fsre_lightning.export_gt data.root=/data/kitti_raw`)
    python -m fsre_lightning.evaluate ckpt_path=run/checkpoints/last.ckpt data=kitti \\
        data.root=/data/kitti_raw data.split_dir=/data/splits/eigen [post_process=true] \\
        [semantics_dir=/data/data_semantics]
    # the built-in synthetic scenes (the default data config)
    python -m fsre_lightning.evaluate ckpt_path=outputs/demo/<run>/checkpoints/last.ckpt

Depth: the test split of `data` (test_files.txt and gt_depths.npz of data.split_dir) at the
training resolution, scored by `evaluation.evaluate_eigen` with data.eval_crop and the data
config's depth caps. Segmentation (when `semantics_dir` is given and the model has a
segmentation decoder): 19-class mIoU on the KITTI 2015 semantic training images. The metrics
are printed (the paper's table row) and written as JSON.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import check_writable
from fsre_lightning.data.kitti import KittiDataModule
from fsre_lightning.data.kitti_layout import GT_FILE_NAMES
from fsre_lightning.errors import DataError
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import resolve_device, write_json
from fsre_lightning.scoring.eigen import (
    evaluate_depth,
    evaluate_segmentation,
    format_table_row,
    semantic_pairs,
)
from fsre_lightning.trained import load_module, training_resolution

log = logging.getLogger(__name__)


def build_test_datamodule(cfg: DictConfig, height: int, width: int) -> KittiDataModule:
    """The data config's test split, with its ground truth, resized to the network input."""
    datamodule: KittiDataModule = hydra.utils.instantiate(cfg.data, height=height, width=width)
    split_file = datamodule.split_dir / f"{datamodule.splits['test']}_files.txt"
    datamodule.prepare_data(splits=())
    if not split_file.is_file():
        raise DataError(f"test split {split_file} not found: set data.split_dir to the folder "
                        "holding test_files.txt and gt_depths.npz (for KITTI, Monodepth2's "
                        "splits/eigen)")
    datamodule.setup("test")
    if datamodule.datasets["test"].gt is None:
        raise DataError(f"no ground truth for {split_file}: expected "
                        f"{datamodule.split_dir / GT_FILE_NAMES['test']} (write it with `python -m "
                        "fsre_lightning.export_gt`) or set data.test_gt_file")
    return datamodule


def default_metrics_path(ckpt_path: Path, split_dir: Path, post_process: bool) -> Path:
    """Next to the checkpoint, named after it, the split folder and post-processing."""
    suffix = "-pp" if post_process else ""
    return ckpt_path.with_name(f"{ckpt_path.stem}.eval-{split_dir.name}{suffix}.json")


def print_report(results: dict[str, Any]) -> None:
    settings = results["settings"]
    mode = "median scaling" if settings["median_scaling"] else "no scaling"
    pp = ", flip post-processing" if settings["post_process"] else ""
    print(f"\ndepth, Eigen protocol (crop {settings['crop']}, {mode}{pp}) at "
          f"{settings['height']} x {settings['width']}: {results['num_frames']} frames scored")
    if results.get("num_frames_without_gt"):
        print(f"WARNING: {results['num_frames_without_gt']} frames have no valid ground-truth "
              "pixel (an empty map in gt_depths.npz: re-export it with "
              "python -m fsre_lightning.export_gt) and were not scored")
    if results.get("num_skipped_frames"):
        print(f"WARNING: {results['num_skipped_frames']} frames of the split were unreadable "
              f"and skipped (data.eval_on_error=skip): not comparable to a full-split score")
    print(format_table_row(results))
    print(f"scale ratio: median {results['ratio_median']:.3f}, "
          f"std {results['ratio_std']:.3f} (relative to the median)")
    if "miou" in results:
        print(f"segmentation: mIoU {results['miou']:.4f} over "
              f"{results['num_semantic_images']} images")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as the config says; returns what the JSON file holds."""
    validate_config(cfg, "evaluate")
    ckpt_path = Path(cfg.ckpt_path)
    # What would fail at the end fails now: where the metrics go, the semantics folder.
    check_writable("metrics_path", cfg.metrics_path or str(ckpt_path.parent / "metrics.json"))
    if cfg.get("semantics_dir"):
        semantic_pairs(Path(cfg.semantics_dir))
    device = resolve_device(cfg.device)
    height, width, source = training_resolution(ckpt_path, cfg.height, cfg.width,
                                                fallback=(cfg.data.height, cfg.data.width))
    log.info("network input %d x %d (from %s)", height, width, source)
    module = load_module(ckpt_path, device)
    datamodule = build_test_datamodule(cfg, height, width)

    results: dict[str, Any] = evaluate_depth(module, datamodule, cfg.post_process,
                                             cfg.median_scaling, device)
    results["num_skipped_frames"] = len(datamodule.skipped_samples)
    if cfg.get("semantics_dir"):
        if module.has_segmentation:
            results.update(evaluate_segmentation(module, Path(cfg.semantics_dir),
                                                 (height, width), datamodule.batch_size, device))
        else:
            print("the model has no segmentation decoder: mIoU not evaluated", file=sys.stderr)
    results["settings"] = {
        "checkpoint": str(ckpt_path), "split_dir": str(datamodule.split_dir),
        "height": height, "width": width, "crop": datamodule.eval_crop,
        "min_depth": datamodule.min_depth_eval, "max_depth": datamodule.max_depth_eval,
        "median_scaling": bool(cfg.median_scaling), "post_process": bool(cfg.post_process),
        "semantics_dir": cfg.get("semantics_dir"), "device": str(device),
    }
    metrics_path = (Path(cfg.metrics_path) if cfg.get("metrics_path")
                    else default_metrics_path(ckpt_path, datamodule.split_dir, cfg.post_process))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics_path, results)
    print_report(results)
    print(f"metrics written to {metrics_path}")
    return results


main = hydra_command("evaluate", run)


if __name__ == "__main__":
    sys.exit(main())
