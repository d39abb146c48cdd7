"""Photometric error (the paper's eq. 2) and Monodepth2's minimum reprojection (design 3.6-3.7).

- `ssim` is Monodepth2's SSIM: a 3 x 3 box (average) window over a reflection-padded image,
  C1 = 0.01**2, C2 = 0.03**2, returned as the per-pixel dissimilarity clamp((1 - SSIM) / 2, 0, 1).
  (kornia's own `kornia.metrics.ssim` uses a Gaussian window and gives different numbers.)
- `box_filter3x3` is that window. It sums shifted slices instead of calling a depthwise
  convolution (`kornia.filters.box_blur`, same values), which on CPU is a slow depthwise
  convolution of a few channels (figures: benchmarks/README.md, "Work removed from the step").
- `photometric_loss` mixes it with L1: alpha * SSIM-term + (1 - alpha) * |I - I_hat|, both
  averaged over colour channels, one value per pixel.
- `min_reprojection_loss` takes the per-pixel minimum over warped and (noise-tie-broken)
  identity losses and returns Monodepth2's auto-mask alongside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fsre_lightning.loss_config import check_alpha

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def _check_pair(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{x_name} must be B x C x H x W, got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(
            f"{y_name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(y.shape)}"
        )


class _BoxFilter3x3(torch.autograd.Function):
    """The 3 x 3 reflection-padded mean with its adjoint written out.

    Forward sums shifted slices; backward is the transposed filter (the same sums over the
    zero-padded gradient) folded back through the reflection padding. Nothing is saved for
    backward (the filter is linear), and backward avoids autograd's six zero-filled slice
    gradients.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.input_shape = x.shape
        return _valid_box_mean(F.pad(x, (1, 1, 1, 1), mode="reflect"))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        padded_grad = _valid_box_mean(F.pad(grad, (2, 2, 2, 2)))
        dummy = grad.new_empty(ctx.input_shape)  # only its shape is read
        return torch.ops.aten.reflection_pad2d_backward(padded_grad, dummy, [1, 1, 1, 1])


def _valid_box_mean(padded: torch.Tensor) -> torch.Tensor:
    """Mean of every 3 x 3 window that fits in `padded` (output 2 smaller in H and W)."""
    rows = padded[..., :-2] + padded[..., 1:-1]
    rows += padded[..., 2:]
    out = rows[..., :-2, :] + rows[..., 1:-1, :]
    out += rows[..., 2:, :]
    return out.mul_(1 / 9)


def box_filter3x3(x: torch.Tensor) -> torch.Tensor:
    """Mean over each pixel's 3 x 3 neighbourhood of the reflection-padded B x C x H x W `x`.

    Equal to `F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3, stride=1)` and to
    `kornia.filters.box_blur(x, (3, 3), border_type="reflect")` up to rounding.
    """
    if x.dim() != 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"x must be B x C x H x W with H, W >= 2, got shape {tuple(x.shape)}")
    return _BoxFilter3x3.apply(x)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM dissimilarity clamp((1 - SSIM) / 2, 0, 1), B x C x H x W like `x`.

    Monodepth2's variant: local statistics from a 3 x 3 box filter with reflection padding 1.
    The five statistics (mu_x, mu_y, E[x^2], E[y^2], E[xy]) come from one filter call on the
    inputs stacked along the channel axis.
    """
    _check_pair(x, y, "x", "y")
    c = x.shape[1]
    stats = box_filter3x3(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    sigma_x = e_xx - mu_x * mu_x
    sigma_y = e_yy - mu_y * mu_y
    sigma_xy = e_xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return torch.clamp((1 - numerator / denominator) / 2, 0, 1)


def photometric_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """The paper's eq. 2 per pixel (B x 1 x H x W): alpha SSIM + (1 - alpha) L1, channel means."""
    _check_pair(pred, target, "pred", "target")
    check_alpha("alpha", alpha)
    l1 = (pred - target).abs().mean(dim=1, keepdim=True)
    if alpha == 0.0:
        return l1
    return alpha * ssim(pred, target).mean(dim=1, keepdim=True) + (1 - alpha) * l1


