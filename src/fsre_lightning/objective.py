"""The total loss (docs/design.md section 3.12) from the pure functions of `fsre_lightning.losses`.

Total = L_ph + beta * L_sm + gamma * L_CE + delta * sum_s L_SGT(s)

Scale weighting (the paper does not say; both are options, `reference` is the default
because it is what produced the paper's table):
- ``reference``: the FSRE-Depth code. Photometric and smoothness terms of scale s are divided
  by 2**s and summed over scales; each SGT layer's term is divided by 2**s too.
- ``monodepth2``: photometric terms are averaged over scales, smoothness of scale s is weighted
  by 1 / 2**s inside that average; SGT terms are summed unweighted (the paper's equation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fsre_lightning.geometry import disp_to_depth, warp_many
from fsre_lightning.loss_config import LossConfig
from fsre_lightning.losses import (
    min_reprojection_loss,
    photometric_losses,
    resize_labels,
    segmentation_loss,
    sgt_loss,
    smoothness_loss,
    ssim_target_stats,
)


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize, the identity when already at `size` (coarse disparities go to full size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def downsample_image(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Box-average the image to 1 / 2**scale (the colour image that guides smoothness)."""
    if scale == 0:
        return image
    return F.avg_pool2d(image, kernel_size=2**scale)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is a 16-bit float (float32 and float64 pass unchanged)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def compute_losses(
    outputs: Mapping[str, Mapping[int, torch.Tensor] | torch.Tensor],
    frames: torch.Tensor,
    K: torch.Tensor,
    inv_K: torch.Tensor,
    transforms: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
    recompute: bool = True,
    photometric_fn: Callable[..., torch.Tensor] = photometric_losses,
) -> dict[str, torch.Tensor]:
    """All loss terms of one batch.

    `frames` is B x F x 3 x H x W (un-augmented, frame 0 first); `transforms[i]` maps frame-0
    camera points into the camera of frame i + 1. `recompute` recomputes the warped images
    and SSIM maps in backward instead of keeping them (same values, far less memory).
    `photometric_fn` computes the per-pixel photometric maps (`photometric_losses`, or a
    compiled version of it).
    Returns the weighted total under "total", the unweighted terms under their names, and the
    auto-mask of scale 0 under "automask".

    The loss is evaluated in float32 (or float64) whatever precision the networks ran in
    (docs/design.md 7.2): under bf16/fp16 autocast, depth from disparity, pixel coordinates
    (up to 1024, where bfloat16 steps by 4 to 8 pixels), the SSIM statistics (differences of
    nearly equal means) and the SGT distances would lose most of their digits. Only the
    networks' outputs are cast: 1-channel disparities, the segmentation logits and the three
    SGT feature maps.
    """
    with torch.autocast(frames.device.type, enabled=False):
        target = frames[:, 0]
        # S x B x 3 x H x W: every source of a scale goes through one warp and one SSIM call.
        sources = frames[:, 1:].transpose(0, 1)
        stacked_transforms = torch.stack([full_precision(t) for t in transforms])
        size = tuple(target.shape[-2:])
        disps = {s: full_precision(d) for s, d in outputs["disp"].items()}  # type: ignore[union-attr]
        scales = sorted(disps)
        # The target's SSIM statistics serve every source, the identity maps and every scale.
        target_stats = ssim_target_stats(target) if cfg.alpha > 0 else None

        # The unwarped sources do not depend on the scale: one identity loss map per source.
        identity = (
            list(photometric_fn(sources, target, cfg.alpha, target_stats).unbind(0))
            if cfg.automask
            else None
        )

        def reprojection_maps(disp: torch.Tensor, transforms_: torch.Tensor) -> torch.Tensor:
            _, depth = disp_to_depth(upsample_to(disp, size), cfg.min_depth, cfg.max_depth)
            warped = warp_many(sources, depth, transforms_, K, inv_K)
            return photometric_fn(warped, target, cfg.alpha, target_stats)

        photometric_terms, smooth_terms = [], []
        automask = None
        for s in scales:
            disp = disps[s]
            if recompute and torch.is_grad_enabled():
                # The warps and SSIM maps of a scale are ~60 full-resolution images; keeping them
                # for backward is most of the loss's memory. Saving only the disparity and poses
                # and recomputing that part in backward costs one more pass of it (figures:
                # benchmarks/README.md).
                maps = checkpoint(reprojection_maps, disp, stacked_transforms, use_reentrant=False)
            else:
                maps = reprojection_maps(disp, stacked_transforms)
            loss_s, mask_s = min_reprojection_loss(
                list(maps.unbind(0)), identity, noise_std=cfg.identity_noise, generator=generator
            )
            if s == scales[0]:
                automask = mask_s
            photometric_terms.append(loss_s)
            smooth_terms.append(smoothness_loss(disp, downsample_image(target, s)))

        losses = weighted_terms(photometric_terms, smooth_terms, scales, outputs, labels, cfg)
        if automask is not None:
            losses["automask"] = automask
        return losses


def weighted_terms(photometric_terms: Sequence[torch.Tensor], smooth_terms: Sequence[torch.Tensor],
                   scales: Sequence[int], outputs: Mapping[str, Any],
                   labels: torch.Tensor | None, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The total loss from the per-scale photometric and smoothness terms, with the semantic
    terms added (design 3.12): every term under its name and the weighted sum as "total"."""
    if cfg.scale_weighting == "reference":
        photometric = sum(t / 2**s for t, s in zip(photometric_terms, scales, strict=True))
        smoothness = sum(t / 2**s for t, s in zip(smooth_terms, scales, strict=True))
    else:
        photometric = torch.stack(list(photometric_terms)).mean()
        smoothness = torch.stack(
            [t / 2**s for t, s in zip(smooth_terms, scales, strict=True)]
        ).mean()
    losses: dict[str, torch.Tensor] = {"photometric": photometric, "smoothness": smoothness}
    total = photometric + cfg.smoothness_weight * smoothness

    if cfg.segmentation_weight > 0 and "seg_logits" in outputs:
        if labels is None:
            raise ValueError("loss.segmentation_weight > 0 needs pseudo-labels in the batch")
        losses["segmentation"] = segmentation_loss(full_precision(outputs["seg_logits"]), labels)
        total = total + cfg.segmentation_weight * losses["segmentation"]

    if cfg.sgt_weight > 0 and cfg.sgt_scales:
        if labels is None:
            raise ValueError("loss.sgt_weight > 0 needs pseudo-labels in the batch")
        features: Mapping[int, torch.Tensor] = outputs["depth_features"]
        sgt_total = torch.zeros((), device=photometric.device, dtype=photometric.dtype)
        for s in cfg.sgt_scales:
            feat = features[s]
            term = sgt_loss(
                feat,
                resize_labels(labels, tuple(feat.shape[-2:])),
                kernel_size=cfg.sgt_kernel_size,
                margin=cfg.sgt_margin,
                threshold=cfg.sgt_threshold,
                border=cfg.sgt_border,
            )
            losses[f"sgt_s{s}"] = term
            sgt_total = sgt_total + (term / 2**s if cfg.scale_weighting == "reference" else term)
        losses["sgt"] = sgt_total
        total = total + cfg.sgt_weight * sgt_total

    losses["total"] = total
    return losses
