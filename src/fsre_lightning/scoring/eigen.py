"""The Eigen evaluation protocol as one function, and Monodepth2's flip post-processing.

`evaluate_eigen` feeds every image through `metrics.DepthMetrics`, the metric validation logs,
so the offline test numbers and the validation numbers share one implementation of the Eigen
protocol (docs/design.md section 3.13: resize, Garg crop, depth caps, median scaling, the seven
errors, ratio statistics).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fsre_lightning.data.decode import load_image, load_label
from fsre_lightning.data.kitti_layout import IMAGE_EXTENSIONS
from fsre_lightning.errors import DataError
from fsre_lightning.geometry import disp_to_depth
from fsre_lightning.scoring.conventions import format_table_row
from fsre_lightning.scoring.metrics import DEPTH_METRIC_KEYS, DepthMetrics, SegmentationIoU

__all__ = ["EIGEN_KEYS", "evaluate_depth", "evaluate_eigen", "evaluate_segmentation",
           "format_table_row", "post_process_disparity", "predict_disparity", "ramp_weights",
           "semantic_pairs", "summarize"]

if TYPE_CHECKING:  # the module and the data module only pass through here
    from fsre_lightning.data.kitti import KittiDataModule
    from fsre_lightning.module import FSREModule

# What `evaluate_eigen` returns besides num_frames: the paper's seven columns, then the median
# and relative spread of the per-image median-scaling ratios.
EIGEN_KEYS: tuple[str, ...] = (*DEPTH_METRIC_KEYS, "ratio_median", "ratio_std")

# Flip post-processing: the blend hands over from one prediction to the other between 5 % and
# 10 % of the width from each border.
_RAMP_START, _RAMP_SLOPE = 0.05, 20.0
_END = object()


def _as_map(value: Any, what: str, index: int) -> torch.Tensor:
    """An H x W float64 tensor from an array or tensor (leading singleton dims dropped)."""
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2:
        raise ValueError(f"{what}[{index}] has shape {tuple(tensor.shape)}; expected H x W")
    return tensor.detach().to("cpu", torch.float64)


def summarize(metric: DepthMetrics) -> dict[str, float]:
    """`DepthMetrics`' state as plain floats: EIGEN_KEYS plus num_frames (images scored) and
    num_frames_without_gt (images not scored: no valid ground-truth pixel)."""
    computed = metric.compute()
    if not computed:
        raise ValueError(
            "no image had a valid ground-truth pixel (depth in (min_depth, max_depth) inside "
            "the crop): check that the ground truth belongs to these images"
        )
    out = {key: float(computed[key]) for key in EIGEN_KEYS}
    out["num_frames"] = int(computed["num_images"])
    out["num_frames_without_gt"] = int(computed["num_images_without_gt"])
    return out


def evaluate_eigen(
    pred_disps: Iterable[np.ndarray | torch.Tensor],
    gt_depths: Iterable[np.ndarray | torch.Tensor],
    median_scaling: bool = True,
    crop: str = "garg",
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    cap_gt: bool = True,
    scale_factor: float = 1.0,
) -> dict[str, float]:
    """Eigen-protocol depth metrics of a set of predictions, averaged over images (design 3.13).

    `pred_disps`: one h x w disparity per image whose inverse is the predicted depth, i.e. the
    network's sigmoid output already mapped with `geometry.disp_to_depth` (what Monodepth2's
    evaluation feeds in). Any size: it is resized bilinearly to its ground truth's size.
    `gt_depths`: the H x W metric ground truth of each image at native resolution, 0 = none
    (e.g. `load_gt_depths`). Both are consumed in step, so generators work.

    Per image: valid pixels are min_depth < gt < max_depth (every gt > 0 with
    `cap_gt=False`, the improved-ground-truth protocol), inside the Garg crop when
    crop="garg"; the prediction is multiplied by `scale_factor`, with median scaling then by
    median(gt) / median(pred) over those pixels, and clamped to [min_depth, max_depth]. Images
    without a valid pixel are skipped (not in num_frames; counted in num_frames_without_gt).

    Returns abs_rel, sq_rel, rmse, rmse_log, a1, a2, a3 (means over images), ratio_median and
    ratio_std (median of the per-image ratios and their standard deviation divided by that
    median; reported without median scaling too, where the ratios are not applied) and
    num_frames.
    """
    metric = DepthMetrics(min_depth, max_depth, crop, median_scaling, cap_gt, scale_factor)
    preds, gts = iter(pred_disps), iter(gt_depths)
    for index in itertools.count():
        pred, gt = next(preds, _END), next(gts, _END)
        if pred is _END and gt is _END:
            break
        if pred is _END or gt is _END:
            longer = "gt_depths" if pred is _END else "pred_disps"
            raise ValueError(f"{longer} has more entries than the other (first {index} paired): "
                             "give one prediction per ground-truth map, in split order")
        metric.update(_as_map(pred, "pred_disps", index)[None, None],
                      _as_map(gt, "gt_depths", index)[None, None])
    return summarize(metric)


def ramp_weights(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column weights (left_border, right_border), each 1 at its own image border.

    `left_border` is 1 on the first 5 % of the columns, falls linearly to 0 at 10 % and stays 0
    beyond; `right_border` is its mirror image. Column j sits at x = j / (width - 1).
    """
    x = torch.linspace(0.0, 1.0, width, dtype=torch.float64)
    left_border = 1.0 - torch.clamp(_RAMP_SLOPE * (x - _RAMP_START), 0.0, 1.0)
    return left_border, left_border.flip(0)