def ssim_target_stats(target: torch.Tensor) -> torch.Tensor:
    """Box-filtered (mu_y, E[y^2]) of the target, B x 2C x H x W, for `photometric_losses`.

    They depend on the target alone, so a step computes them once and shares them between
    every source frame, the identity maps and every scale.
    """
    if target.dim() != 4:
        raise ValueError(f"target must be B x C x H x W, got shape {tuple(target.shape)}")
    return box_filter3x3(torch.cat([target, target * target], dim=1))


def photometric_losses(
    preds: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.85,
    target_stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """`photometric_loss` of N predictions against one target in one pass: N x B x 1 x H x W.

    `preds` is N x B x C x H x W (e.g. every source frame of a scale); `target_stats` is
    `ssim_target_stats(target)` (computed here when None). The maths is `photometric_loss`'s,
    term for term; only the target's statistics are filtered once instead of N times and the
    N predictions go through one filter call.
    """
    if preds.dim() != 5 or preds.shape[1:] != target.shape:
        raise ValueError(
            f"preds must be N x {tuple(target.shape)} (N predictions of the target's shape), "
            f"got shape {tuple(preds.shape)}"
        )
    check_alpha("alpha", alpha)
    n, b, c, h, w = preds.shape
    l1 = (preds - target).abs().mean(dim=2, keepdim=True)
    if alpha == 0.0:
        return l1
    if target_stats is None:
        target_stats = ssim_target_stats(target)
    mu_y, e_yy = target_stats.split(c, dim=1)
    x = preds.reshape(n * b, c, h, w)
    xy = (preds * target).reshape(n * b, c, h, w)
    stats = box_filter3x3(torch.cat([x, x * x, xy], dim=1))
    mu_x, e_xx, e_xy = (t.reshape(n, b, c, h, w) for t in stats.split(c, dim=1))
    sigma_x = e_xx - mu_x * mu_x
    sigma_y = e_yy - mu_y * mu_y
    sigma_xy = e_xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    ssim_map = torch.clamp((1 - numerator / denominator) / 2, 0, 1)
    return alpha * ssim_map.mean(dim=2, keepdim=True) + (1 - alpha) * l1


def _stack_maps(maps: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if len(maps) == 0:
        raise ValueError(f"{name} must hold at least one loss map")
    shape = maps[0].shape
    for m in maps:
        if m.dim() != 4 or m.shape[1] != 1:
            raise ValueError(f"{name} maps must be B x 1 x H x W, got shape {tuple(m.shape)}")
        if m.shape != shape:
            raise ValueError(
                f"{name} maps must share one shape, got {tuple(shape)} and {tuple(m.shape)}"
            )
    return torch.cat(list(maps), dim=1)


def min_reprojection_loss(
    reprojection: Sequence[torch.Tensor],
    identity: Sequence[torch.Tensor] | None = None,
    noise_std: float = 1e-5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monodepth2's per-pixel minimum reprojection with auto-masking.

    `reprojection` holds B x 1 x H x W photometric maps of the warped sources against the
    target, `identity` the maps of the unwarped sources (None: no auto-masking). Identity maps
    get a `noise_std * N(0, 1)` tie-breaker (drawn from `generator` when given). Returns
    (mean over pixels of the per-pixel minimum, boolean B x 1 x H x W auto-mask that is True
    where a reprojection map is the minimum). Exact ties (possible only with noise_std = 0) go
    to the identity map, as with Monodepth2's `torch.min` over [identity, reprojection].
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    reproj = _stack_maps(reprojection, "reprojection")
    if identity is None or len(identity) == 0:
        per_pixel = reproj.amin(dim=1, keepdim=True)
        mask = torch.ones_like(per_pixel, dtype=torch.bool)
        return per_pixel.mean(), mask

    ident = _stack_maps(identity, "identity")
    if ident.shape[0] != reproj.shape[0] or ident.shape[2:] != reproj.shape[2:]:
        raise ValueError(
            f"identity maps {tuple(ident.shape)} must match the reprojection maps "
            f"{tuple(reproj.shape)} in batch and size"
        )
    if noise_std > 0:
        noise = torch.randn(
            ident.shape, generator=generator, device=ident.device, dtype=ident.dtype
        )
        ident = ident + noise_std * noise
    combined = torch.cat([ident, reproj], dim=1)
    per_pixel, index = combined.min(dim=1, keepdim=True)
    mask = index >= ident.shape[1]
    return per_pixel.mean(), mask
