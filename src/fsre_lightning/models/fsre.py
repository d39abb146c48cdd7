"""FSRENetwork: shared encoder, depth and segmentation decoders, CMA between them.

The architecture is docs/design.md sections 3.1 and 3.11.

Variants (rows of the paper's Table 1b):

- `segmentation=False, cma_scales=()`: Monodepth2 baseline (encoder + depth decoder).
- `cma_scales=()`: "+ L_CE" (shared encoder, two plain decoders).
- default: full FSRE-Depth, CMA after decoder blocks s = 4, 3, 2 (paper l = 0, 1, 2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fsre_lightning.config.checks as checks
from fsre_lightning.cityscapes import NUM_CLASSES
from fsre_lightning.models.cma import CrossTaskAttention
from fsre_lightning.models.decoder import (
    DECODER_CHANNELS,
    NUM_SCALES,
    MonodepthDecoder,
)
from fsre_lightning.models.encoder import build_encoder
from fsre_lightning.models.layers import first_conv, like_weight
from fsre_lightning.models.network_config import SIZE_DIVISOR, NetworkConfig


class FSRENetwork(nn.Module):
    """Depth (and semantics) network of FSRE-Depth.

    `forward(image)` with image B x 3 x H x W in [0, 1] (H, W divisible by 32) returns:

    - "disp": {s: sigmoid disparity B x 1 x H/2^s x W/2^s for s in disp_scales}
    - "seg_logits": B x num_classes x H x W (only when `segmentation=True`)
    - "depth_features": {s: depth decoder output of block s, after CMA where CMA sits}, s = 0..4

    CMA at scale s runs after block s of both decoders; both directions read the pre-CMA
    features of both decoders (as the reference code does) and their outputs replace the
    decoder features. `cma_depth[str(s)]` refines depth (segmentation as reference),
    `cma_seg[str(s)]` refines segmentation.

    The image is put into the memory format of the encoder's first convolution: after
    `.to(memory_format=torch.channels_last)` every convolution runs NHWC (docs/design.md,
    "Channels-last").

    `gradient_checkpointing = True` recomputes the decoder blocks and CMA's attention in
    backward instead of keeping their activations (same values and gradients). CMA's BatchNorm
    stays outside the recomputed parts: recomputing it would update its running statistics a
    second time.
    """

    _gradient_checkpointing: bool = False

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self._gradient_checkpointing = bool(value)
        for cma in [*self.cma_depth.values(), *self.cma_seg.values()]:
            cma.recompute = bool(value)

    def __init__(
        self,
        encoder: str = "resnet18",
        pretrained: bool | str = False,
        num_classes: int = NUM_CLASSES,
        disp_scales: Sequence[int] = (0, 1, 2, 3),
        cma_scales: Sequence[int] = (4, 3, 2),
        num_heads: int = 4,
        head_ratio: float = 2.0,
        cma_targets: Sequence[str] = ("depth", "seg"),
        attention_scale: str = "paper",
        segmentation: bool = True,
        weights_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        NetworkConfig(**checks.arguments(locals()))
        disp, cma, targets = tuple(disp_scales), tuple(cma_scales), tuple(cma_targets)
        self.disp_scales = tuple(sorted(disp))
        self.cma_scales = tuple(sorted(cma, reverse=True))
        self.cma_targets = targets if cma else ()
        self.num_classes = int(num_classes)
        self.segmentation = bool(segmentation)

        self.encoder = build_encoder(encoder, pretrained=pretrained, weights_path=weights_path)
        # In a tuple, so that it is not registered a second time (parameter names unchanged).
        self._stem = (first_conv(self.encoder),)
        # The decoders adapt to the encoder's maps (docs/design.md 3.1): widths and which
        # blocks have a skip come from its feature_info; their own widths and output sizes
        # (and so CMA, which works on decoder features) are the same for every encoder.
        enc_ch, enc_red = self.encoder.channels, self.encoder.reductions
        self.depth_decoder = MonodepthDecoder(enc_ch, 1, self.disp_scales, enc_red)
        self.seg_decoder: MonodepthDecoder | None = (
            MonodepthDecoder(enc_ch, self.num_classes, (0,), enc_red) if segmentation else None
        )

        def make(s: int) -> CrossTaskAttention:
            return CrossTaskAttention(
                DECODER_CHANNELS[s], int(num_heads), head_ratio, attention_scale
            )

        self.cma_depth = nn.ModuleDict(
            {str(s): make(s) for s in self.cma_scales if "depth" in self.cma_targets}
        )
        self.cma_seg = nn.ModuleDict(
            {str(s): make(s) for s in self.cma_scales if "seg" in self.cma_targets}
        )

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        """Disparities, segmentation logits and depth decoder features (see class doc)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be B x 3 x H x W, got shape {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % SIZE_DIVISOR or w % SIZE_DIVISOR:
            raise ValueError(
                f"image height and width must be divisible by {SIZE_DIVISOR}, got {h} x {w}"
            )
        feats = self.encoder(like_weight(image, self._stem[0].weight))
        x_d = feats[-1]
        x_s = feats[-1]
        disp: dict[int, torch.Tensor] = {}
        depth_features: dict[int, torch.Tensor] = {}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()

        def run(decoder: MonodepthDecoder, s: int, x: torch.Tensor) -> torch.Tensor:
            if recompute:
                return checkpoint(decoder.block, s, x, feats, use_reentrant=False)
            return decoder.block(s, x, feats)

        for s in range(NUM_SCALES - 1, -1, -1):
            x_d = run(self.depth_decoder, s, x_d)
            if self.seg_decoder is not None:
                x_s = run(self.seg_decoder, s, x_s)
                key = str(s)
                new_d = self.cma_depth[key](x_d, x_s) if key in self.cma_depth else x_d
                new_s = self.cma_seg[key](x_s, x_d) if key in self.cma_seg else x_s
                x_d, x_s = new_d, new_s
            depth_features[s] = x_d
            if s in self.disp_scales:
                disp[s] = torch.sigmoid(self.depth_decoder.head(s, x_d))
        out: dict[str, Any] = {"disp": disp, "depth_features": depth_features}
        if self.seg_decoder is not None:
            out["seg_logits"] = self.seg_decoder.head(0, x_s)
        return out
