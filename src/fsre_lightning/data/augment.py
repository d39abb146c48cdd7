"""Colour jitter on the device, with one set of parameters per sample shared by its frames."""

from __future__ import annotations

import torch
from kornia.augmentation import ColorJitter
from torch import nn

# ITU-R BT.601 luma, the grayscale of torchvision's and kornia's jitter.
_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """... x 3 x H x W -> ... x H x W luma."""
    r, g, b = x.unbind(-3)
    return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def shift_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ... x 3 x H x W images in [0, 1] by `turns` (... x 1 x 1).

    The same result as torchvision's / kornia's adjust_hue (RGB -> HSV, shift, HSV -> RGB) up
    to float rounding, without building the HSV image: value and chroma do not change under a
    hue rotation, so each channel is v - c * clamp(min(k, 4 - k), 0, 1) with
    k = (n + hue_in_sextants) mod 6 and n = 5, 3, 1 for red, green, blue: a fraction of the
    passes over the image of the round trip, which matters on CPU.
    """
    r, g, b = x.unbind(-3)
    v = x.amax(-3)
    c = v - x.amin(-3)
    # hue in sextants [-1, 5] (red max: (g - b) / c; green: 2 + (b - r) / c; blue: 4 + ...)
    numerator = torch.where((r >= g) & (r >= b), g - b,
                            torch.where(g >= b, (b - r) + 2.0 * c, (r - g) + 4.0 * c))
    sextant = numerator / torch.where(c > 0, c, torch.ones_like(c)) + turns * 6.0
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = torch.remainder(sextant.unsqueeze(-3) + n, 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v.unsqueeze(-3) - c.unsqueeze(-3) * weight


_FACTOR_KEYS = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")


def _jitter_images(x: torch.Tensor, factors: dict[str, torch.Tensor], order: list[int]
                   ) -> torch.Tensor:
    """kornia ColorJitter's steps in `order` on N x 3 x H x W images, factors of shape N."""
    x = x.clamp(0.0, 1.0)
    for step in order:
        f = factors[_FACTOR_KEYS[step]].view(-1, 1, 1, 1)
        if step == 0:
            x = (x * f).clamp_(0.0, 1.0)
        elif step == 1:
            mean = _gray(x).mean((-2, -1), keepdim=True).unsqueeze(-3)
            x = (x * f + mean * (1 - f)).clamp_(0.0, 1.0)
        elif step == 2:
            x = ((1 - f) * _gray(x).unsqueeze(-3) + f * x).clamp_(0.0, 1.0)
        else:
            x = shift_hue(x, f.squeeze(-1))
    return x.clamp_(0.0, 1.0)


def apply_color_jitter(frames: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """kornia ColorJitter's transform for `params`, applied to all F frames of each sample.

    `frames` is B x F x 3 x H x W; `params` comes from ColorJitter.forward_parameters for B
    samples (per-sample factors, one order, batch_prob). Only the selected samples are computed;
    all frames of a sample get that sample's factors.
    """
    selected = params["batch_prob"].to(frames.device) > 0.5
    if not bool(selected.any()):
        return frames
    order = params["order"].tolist()
    factors = {k: params[k].to(frames.device, frames.dtype) for k in _FACTOR_KEYS}
    out = frames.clone()
    f = frames.shape[1]
    if frames.is_cuda:  # one pass over all selected frames
        index = selected.nonzero().squeeze(1)
        images = _jitter_images(frames[index].flatten(0, 1),
                                {k: v[index].repeat_interleave(f) for k, v in factors.items()},
                                order)
        out[index] = images.view(len(index), *frames.shape[1:])
        return out
    # CPU: sample by sample, written straight into the output: batch-sized temporaries
    # would be fresh, page-faulting allocations for every operation
    for i in selected.nonzero().squeeze(1).tolist():
        out[i] = _jitter_images(frames[i], {k: v[i].expand(f) for k, v in factors.items()},
                                order)
    return out


class FrameConsistentColorJitter(nn.Module):
    """torchvision-style colour jitter for B x F x 3 x H x W frame stacks.

    Each sample draws its own brightness/contrast/saturation/hue factors and order (with
    probability p), and all F frames of the sample get exactly that transform, as Monodepth2
    does: the photometric loss compares frames, so they must be jittered alike. kornia's
    ColorJitter draws the parameters; `apply_color_jitter` applies its formulas to all frames
    at once (the same output as kornia's own transform, in fewer passes over the images).
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2,
                 hue: float = 0.1, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"jitter probability must be in [0, 1], got {p}")
        self.p = p
        self.jitter = ColorJitter(brightness, contrast, saturation, hue, p=p)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be B x F x 3 x H x W, got {tuple(frames.shape)}")
        if self.p == 0.0:
            return frames
        params = self.jitter.forward_parameters(frames[:, 0].shape)
        out = apply_color_jitter(frames, params)
        # a fresh tensor can be clamped in place: on CPU another batch-sized allocation costs
        # as much as the jitter of a sample
        return out.clamp(0.0, 1.0) if out is frames else out.clamp_(0.0, 1.0)