def post_process_disparity(disp: torch.Tensor, disp_of_flipped: torch.Tensor) -> torch.Tensor:
    """Monodepth2's flip post-processing of ... x W disparities.

    `disp` is the prediction for the image, `disp_of_flipped` the prediction for the mirrored
    image (still mirrored). The two are averaged over the middle 80 % of the width; towards
    the borders the weight moves to a single prediction: the mirrored one at the left border,
    the direct one at the right border. The left-border band is where Monodepth's predictions
    show their artefacts (image content that the other training views do not see), and
    mirroring moves that band to the other side of the mirrored prediction.
    """
    if disp.shape != disp_of_flipped.shape:
        raise ValueError(f"disp {tuple(disp.shape)} and disp_of_flipped "
                         f"{tuple(disp_of_flipped.shape)} must have the same shape")
    unflipped = disp_of_flipped.flip(-1)
    left_border, right_border = (w.to(disp) for w in ramp_weights(disp.shape[-1]))
    middle = 1.0 - left_border - right_border
    return (right_border * disp + left_border * unflipped
            + middle * 0.5 * (disp + unflipped))


# ------------------------------------------------------------------ a trained module
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


def evaluate_depth(module: FSREModule, datamodule: KittiDataModule, post_process: bool,
                   median_scaling: bool, device: torch.device, protocol: str = "eigen",
                   scale_factor: float = 1.0) -> dict[str, float]:
    """Metrics of the test split (see `evaluate_eigen`) under `protocol`: "eigen" (the data
    config's crop, ground truth capped to its depth range) or "improved" (every gt > 0, no
    crop, no cap: Monodepth2's improved-ground-truth protocol)."""
    # evaluate_eigen takes predictions and ground truth as two streams, consumed in step:
    # tee keeps at most one pair buffered, so no split-sized array is ever held.
    preds, gts = itertools.tee(_predictions(module, datamodule, post_process, device))
    eigen = protocol == "eigen"
    return evaluate_eigen((p for p, _ in preds), (g for _, g in gts),
                          median_scaling=median_scaling,
                          crop=datamodule.eval_crop if eigen else "none",
                          min_depth=datamodule.min_depth_eval,
                          max_depth=datamodule.max_depth_eval, cap_gt=eigen,
                          scale_factor=scale_factor)


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
