"""Metric depth from a known camera height above a flat ground (`predict camera_height=`).

The network's depth is relative; a plane fitted to the ground pixels (predicted road,
sidewalk and terrain, or the bottom centre of the image) gives the camera height the depth
implies, and the ratio to the true height is the scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fsre_lightning.cityscapes import GROUND_CLASSES


def ground_mask(size: tuple[int, int], labels: torch.Tensor | None = None,
                min_fraction: float = 0.01) -> torch.Tensor:
    """H x W bool mask of pixels taken as flat ground.

    Predicted road/sidewalk/terrain when `labels` has enough of them; otherwise the bottom
    15 % of rows and middle half of columns, which a forward-facing vehicle camera sees as
    road in front of it.
    """
    height, width = size
    if labels is not None:
        mask = torch.isin(labels, torch.tensor(GROUND_CLASSES, device=labels.device))
        if mask.float().mean() >= min_fraction:
            return mask
    mask = torch.zeros(size, dtype=torch.bool)
    mask[int(height * 0.85):, width // 4: width - width // 4] = True
    return mask


def camera_height_scale(depth: torch.Tensor, intrinsics: Sequence[float], camera_height: float,
                        mask: torch.Tensor) -> float:
    """Factor turning `depth` (H x W, relative units) into metres, from the camera height.

    The ground pixels of `mask` are back-projected with the normalised intrinsics; a plane is
    fitted to them (least squares, refitted on the 80 % closest points so that cars and kerbs
    on the mask do not tilt it) and its distance to the camera is the predicted camera height.
    """
    height, width = depth.shape[-2:]
    depth = depth.reshape(height, width).double().cpu()
    mask = mask.reshape(height, width).cpu() & torch.isfinite(depth) & (depth > 0)
    if int(mask.sum()) < 3:
        raise ValueError("fewer than 3 ground pixels: cannot estimate the camera height")
    fx, fy, cx, cy = intrinsics
    # Integer pixel centres, as `geometry.backproject` uses with the same K.
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                          torch.arange(width, dtype=torch.float64), indexing="ij")
    x = (u / width - cx) / fx * depth
    y = (v / height - cy) / fy * depth
    points = torch.stack([x[mask], y[mask], depth[mask]], dim=1)

    def fit(pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centroid = pts.mean(0)
        normal = torch.linalg.svd(pts - centroid, full_matrices=False).Vh[-1]
        return normal, centroid

    normal, centroid = fit(points)
    if len(points) >= 10:
        residual = ((points - centroid) @ normal).abs()
        keep = residual <= torch.quantile(residual, 0.8)
        normal, centroid = fit(points[keep])
    # y points down: a ground plane's normal is close to the y axis. Otherwise (a wall, a
    # car filling the mask) the fit says nothing about height; the median y still does.
    if abs(float(normal[1])) >= 0.7:
        predicted = abs(float(centroid @ normal))
    else:
        predicted = float(points[:, 1].median())
    if not predicted > 0:
        raise ValueError("the ground pixels are not below the camera: cannot estimate its height")
    return camera_height / predicted
