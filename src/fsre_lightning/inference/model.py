"""A trained model as a plain inference graph, shared by `predict` and `export`.

`InferenceModel` takes float RGB images in [0, 1] (B x 3 x H x W, H and W multiples of 32) and
returns the disparity and depth of `disp_to_depth`, plus segmentation when asked. The input
normalisation ((x - 0.45) / 0.225) is part of the encoder, so it is inside every exported
graph too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsre_lightning.errors import ConfigError
from fsre_lightning.geometry import disp_to_depth
from fsre_lightning.module import FSREModule

SEG_OUTPUTS = ("labels", "logits")


class InferenceModel(nn.Module):
    """image -> (disp, depth) or (disp, depth, segmentation); see the module docstring.

    disp and depth are B x 1 x H x W (depth = 1 / disp, in the training's relative units);
    segmentation is B x H x W int64 train ids (`seg_output="labels"`) or the B x C x H x W
    logits (`"logits"`, what `predict` upsamples before its argmax).
    """

    def __init__(self, net: nn.Module, min_depth: float, max_depth: float,
                 segmentation: bool = False, seg_output: str = "labels") -> None:
        super().__init__()
        if seg_output not in SEG_OUTPUTS:
            raise ValueError(f"seg_output={seg_output!r}: use one of {SEG_OUTPUTS}")
        if segmentation and getattr(net, "seg_decoder", None) is None:
            raise ValueError("the network has no segmentation decoder")
        self.net = net
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.segmentation, self.seg_output = segmentation, seg_output

    @property
    def output_names(self) -> list[str]:
        return ["disp", "depth", *(["segmentation"] if self.segmentation else [])]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(image)
        disp, depth = disp_to_depth(out["disp"][0], self.min_depth, self.max_depth)
        if not self.segmentation:
            return disp, depth
        logits = out["seg_logits"]
        return disp, depth, (logits.argmax(1) if self.seg_output == "labels" else logits)


def build_inference_model(module: FSREModule, ckpt_path: str | Path, segmentation: bool,
                          seg_output: str = "labels") -> InferenceModel:
    """The module's depth network as an InferenceModel; a clear error when seg is missing."""
    if segmentation and not module.has_segmentation:
        raise ConfigError(f"segmentation=true but {ckpt_path} has no segmentation decoder "
                          "(a Monodepth2 baseline): use segmentation=false")
    model = InferenceModel(module.net, module.loss_cfg.min_depth, module.loss_cfg.max_depth,
                           segmentation, seg_output)
    return model.eval()
