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

import inspect
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fsre_lightning.checkpointing import load_checkpoint_weights_only
from fsre_lightning.config import ConfigError, validate_config
from fsre_lightning.data.kitti import (
    IMAGE_EXTENSIONS,
    DataError,
    KittiDataModule,
    load_image,
    load_label,
)
from fsre_lightning.evaluation import evaluate_eigen, format_table_row, post_process_disparity
from fsre_lightning.geometry import disp_to_depth
from fsre_lightning.metrics import SegmentationIoU
from fsre_lightning.module import FSREModule
from fsre_lightning.train import CONFIG_DIR, run_or_exit

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_input_size(ckpt_path: Path) -> tuple[int | None, int | None]:
    """(height, width) stored as `input_size` in a checkpoint, or (None, None).

    An unreadable file also gives (None, None): `load_module` reports it with its own message.
    """
    try:
        size = load_checkpoint_weights_only(ckpt_path).get("input_size")
    except (OSError, ValueError):  # missing or unreadable (CheckpointMismatchError)
        return None, None
    if isinstance(size, list | tuple) and len(size) == 2:
        return size[0], size[1]
    return None, None


def training_resolution(cfg: DictConfig, ckpt_path: Path) -> tuple[int, int, str]:
    """(height, width, where they came from) of the network input.

    In order: `height`/`width` of this config; data.height/width of the training run's
    config.yaml (the run folder holds checkpoints/ and config.yaml); the checkpoint's
    `input_size` (written by `import_reference`); this config's data.height/width. A network
    evaluated at another size than it was trained at scores worse.
    """
    height, width, source = cfg.get("height"), cfg.get("width"), "height/width"
    if (height is None) != (width is None):
        raise ConfigError(f"height={height!r}, width={width!r}: set both or neither")
    if height is None:
        run_config = ckpt_path.resolve().parent.parent / "config.yaml"
        saved = OmegaConf.load(run_config) if run_config.is_file() else None
        height = OmegaConf.select(saved, "data.height") if saved is not None else None
        width = OmegaConf.select(saved, "data.width") if saved is not None else None
        source = f"the training run's {run_config}"
        if height is None or width is None:
            height, width = checkpoint_input_size(ckpt_path)
            source = f"{ckpt_path}'s input_size (an imported release's training size)"
        if height is None or width is None:
            # predict/export have no data group: None then fails below, naming the keys
            height, width = (OmegaConf.select(cfg, "data.height"),
                             OmegaConf.select(cfg, "data.width"))
            source = "data.height/data.width"
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % 32:
            raise ConfigError(f"{key}={value!r} (from {source}) is not allowed: the network "
                              "input size must be a positive multiple of 32")
    return height, width, source


def load_module(ckpt_path: Path, device: torch.device) -> FSREModule:
    """An FSREModule from a Lightning checkpoint, in eval mode on `device`.

    Loading is weights_only (tensors and plain containers, no pickled code), which every
    checkpoint written by `fsre_lightning.train` satisfies.
    """
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint (training "
                                "writes them to <run folder>/checkpoints/)")
    # Only the hyper-parameters are looked at here (the reader maps the weights, not reads them).
    hparams = load_checkpoint_weights_only(ckpt_path).get("hyper_parameters")
    if not isinstance(hparams, dict) or not {"network", "pose_network"} <= set(hparams):
        raise DataError(f"{ckpt_path} is not an FSREModule checkpoint: its hyper_parameters "
                        "lack network/pose_network")
    # The checkpoint's weights replace any ImageNet initialisation: do not look for one.
    kwargs = {key: {**hparams[key], "pretrained": False, "weights_path": None}
              for key in ("network", "pose_network")}
    # Older Lightning has no weights_only argument (it would reach FSREModule's constructor);
    # the weights-only read above has vetted the file either way.
    if "weights_only" in inspect.signature(FSREModule.load_from_checkpoint).parameters:
        kwargs["weights_only"] = True
    module = FSREModule.load_from_checkpoint(ckpt_path, map_location=device, **kwargs)
    return module.to(device).eval()


@torch.inference_mode()
def predict_disparity(module: FSREModule, images: torch.Tensor, post_process: bool
                      ) -> torch.Tensor:
    """B x 1 x H x W disparity (1 / depth, disp_to_depth's range) of B x 3 x H x W images."""
    batch = torch.cat([images, images.flip(-1)]) if post_process else images
    sigmoid = module(batch)["disp"][0]
    disp, _ = disp_to_depth(sigmoid, module.loss_cfg.min_depth, module.loss_cfg.max_depth)
    if post_process:
        n = images.shape[0]
        disp = post_process_disparity(disp[:n], disp[n:])
    return disp


