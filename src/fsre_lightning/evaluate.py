"""Evaluate a checkpoint: `python -m fsre_lightning.evaluate ckpt_path=... [overrides]`.

    # KITTI Eigen test (after `python -m fsre_lightning.export_gt data.root=/data/kitti_raw`)
    python -m fsre_lightning.evaluate ckpt_path=run/checkpoints/last.ckpt data=kitti \\
        data.root=/data/kitti_raw data.split_dir=/data/splits/eigen [post_process=true] \\
        [semantics_dir=/data/data_semantics]
    # the built-in synthetic scenes (the default data config)
    python -m fsre_lightning.evaluate ckpt_path=outputs/demo/<run>/checkpoints/last.ckpt

Data: by default the data config the checkpoint was trained with (its `data.*` overrides on the
command line apply on top); `data=<group>` picks another. Depth: its test split (test_files.txt
and gt_depths.npz of data.split_dir) at the training resolution, scored by
`scoring.eigen.evaluate_eigen` under `protocol` (eigen: the data config's crop and depth caps;
improved: Monodepth2's protocol of the annotated ground truth; auto picks by the ground truth's
source). Segmentation (when `semantics_dir` is given and the model has a segmentation decoder):
19-class mIoU on the KITTI 2015 semantic training images. The metrics are printed (the paper's
table row) and written as JSON, with the protocol and the ground truth's source and file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import check_writable
from fsre_lightning.data.kitti_layout import ANNOTATED_SPLIT, GT_FILE_NAMES
from fsre_lightning.errors import DataError
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import resolve_device, write_json
from fsre_lightning.scoring.conventions import format_table_row

if TYPE_CHECKING:
    from fsre_lightning.data.kitti import KittiDataModule

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


def data_of_the_checkpoint(cfg: DictConfig, ckpt_path: Path) -> str:
    """Make `cfg.data` the checkpoint's training data config, with the command line's `data.*`
    overrides on top, unless the command line picks a data group (`data=kitti`); returns
    where the data config came from."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fsre_lightning.trained import training_data_config

    task = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    overrides = OverridesParser.create().parse_overrides(task)
    if any(o.key_or_group == "data" for o in overrides):
        return "the command line's data group"
    recorded = training_data_config(ckpt_path)
    if recorded is None:
        return "the default data config (the checkpoint records none)"
    data = OmegaConf.create(recorded)
    for o in overrides:
        key = o.key_or_group
        if key.startswith("data.") and not o.is_delete():
            OmegaConf.update(data, key[len("data."):], o.value(), force_add=True)
    with open_dict(cfg):
        cfg.data = data
    return "the checkpoint's training data"


# What a test split's ground truth can be: projected velodyne scans, KITTI's annotated maps (the
# improved ground truth), or the synthetic scenes' exact rendered depth.
GT_KINDS = ("velodyne", "annotated", "rendered")


def ground_truth_source(split_dir: Path, gt_file: Path) -> tuple[str, str]:
    """(one of GT_KINDS, how that is known) of a test split's ground truth: the record written
    beside the file (`export_gt`, the synthetic generator), else the split folder's name
    (annotated for eigen_benchmark, as export_gt's source=auto chooses)."""
    record = gt_file.with_suffix(".json")
    if record.is_file():
        try:
            source = json.loads(record.read_text()).get("source")
        except (OSError, ValueError):
            source = None
        if source in GT_KINDS:
            return source, f"recorded in {record}"
    if (split_dir.parent.parent / "synthetic.json").is_file():  # root/splits/<name>
        return "rendered", "the split of a synthetic world"
    source = "annotated" if split_dir.name == ANNOTATED_SPLIT else "velodyne"
    return source, f"by the split folder's name ({split_dir.name})"


def protocol_of(requested: str, gt_source: str) -> str:
    """`protocol=auto`: improved for annotated ground truth, eigen otherwise."""
    if requested != "auto":
        return requested
    return "improved" if gt_source == "annotated" else "eigen"


def metrics_file(path: Path, skipped: int) -> Path:
    """Where a score goes: `path`, except that a partial score (skipped frames) never replaces
    a full one of the same split: it goes to `<path stem>.partial.json` then."""
    if skipped and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = {}
        if isinstance(previous, dict) and previous.get("num_skipped_frames") == 0:
            return path.with_name(f"{path.stem}.partial.json")
    return path


