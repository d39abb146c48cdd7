"""Monodepth2's U-Net decoder, callable block by block (docs/design.md sections 2 and 3.1).

Block s (s = 4..0, coarsest first) maps the previous block's output (or the encoder's 1/32 map
for s = 4) to features of size H / 2^s with `DECODER_CHANNELS[s]` channels:

    ConvBlock(in -> ch[s]) -> nearest upsample x2 -> concat the encoder map at 1/2^s (if any)
    -> ConvBlock(-> ch[s])

The skips follow the encoder's reductions: a ResNet (maps at 1/2..1/32) gives every block
s >= 1 a skip, as in Monodepth2; an encoder starting at 1/4 (ConvNeXt) leaves block 1 without
one, like block 0. Block widths and output sizes are the same for every encoder.

Heads are reflection-padded 3x3 convolutions at `head_scales` with no activation; the caller
applies sigmoid (disparity) or keeps logits (segmentation). The block-wise API lets
`FSRENetwork` run two decoders side by side and fuse them with CMA between blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsre_lightning.models.layers import ConvBlock, conv3x3
from fsre_lightning.models.network_config import DECODER_CHANNELS, NUM_SCALES, check_scales

# Reductions of the maps a ResNet encoder gives (the decoder's default).
RESNET_REDUCTIONS = (2, 4, 8, 16, 32)


def skip_sources(reductions: Sequence[int]) -> dict[int, int]:
    """Block s -> the position of its skip among encoder maps at `reductions` (the map at
    1/2^s). ValueError unless the deepest map is at 1/2^NUM_SCALES and the others are distinct
    powers of two in between (the encoder keeps only the maps the decoder reads)."""
    found = [int(r) for r in reductions]
    deepest = 2 ** (NUM_SCALES)
    allowed = {2**s for s in range(1, NUM_SCALES)}
    if not found or found[-1] != deepest or len(set(found)) != len(found) or not (
            set(found[:-1]) <= allowed) or found != sorted(found):
        raise ValueError(f"encoder reductions {found}: the decoder reads increasing, distinct "
                         f"reductions from {sorted(allowed)} and ends at {deepest}")
    return {s: found.index(2**s) for s in range(1, NUM_SCALES) if 2**s in found}


class MonodepthDecoder(nn.Module):
    """Five-block decoder with skip connections and per-scale output heads.

    Args:
        encoder_channels: widths of the encoder maps, shallowest first.
        out_channels: channels of every head (1 for disparity, classes for segmentation).
        head_scales: scales s with a head.
        encoder_reductions: reductions of those maps (`skip_sources`): 2..32 for a ResNet,
            4..32 for an encoder that starts at 1/4.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        out_channels: int,
        head_scales: Sequence[int] = (0, 1, 2, 3),
        encoder_reductions: Sequence[int] = RESNET_REDUCTIONS,
    ) -> None:
        super().__init__()
        if len(encoder_channels) != len(encoder_reductions):
            raise ValueError(
                f"encoder_channels {list(encoder_channels)} and encoder_reductions "
                f"{list(encoder_reductions)} must have one entry per encoder map"
            )
        check_scales("head_scales", list(head_scales))
        self.skips = skip_sources(encoder_reductions)
        self.encoder_channels = tuple(int(c) for c in encoder_channels)
        self.encoder_reductions = tuple(int(r) for r in encoder_reductions)
        self.head_scales = tuple(sorted({int(s) for s in head_scales}, reverse=True))
        ch = DECODER_CHANNELS
        self.upconv0 = nn.ModuleDict()
        self.upconv1 = nn.ModuleDict()
        for s in range(NUM_SCALES - 1, -1, -1):
            in_ch = self.encoder_channels[-1] if s == NUM_SCALES - 1 else ch[s + 1]
            self.upconv0[str(s)] = ConvBlock(in_ch, ch[s])
            skip = self.encoder_channels[self.skips[s]] if s in self.skips else 0
            self.upconv1[str(s)] = ConvBlock(ch[s] + skip, ch[s])
        self.heads = nn.ModuleDict({str(s): conv3x3(ch[s], out_channels) for s in self.head_scales})

    def block(
        self, scale: int, x: torch.Tensor, encoder_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Run block `scale` on `x` (previous block's output, or the 1/32 map for scale 4)."""
        x = self.upconv0[str(scale)](x)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if scale in self.skips:
            x = torch.cat([x, encoder_features[self.skips[scale]]], dim=1)
        return self.upconv1[str(scale)](x)

    def head(self, scale: int, x: torch.Tensor) -> torch.Tensor:
        """Raw head output (no activation) at `scale`."""
        return self.heads[str(scale)](x)

    def forward(
        self, encoder_features: Sequence[torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Plain decoder run: (block outputs for s = 0..4, raw head outputs at head_scales)."""
        features: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        x = encoder_features[-1]
        for s in range(NUM_SCALES - 1, -1, -1):
            x = self.block(s, x, encoder_features)
            features[s] = x
            if str(s) in self.heads:
                outputs[s] = self.head(s, x)
        return features, outputs
