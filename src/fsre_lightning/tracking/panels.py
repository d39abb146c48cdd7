"""Image panels of training and validation (input, disparity, segmentation, an error or mask
row), sent to whichever logger is on (`log_image`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fsre_lightning.visualize import (
    colorize_disparity,
    colorize_error,
    colorize_segmentation,
    make_panel,
    save_image,
    to_uint8,
)


def error_map(scaled_disp: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """|gt - pred| / gt at ground-truth pixels, median-scaled, at the network resolution, as
    colours."""
    gt = batch["depth_gt"]
    size = scaled_disp.shape[-2:]
    gt_small = F.interpolate(gt, size=size, mode="nearest")
    pred = 1.0 / scaled_disp
    valid = gt_small > 0
    error = torch.zeros_like(pred)
    for i in range(pred.shape[0]):
        if valid[i].any():
            ratio = gt_small[i][valid[i]].median() / pred[i][valid[i]].median()
            rel = (gt_small[i] - pred[i] * ratio).abs() / gt_small[i].clamp_min(1e-3)
            error[i] = rel * valid[i]
    return colorize_error(error, vmax=0.5)


def log_panel(module: Any, key: str, batch: Mapping[str, Any], outputs: Mapping[str, Any],
              extra: torch.Tensor | None, num_images: int) -> None:
    """One panel of the first `num_images` samples under `key`, from the global-zero rank."""
    trainer = module.trainer if module._trainer is not None else None
    if trainer is None or not trainer.is_global_zero:
        return
    n = num_images
    rows = [batch["frames"][:n, 0], colorize_disparity(outputs["disp"][0][:n])]
    if "seg_logits" in outputs:
        rows.append(colorize_segmentation(outputs["seg_logits"][:n].argmax(1)))
    if extra is not None:
        rows.append(extra[:n].float().expand(-1, 3, -1, -1) if extra.shape[1] == 1
                    else extra[:n])
    log_dir = Path(trainer.default_root_dir) / "images"
    log_image(module.logger, key, make_panel(rows), module.global_step, log_dir)


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
