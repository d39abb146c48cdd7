"""Depth and segmentation metrics (docs/design.md sections 3.13 and 3.14).

`depth_errors` is the per-image formula; `compute_depth_metrics` applies the Eigen protocol
(crop, cap, median scaling) to one image; `DepthMetrics` and `SegmentationIoU` are torchmetrics
wrappers so that validation numbers are reduced correctly across DDP processes. The offline
evaluation (`fsre_lightning.scoring.eigen.evaluate_eigen`) runs through `DepthMetrics` too, so
validation and test numbers come from one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from fsre_lightning.cityscapes import NUM_CLASSES, VOID
from fsre_lightning.scoring.conventions import (
    DEPTH_METRIC_KEYS,
    DISPLAY_NAMES,
    EVAL_CROPS,
    GARG_CROP,
    PROTOCOLS,
    REPORTED_METRICS,
)

__all__ = ["DEPTH_METRIC_KEYS", "DISPLAY_NAMES", "EVAL_CROPS", "GARG_CROP", "PROTOCOLS",
           "REPORTED_METRICS", "DepthMetrics", "SegmentationIoU", "compute_depth_metrics",
           "depth_errors", "eval_mask", "garg_crop_box", "median", "metric_summary"]


def garg_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the Garg crop, half-open, integer-truncated (design 3.13)."""
    top, bottom, left, right = GARG_CROP
    return int(top * height), int(bottom * height), int(left * width), int(right * width)


def median(values: torch.Tensor) -> torch.Tensor:
    """Median of all elements, the mean of the two middle ones for an even count.

    This is numpy's convention, which Monodepth2's median scaling uses; `torch.median` returns
    the lower middle element instead, which shifts the scaling ratio on small or coarse maps.
    """
    if values.numel() == 0:
        raise ValueError("median of an empty tensor")
    ordered = values.flatten().sort().values
    n = ordered.numel()
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def depth_errors(
    gt: torch.Tensor | np.ndarray, pred: torch.Tensor | np.ndarray
) -> dict[str, float | torch.Tensor]:
    """The seven standard errors between already-masked 1-D ground truth and prediction."""
    as_numpy = isinstance(gt, np.ndarray)
    gt_t = torch.as_tensor(gt, dtype=torch.float64)
    pred_t = torch.as_tensor(pred, dtype=torch.float64)
    if gt_t.shape != pred_t.shape or gt_t.dim() != 1:
        raise ValueError(
            f"gt and pred must be 1-D and of equal length, got {tuple(gt_t.shape)} and "
            f"{tuple(pred_t.shape)}"
        )
    if gt_t.numel() == 0:
        raise ValueError("gt is empty: no valid pixel to score")
    thresh = torch.maximum(gt_t / pred_t, pred_t / gt_t)
    out = {
        "abs_rel": torch.mean(torch.abs(gt_t - pred_t) / gt_t),
        "sq_rel": torch.mean((gt_t - pred_t) ** 2 / gt_t),
        "rmse": torch.sqrt(torch.mean((gt_t - pred_t) ** 2)),
        "rmse_log": torch.sqrt(torch.mean((torch.log(gt_t) - torch.log(pred_t)) ** 2)),
        "a1": (thresh < 1.25).double().mean(),
        "a2": (thresh < 1.25**2).double().mean(),
        "a3": (thresh < 1.25**3).double().mean(),
    }
    if as_numpy:
        return {k: float(v) for k, v in out.items()}
    return out


def eval_mask(
    gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 80.0, crop: str = "garg",
    cap_gt: bool = True,
) -> torch.Tensor:
    """Valid-pixel mask of an H x W ground-truth map: min_depth < gt < max_depth (`cap_gt`,
    the Eigen protocol) or every pixel with ground truth, gt > 0 (the improved-ground-truth
    protocol), and the optional Garg crop."""
    mask = (gt > min_depth) & (gt < max_depth) if cap_gt else gt > 0
    if crop == "garg":
        top, bottom, left, right = garg_crop_box(*gt.shape[-2:])
        crop_mask = torch.zeros_like(mask)
        crop_mask[..., top:bottom, left:right] = True
        mask &= crop_mask
    elif crop not in EVAL_CROPS:
        raise ValueError(f"crop must be one of {EVAL_CROPS}, got {crop!r}")
    return mask


