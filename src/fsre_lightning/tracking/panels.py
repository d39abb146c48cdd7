"""Image panels of training and validation, sent to whichever logger is on (`log_image`).

A panel shows the first `model.num_panel_images` samples of a batch side by side, one labelled
row each: the input (frame 0), the predicted disparity, and where the batch has them the
ground-truth depth, the error of the median-scaled prediction on a fixed scale (with its colour
bar, so that panels of different steps compare), the predicted segmentation beside its
pseudo-label, and (training) Monodepth2's auto-mask. Disparities are coloured per image (95th
percentile, as Monodepth2's figures): monocular depth has no scale of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fsre_lightning.scoring.metrics import median
from fsre_lightning.visualize import (
    colorize_disparity,
    colorize_error,
    colorize_segmentation,
    labelled_panel,
    save_image,
    to_uint8,
)

# The error row's colour scale: relative error 0 (blue) to ERROR_VMAX and above (red).
ERROR_VMAX = 0.5


def relative_error(scaled_disp: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """|gt - pred| / gt of the median-scaled prediction (the Eigen protocol's median) at
    ground-truth pixels (0 elsewhere), B x 1 x h x w at the prediction's size; `gt`
    B x 1 x Hg x Wg, 0 = no ground truth."""
    gt_small = F.interpolate(gt, size=scaled_disp.shape[-2:], mode="nearest")
    pred = 1.0 / scaled_disp
    valid = gt_small > 0
    error = torch.zeros_like(pred)
    for i in range(pred.shape[0]):
        if valid[i].any():
            ratio = median(gt_small[i][valid[i]]) / median(pred[i][valid[i]])
            rel = (gt_small[i] - pred[i] * ratio).abs() / gt_small[i].clamp_min(1e-3)
            error[i] = rel * valid[i]
    return error


def ground_truth_disparity(gt: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 / gt at `size`, B x 1 x h x w, 0 where there is none: max-pooled (the nearest point
    of each cell), so that sparse velodyne points stay visible at the network's size."""
    disp = torch.where(gt > 0, 1.0 / gt.clamp_min(1e-3), torch.zeros_like(gt))
    return F.adaptive_max_pool2d(disp, size)


def panel_rows(batch: Mapping[str, Any], outputs: Mapping[str, Any], n: int,
               automask: torch.Tensor | None = None,
               scaled_disp: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """(label, B x 3 x h x w colours) of every row a panel of this batch shows."""
    disp = outputs["disp"][0][:n]
    rows = [("input (frame 0)", batch["frames"][:n, 0]),
            ("predicted disparity", colorize_disparity(disp))]
    if "depth_gt" in batch:
        gt = batch["depth_gt"][:n].float()
        gt_disp = ground_truth_disparity(gt, tuple(disp.shape[-2:]))
        rows.append(("ground truth (1 / depth)", colorize_disparity(gt_disp) * (gt_disp > 0)))
        if scaled_disp is not None:
            error = relative_error(scaled_disp[:n].float(), gt)
            rows.append((f"|gt - pred| / gt, 0 to {ERROR_VMAX}",
                         colorize_error(error, vmax=ERROR_VMAX)))
    if "seg_logits" in outputs:
        rows.append(("predicted segmentation",
                     colorize_segmentation(outputs["seg_logits"][:n].argmax(1))))
    if "labels" in batch:
        rows.append(("pseudo-label", colorize_segmentation(batch["labels"][:n])))
    if automask is not None:
        rows.append(("auto-mask (white: in the loss)",
                     automask[:n].float().expand(-1, 3, -1, -1)))
    return rows


def render_panel(batch: Mapping[str, Any], outputs: Mapping[str, Any], n: int,
                 automask: torch.Tensor | None = None,
                 scaled_disp: torch.Tensor | None = None) -> torch.Tensor:
    """The panel as one 3 x H x W image, with the error row's colour bar when it has one."""
    rows = panel_rows(batch, outputs, n, automask, scaled_disp)
    colour_bar = ("turbo", 0.0, ERROR_VMAX) if any(r[0].startswith("|gt") for r in rows) \
        else None
    return labelled_panel(rows, colour_bar)


def log_panel(module: Any, key: str, batch: Mapping[str, Any], outputs: Mapping[str, Any],
              num_images: int, automask: torch.Tensor | None = None,
              scaled_disp: torch.Tensor | None = None) -> None:
    """One panel of the first `num_images` samples under `key`, from the global-zero rank."""
    trainer = module.trainer if module._trainer is not None else None
    if trainer is None or not trainer.is_global_zero:
        return
    with torch.no_grad():
        image = render_panel(batch, outputs, num_images, automask, scaled_disp)
    log_dir = Path(trainer.default_root_dir) / "images"
    log_image(module.logger, key, image, module.global_step, log_dir)


def log_image(logger: Any, key: str, image: torch.Tensor, step: int, fallback_dir: Path | None
              ) -> None:
    """Send one panel to whichever logger is on: wandb, TensorBoard, or PNG files for CSV/none."""
    experiment = getattr(logger, "experiment", None) if logger is not None else None
    if logger is not None and hasattr(logger, "log_image"):
        logger.log_image(key=key, images=[to_uint8(image)], step=step)
    elif experiment is not None and hasattr(experiment, "add_image"):
        experiment.add_image(key, image.clamp(0, 1), global_step=step)
    elif fallback_dir is not None:
        save_image(image, Path(fallback_dir) / f"{key.replace('/', '_')}_{step:07d}.png")
