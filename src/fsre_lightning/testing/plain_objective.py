"""The total loss as a plain, unoptimised composition of the pure loss functions.

Every scale warps every source on its own, recomputes the identity (unwarped) loss and the
target's SSIM statistics, and autograd keeps every intermediate: the way the reference code
spends its step. `tests/test_step_equivalence.py` checks the optimised
`fsre_lightning.objective.compute_losses` against it, and `benchmarks/train_step.py
--objective plain` times it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fsre_lightning.geometry import disp_to_depth, warp
from fsre_lightning.losses import (
    min_reprojection_loss,
    photometric_loss,
    smoothness_loss,
)
from fsre_lightning.objective import LossConfig, downsample_image, upsample_to, weighted_terms


def plain_compute_losses(
    outputs: Mapping[str, Mapping[int, torch.Tensor] | torch.Tensor],
    frames: torch.Tensor,
    K: torch.Tensor,
    inv_K: torch.Tensor,
    transforms: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    cfg: LossConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Same contract as `compute_losses`, written the straightforward way."""
    target = frames[:, 0]
    sources = [frames[:, i] for i in range(1, frames.shape[1])]
    size = tuple(target.shape[-2:])
    disps: Mapping[int, torch.Tensor] = outputs["disp"]  # type: ignore[assignment]
    scales = sorted(disps)
    photometric_terms, smooth_terms = [], []
    for s in scales:
        disp = disps[s]
        _, depth = disp_to_depth(upsample_to(disp, size), cfg.min_depth, cfg.max_depth)
        reprojection = [
            photometric_loss(warp(src, depth, T, K, inv_K), target, cfg.alpha)
            for src, T in zip(sources, transforms, strict=True)
        ]
        identity = (
            [photometric_loss(src, target, cfg.alpha) for src in sources] if cfg.automask else None
        )
        loss_s, _ = min_reprojection_loss(
            reprojection, identity, noise_std=cfg.identity_noise, generator=generator
        )
        photometric_terms.append(loss_s)
        smooth_terms.append(smoothness_loss(disp, downsample_image(target, s)))

    return weighted_terms(photometric_terms, smooth_terms, scales, outputs, labels, cfg)
