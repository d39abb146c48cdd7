"""Small building blocks shared by the decoders and the CMA fusion (docs/design.md section 3.1)."""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (with bias) on a reflection-padded input, so the size is kept.

    Reflection rather than zero padding avoids dark borders in the predicted disparity
    (Monodepth2's choice).
    """
    return nn.Sequential(
        nn.ReflectionPad2d(1), nn.Conv2d(int(in_channels), int(out_channels), kernel_size=3)
    )


class ConvBlock(nn.Module):
    """Reflection-padded 3x3 convolution followed by ELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))
