"""Edge-aware disparity smoothness (the paper's eq. 3; design 3.8)."""

from __future__ import annotations

import torch

_MEAN_EPS = 1e-7


def smoothness_loss(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of mean-normalised disparity, a scalar.

    `disp` is B x 1 x H x W, `image` the colour image B x C x H x W at the same size. The
    disparity is divided by its per-image mean (+ 1e-7); first differences in x and y are
    weighted by exp(-mean over channels |dI|) and averaged: mean |dx| w_x + mean |dy| w_y.
    """
    if disp.dim() != 4:
        raise ValueError(f"disp must be B x 1 x H x W, got shape {tuple(disp.shape)}")
    if image.dim() != 4 or image.shape[0] != disp.shape[0] or image.shape[2:] != disp.shape[2:]:
        raise ValueError(
            f"image must be B x C x H x W at the size of disp {tuple(disp.shape)}, "
            f"got shape {tuple(image.shape)}"
        )
    d = disp / (disp.mean(dim=(2, 3), keepdim=True) + _MEAN_EPS)
    grad_d_x = (d[..., :, :-1] - d[..., :, 1:]).abs()
    grad_d_y = (d[..., :-1, :] - d[..., 1:, :]).abs()
    grad_i_x = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(dim=1, keepdim=True)
    grad_i_y = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(dim=1, keepdim=True)
    return (grad_d_x * torch.exp(-grad_i_x)).mean() + (grad_d_y * torch.exp(-grad_i_y)).mean()
