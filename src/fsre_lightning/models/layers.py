"""Small building blocks shared by the decoders and the CMA fusion (docs/design.md section 3.1).

Memory format (docs/design.md, "Channels-last"): every block here returns its input's memory
format, so that networks whose weights are channels_last run every convolution on NHWC tensors
and cuDNN converts nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor laid out NHWC and not also NCHW (C == 1 or H == W == 1 are both)."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def reflection_pad_nhwc(x: torch.Tensor) -> torch.Tensor:
    """Reflection padding of 1 on H and W, NHWC in and out on every device and under compile.

    The NHWC view (B, H, W, C) of a channels_last tensor is contiguous; padded as one 5-D volume
    (H and W by 1, C by 0) it gives a contiguous (B, H+2, W+2, C) result, i.e. a channels_last
    one, and its backward a contiguous, i.e. channels_last, gradient. reflection_pad2d itself
    returns NCHW on CUDA and in the meta kernel torch.compile plans with (pytorch#96738).
    """
    volume = x.permute(0, 2, 3, 1).unsqueeze(0)
    padded = F.pad(volume, (0, 0, 1, 1, 1, 1), mode="reflect")
    return padded.squeeze(0).permute(0, 3, 1, 2)


def reflection_pad(x: torch.Tensor) -> torch.Tensor:
    """`F.pad(x, (1, 1, 1, 1), mode="reflect")` that keeps a channels_last input channels_last."""
    # Eager on the CPU, reflection_pad2d has its own NHWC kernel, faster in backward than the
    # 5-D route (docs/design.md, "Channels-last").
    if is_channels_last(x) and (x.device.type != "cpu" or torch.compiler.is_compiling()):
        return reflection_pad_nhwc(x)
    return F.pad(x, (1, 1, 1, 1), mode="reflect")


class ReflectionPad(nn.Module):
    """Reflection padding of 1 (`reflection_pad`); a module so that `conv3x3` keeps its
    parameter names (`...0` is the padding, `...1` the convolution)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reflection_pad(x)


def conv3x3(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution (with bias) on a reflection-padded input, so the size is kept.

    Reflection rather than zero padding avoids dark borders in the predicted disparity
    (Monodepth2's choice).
    """
    return nn.Sequential(
        ReflectionPad(), nn.Conv2d(int(in_channels), int(out_channels), kernel_size=3)
    )


def first_conv(module: nn.Module) -> nn.Conv2d:
    """The first nn.Conv2d of `module` (in registration order): the one that reads its input."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return child
    raise ValueError(f"{type(module).__name__} has no nn.Conv2d")


def like_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` in the memory format of the convolution weight `weight` (no copy when it already is).

    A network moved to channels_last then needs nothing more from its caller: its first
    convolution, and so every later one, runs NHWC (docs/design.md, "Channels-last"). An NCHW
    network leaves anything but an NHWC input as it is (a strided slice of a frame stack is
    read as NCHW without a copy).
    """
    if is_channels_last(weight):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous() if is_channels_last(x) else x


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> B x C, the mean over h and w, whose gradient keeps `x`'s memory format.

    The mean's backward materialises its broadcast gradient in the layout of the tensor it
    reduced; reducing the (contiguous) NHWC view of a channels_last map makes that NHWC too.
    Same elements, same reduction.
    """
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).mean(dim=(1, 2))
    return x.mean(dim=(2, 3))


class ConvBlock(nn.Module):
    """Reflection-padded 3x3 convolution followed by ELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(in_channels, out_channels)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))