def default_metrics_path(ckpt_path: Path, split_dir: Path, post_process: bool) -> Path:
    """Next to the checkpoint, named after it, the split folder and post-processing."""
    suffix = "-pp" if post_process else ""
    return ckpt_path.with_name(f"{ckpt_path.stem}.eval-{split_dir.name}{suffix}.json")


def print_report(results: dict[str, Any]) -> None:
    settings = results["settings"]
    mode = "median scaling" if settings["median_scaling"] else "no scaling"
    if settings["scale_factor"] != 1.0:
        mode = f"predictions x {settings['scale_factor']:g}, {mode}"
    pp = ", flip post-processing" if settings["post_process"] else ""
    what = ("Eigen protocol (crop {crop}, ground truth in ({min_depth:g}, {max_depth:g}) m)"
            if settings["protocol"] == "eigen" else
            "improved-ground-truth protocol (every pixel with ground truth, no crop, no cap on "
            "the ground truth)").format(**settings)
    print(f"\ndepth, {what}, {mode}{pp}, predictions clamped to [{settings['min_depth']:g}, "
          f"{settings['max_depth']:g}] m, at {settings['height']} x {settings['width']}: "
          f"{results['num_frames']} frames scored")
    gt = settings["ground_truth"]
    print(f"ground truth: {gt['source']} ({gt['known']}), {gt['file']}")
    print(f"data: {settings['data_from']}")
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
    validate_config(cfg, "evaluate")  # the command line's own values, named as given
    # The work's imports after the checks: a usage error answers without torch.
    from fsre_lightning.scoring.eigen import (
        evaluate_depth,
        evaluate_segmentation,
        semantic_pairs,
    )
    from fsre_lightning.trained import load_module, training_resolution

    ckpt_path = Path(cfg.ckpt_path)
    data_from = data_of_the_checkpoint(cfg, ckpt_path) if ckpt_path.is_file() else ""
    validate_config(cfg, "evaluate")
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

    gt_file = datamodule._gt_file("test")
    assert gt_file is not None  # build_test_datamodule checked
    gt_source, known = ground_truth_source(datamodule.split_dir, gt_file)
    protocol = protocol_of(cfg.protocol, gt_source)
    results: dict[str, Any] = evaluate_depth(module, datamodule, cfg.post_process,
                                             cfg.median_scaling, device, protocol,
                                             float(cfg.pred_depth_scale_factor))
    results["num_skipped_frames"] = len(datamodule.skipped_samples)
    if cfg.get("semantics_dir"):
        if module.has_segmentation:
            results.update(evaluate_segmentation(module, Path(cfg.semantics_dir),
                                                 (height, width), datamodule.batch_size, device))
        else:
            print("the model has no segmentation decoder: mIoU not evaluated", file=sys.stderr)
    results["settings"] = {
        "checkpoint": str(ckpt_path), "split_dir": str(datamodule.split_dir),
        "protocol": protocol,
        "ground_truth": {"source": gt_source, "known": known, "file": str(gt_file)},
        "height": height, "width": width,
        "crop": datamodule.eval_crop if protocol == "eigen" else "none",
        "min_depth": datamodule.min_depth_eval, "max_depth": datamodule.max_depth_eval,
        "median_scaling": bool(cfg.median_scaling), "post_process": bool(cfg.post_process),
        "scale_factor": float(cfg.pred_depth_scale_factor),
        "semantics_dir": cfg.get("semantics_dir"), "device": str(device),
        "data_from": data_from,
    }
    requested = (Path(cfg.metrics_path) if cfg.get("metrics_path")
                 else default_metrics_path(ckpt_path, datamodule.split_dir, cfg.post_process))
    metrics_path = metrics_file(requested, results["num_skipped_frames"])
    write_json(metrics_path, results)
    print_report(results)
    if metrics_path != requested:
        print(f"a partial score: {requested} holds a full one of this split and is kept")
    print(f"metrics written to {metrics_path}")
    return results


main = hydra_command("evaluate", run)


if __name__ == "__main__":
    sys.exit(main())
