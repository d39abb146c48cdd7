"""Colour jitter on the device, with one set of parameters per sample shared by its frames."""

from __future__ import annotations

import torch
from kornia.augmentation import ColorJitter
from torch import nn


class FrameConsistentColorJitter(nn.Module):
    """torchvision-style colour jitter for B x F x 3 x H x W frame stacks.

    Each sample draws its own brightness/contrast/saturation/hue factors and order (with
    probability p), and all F frames of the sample get exactly that transform, as Monodepth2
    does: the photometric loss compares frames, so they must be jittered alike.
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
        f = frames.shape[1]
        params = self.jitter.forward_parameters(frames[:, 0].shape)
        return torch.stack(
            [self.jitter(frames[:, i], params=params) for i in range(f)], dim=1
        ).clamp(0.0, 1.0)