def compute_depth_metrics(
    gt: torch.Tensor,
    pred_disp: torch.Tensor,
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    crop: str = "garg",
    median_scaling: bool = True,
    cap_gt: bool = True,
    scale_factor: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Eigen protocol for one image: returns (errors, median ratio), or None without valid GT.

    `gt` is H x W metric depth (0 = none); `pred_disp` is h x w disparity (depth = 1 / disp) at
    any size: it is resized bilinearly to the GT size and inverted, as Monodepth2's evaluation
    does, then multiplied by `scale_factor` (Monodepth2's --pred_depth_scale_factor, for
    metric models). The ratio median(gt) / median(pred) over the valid pixels is returned in
    both modes (it tells how far off the predicted scale is) but applied only when
    `median_scaling`. `cap_gt`: see `eval_mask`; the prediction is clamped to [min_depth,
    max_depth] either way.
    """
    pred_disp = F.interpolate(
        pred_disp.reshape(1, 1, *pred_disp.shape[-2:]).double(),
        size=gt.shape[-2:],
        mode="bilinear",
        align_corners=False,
    )[0, 0]
    pred = scale_factor / pred_disp
    mask = eval_mask(gt, min_depth, max_depth, crop, cap_gt)
    if not bool(mask.any()):
        return None
    gt_v = gt[mask].double()
    pred_v = pred[mask]
    ratio = median(gt_v) / median(pred_v)
    if median_scaling:
        pred_v = pred_v * ratio
    pred_v = pred_v.clamp(min_depth, max_depth)
    return depth_errors(gt_v, pred_v), ratio


class DepthMetrics(Metric):
    """Per-image Eigen errors averaged over images, summed across processes under DDP."""

    full_state_update = False

    def __init__(
        self,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        crop: str = "garg",
        median_scaling: bool = True,
        cap_gt: bool = True,
        scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        self.median_scaling, self.cap_gt, self.scale_factor = median_scaling, cap_gt, scale_factor
        self.add_state("sums", default=torch.zeros(len(DEPTH_METRIC_KEYS), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("ratios", default=[], dist_reduce_fx="cat")
        # Images with no valid ground-truth pixel (e.g. an empty map): not scored, but counted,
        # so a report can say that a frame did not count.
        self.add_state("without_gt", default=torch.zeros((), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(
        self,
        pred_disp: torch.Tensor,
        gt: torch.Tensor,
        gt_size: Sequence[Sequence[int]] | torch.Tensor | None = None,
    ) -> None:
        """pred_disp B x 1 x h x w; gt B x 1 x Hg x Wg (zero-padded); gt_size B x 2 true sizes."""
        for i in range(gt.shape[0]):
            g = gt[i, 0]
            if gt_size is not None:
                gh, gw = (int(x) for x in gt_size[i])
                g = g[:gh, :gw]
            result = compute_depth_metrics(
                g, pred_disp[i, 0], self.min_depth, self.max_depth, self.crop,
                self.median_scaling, self.cap_gt, self.scale_factor,
            )
            if result is None:
                self.without_gt += 1
                continue
            errors, ratio = result
            self.sums += torch.stack([errors[k] for k in DEPTH_METRIC_KEYS]).to(self.sums)
            self.count += 1
            self.ratios.append(ratio.reshape(1).to(self.sums))

    def compute(self) -> dict[str, torch.Tensor]:
        if float(self.count) == 0:
            return {}
        out = {k: self.sums[i] / self.count for i, k in enumerate(DEPTH_METRIC_KEYS)}
        ratios = self.ratios
        if isinstance(ratios, list):
            ratios = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
        if ratios.numel():
            # Monodepth2 reports np.median(ratios) and np.std(ratios / median): the spread of
            # the per-image scale, relative to its median.
            ratio_median = median(ratios)
            out["ratio_median"] = ratio_median
            out["ratio_std"] = ratios.std(unbiased=False) / ratio_median
        out["num_images"] = self.count.clone()
        out["num_images_without_gt"] = self.without_gt.clone()
        return out


class SegmentationIoU(MulticlassJaccardIndex):
    """mIoU over the Cityscapes train ids with void pixels ignored.

    Classes absent from both prediction and labels are left out of the mean (Cityscapes
    protocol); torchmetrics' macro average would count them as 0 or NaN instead.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = VOID) -> None:
        super().__init__(
            num_classes=num_classes,
            ignore_index=ignore_index,
            average="none",
            zero_division=float("nan"),
        )

    def compute(self) -> torch.Tensor:
        return torch.nanmean(super().compute())


def metric_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The seven depth metrics (plus mIoU when present) as floats, keyed as the paper's table,
    from Lightning's logged `val/<key>` values or plain keys."""
    out = {}
    for key in REPORTED_METRICS:
        value = metrics.get(f"val/{key}", metrics.get(key))
        if value is not None:
            out[key] = float(value)
    return out
