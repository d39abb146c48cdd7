"""PoseNetwork: Monodepth2's two-frame pose network (docs/design.md section 3.1).

A separate encoder takes two frames stacked on channels (6 inputs); its deepest (1/32) map
goes through the pose decoder (1x1 C->256, ReLU, 3x3 256->256, ReLU, 3x3 256->256, ReLU,
1x1 256->6), averaged over space and scaled by 0.01: 3 axis-angle values, then 3 translation
values. The encoder is a ResNet-18 as in the paper (C = 512) by default; any timm model that
`check_encoder` accepts works, the decoder's first layer taking its 1/32 width C from
`feature_info` and the pretrained first convolution repeated per frame (docs/design.md 3.1).

`init_translation` sets the motion the untrained network predicts (the last layer's bias; its
weights stay random). Zero is Monodepth2's. Training from scratch (no ImageNet weights), a zero
start lets the pose lock onto a vertical translation that explains the road's image motion for
the untrained, constant depth, and depth never leaves that state; starting from forward motion,
(0, 0, -t) in `transform`'s convention, avoids it (see the demo experiment).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from fsre_lightning.config.checks import arguments
from fsre_lightning.geometry import transformation_from_parameters
from fsre_lightning.models.encoder import build_encoder
from fsre_lightning.models.layers import first_conv, like_weight, spatial_mean
from fsre_lightning.models.network_config import PoseNetworkConfig

# Keeps the initial motion estimates near identity (Monodepth2).
POSE_SCALE = 0.01


class PoseNetwork(nn.Module):
    """Relative camera motion of a frame pair.

    `forward(frame_a, frame_b)` (each B x 3 x H x W in [0, 1]) returns (axisangle B x 3,
    translation B x 3) for the pair in that order; `transform` turns it into the 4 x 4 matrix
    the warping needs.
    """

    def __init__(
        self,
        encoder: str = "resnet18",
        pretrained: bool | str = False,
        weights_path: str | os.PathLike[str] | None = None,
        init_translation: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        super().__init__()
        PoseNetworkConfig(**arguments(locals()))
        self.encoder = build_encoder(
            encoder, pretrained=pretrained, weights_path=weights_path, num_input_images=2
        )
        # In a tuple, so that it is not registered a second time (parameter names unchanged).
        self._stem = (first_conv(self.encoder),)
        in_ch = self.encoder.channels[-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(in_ch, 256, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 6, kernel_size=1),
        )
        with torch.no_grad():
            bias = self.decoder[-1].bias
            bias[3:] += torch.tensor([float(v) for v in init_translation]) / POSE_SCALE

    def forward(
        self, frame_a: torch.Tensor, frame_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(axisangle, translation), each B x 3, for the ordered pair [frame_a, frame_b]."""
        if frame_a.shape != frame_b.shape or frame_a.dim() != 4 or frame_a.shape[1] != 3:
            raise ValueError(
                "frame_a and frame_b must both be B x 3 x H x W, got "
                f"{tuple(frame_a.shape)} and {tuple(frame_b.shape)}"
            )
        # Both frames use the same per-channel normalisation, done inside the encoder. The pair
        # takes the memory format of the first convolution's weight, so that channels_last
        # weights mean NHWC convolutions throughout (docs/design.md, "Channels-last").
        pair = like_weight(torch.cat([frame_a, frame_b], dim=1), self._stem[0].weight)
        features = self.encoder(pair)
        out = POSE_SCALE * spatial_mean(self.decoder(features[-1]))
        return out[:, :3], out[:, 3:]

    def transform(self, target: torch.Tensor, source: torch.Tensor, source_id: int) -> torch.Tensor:
        """B x 4 x 4 transform mapping points of the target camera (frame 0) into `source`'s.

        Monodepth2's convention: the pair is always fed in temporal order. A past source
        (source_id < 0) is fed as [source, target] and the predicted motion is inverted; a future
        source (source_id > 0) as [target, source], not inverted.
        """
        if source_id == 0:
            raise ValueError("source_id must be non-zero (0 is the target frame)")
        if source_id < 0:
            axisangle, translation = self(source, target)
        else:
            axisangle, translation = self(target, source)
        return transformation_from_parameters(axisangle, translation, invert=source_id < 0)