def _predictions(module: FSREModule, datamodule: KittiDataModule, post_process: bool,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(disparity, native ground truth) per test image, in split order."""
    for batch in datamodule.test_dataloader():
        if batch.get("skipped"):  # only with data.eval_on_error=skip; counted in the report
            datamodule.note_skipped(batch["skipped"])
        if "frames" not in batch:
            continue
        disp = predict_disparity(module, batch["frames"][:, 0].to(device), post_process).cpu()
        for i, (gh, gw) in enumerate(batch["gt_size"].tolist()):
            yield disp[i, 0], batch["depth_gt"][i, 0, :gh, :gw]


def build_test_datamodule(cfg: DictConfig, height: int, width: int) -> KittiDataModule:
    """The data config's test split, with its ground truth, resized to the network input."""
    datamodule: KittiDataModule = hydra.utils.instantiate(cfg.data, height=height, width=width)
    split_file = datamodule.split_dir / f"{datamodule.splits['test']}_files.txt"
    datamodule.prepare_data()
    if not split_file.is_file():
        raise DataError(f"test split {split_file} not found: set data.split_dir to the folder "
                        "holding test_files.txt and gt_depths.npz (for KITTI, Monodepth2's "
                        "splits/eigen)")
    datamodule.setup("test")
    if datamodule.datasets["test"].gt is None:
        raise DataError(f"no ground truth for {split_file}: expected "
                        f"{datamodule.split_dir / 'gt_depths.npz'} (write it with `python -m "
                        "fsre_lightning.export_gt`) or set data.test_gt_file")
    return datamodule


def evaluate_depth(module: FSREModule, datamodule: KittiDataModule, post_process: bool,
                   median_scaling: bool, device: torch.device) -> dict[str, float]:
    """Eigen-protocol metrics of the test split (see `evaluation.evaluate_eigen`)."""
    # evaluate_eigen takes predictions and ground truth as two streams, consumed in step:
    # tee keeps at most one pair buffered, so no split-sized array is ever held.
    preds, gts = itertools.tee(_predictions(module, datamodule, post_process, device))
    return evaluate_eigen((p for p, _ in preds), (g for _, g in gts),
                          median_scaling=median_scaling, crop=datamodule.eval_crop,
                          min_depth=datamodule.min_depth_eval,
                          max_depth=datamodule.max_depth_eval)


def semantic_pairs(semantics_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) files of KITTI 2015 `data_semantics`: training/image_2, training/semantic."""
    image_dir = semantics_dir / "training" / "image_2"
    label_dir = semantics_dir / "training" / "semantic"
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(f"semantics_dir={str(semantics_dir)!r} has no "
                            f"{folder.relative_to(semantics_dir)}/: point it at the unpacked "
                            "KITTI 2015 data_semantics folder")
    images = sorted(p for p in image_dir.iterdir() if p.suffix[1:].lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{image_dir} holds no images")
    pairs = [(image, label_dir / f"{image.stem}.png") for image in images]
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        raise DataError(f"{len(missing)} semantic labels missing, e.g. {missing[0]}: every "
                        f"image of {image_dir} needs its label id PNG in {label_dir}")
    return pairs


@torch.inference_mode()
def evaluate_segmentation(module: FSREModule, semantics_dir: Path, size: tuple[int, int],
                          batch_size: int, device: torch.device) -> dict[str, float]:
    """19-class mIoU at the network resolution; labels (Cityscapes ids) resized nearest."""
    pairs = semantic_pairs(semantics_dir)
    metric = SegmentationIoU(num_classes=module.net.num_classes)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        images = torch.stack([load_image(image, size) for image, _ in chunk]).to(device)
        labels = torch.stack([load_label(label, size, "label_ids") for _, label in chunk])
        metric.update(module(images)["seg_logits"].argmax(1).cpu(), labels)
    return {"miou": float(metric.compute()), "num_semantic_images": len(pairs)}


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
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError("ckpt_path is required: ckpt_path=<run folder>/checkpoints/last.ckpt")
    ckpt_path = Path(cfg.ckpt_path)
    device = resolve_device(cfg.device)
    height, width, source = training_resolution(cfg, ckpt_path)
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
    metrics_path.write_text(json.dumps(results, indent=2))
    print_report(results)
    print(f"metrics written to {metrics_path}")
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_or_exit("evaluate", run, cfg)


if __name__ == "__main__":
    main()
