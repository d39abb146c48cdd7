"""timm feature encoders with Monodepth2's input normalisation and ImageNet weights as timm finds
them.

`build_encoder` wraps `timm.create_model(name, features_only=True)` and keeps the maps the
decoders read (docs/design.md 3.1), chosen from the model's `feature_info`: the deepest level at
each reduction 2, 4, 8, 16, 32, where 4..32 are required and 2 is optional. A ResNet gives all
five (stem after the first ReLU, then layer1..layer4), as do EfficientNet, RegNet and MobileNet;
ConvNeXt and most hierarchical transformers start at 1/4 and give four. `check_encoder` finds
this out before anything is built for real, by building the model and running it once on the
meta device (no memory, no arithmetic), so an unusable encoder is a one-line config error.

ImageNet weights come from `models.pretrained` (a local file, the hub caches, or a download);
a multi-frame input (the pose network's two frames) is timm's own `in_chans` adaptation, which
repeats the pretrained first convolution per frame and scales it by 3 / in_chans: for two
frames exactly Monodepth2's stem (RGB filters duplicated and halved), tested.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import timm
import torch
from torch import nn

from fsre_lightning.errors import DataError, first_line
from fsre_lightning.models.network_config import (
    FeatureLevels,
    check_encoder,
    check_pretrained,
    probe_encoder,
    select_levels,
)
from fsre_lightning.models.pretrained import PretrainedWeightsNotFound, hub_offline, weights_file

_logger = logging.getLogger(__name__)

# Monodepth2 / FSRE normalise with one mean and std for every channel (design 3.1).
INPUT_MEAN = 0.45
INPUT_STD = 0.225


def _create(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model with unknown names reported as ValueError naming `encoder`."""
    if ":" in name:
        # hf-hub:/local-dir: names make timm fetch configs from the hub; only plain names here.
        raise ValueError(f"encoder={name!r}: use a timm architecture name such as 'resnet18'")
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"encoder={name!r} is not a timm model: {err}") from err
        raise
    except TypeError as err:
        raise ValueError(f"encoder={name!r} cannot be built with features_only: {err}") from err


def reset_norm_layers(model: nn.Module) -> nn.Module:
    """Set every BatchNorm to weight 1, bias 0 (PyTorch's default) and return the model.

    timm zero-initialises the last BN of each residual block (`zero_init_last`), so a randomly
    initialised timm ResNet starts with all residual branches switched off and their weights get
    no gradient on the first step. The reference (torchvision ResNet + Monodepth2's init) starts
    with BN weights at 1; with this reset our random init matches it (timm's convolutions already
    use kaiming-normal fan_out like the reference).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def create_feature_model(
    name: str,
    pretrained: bool = False,
    weights_path: str | os.PathLike[str] | None = None,
    in_chans: int = 3,
    download: bool = True,
    out_indices: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a timm `features_only` model taking `in_chans` channels, with ImageNet weights
    (`models.pretrained.weights_file`; `download=False`: local files only) adapted by timm to
    `in_chans`; `out_indices` (None: timm's default) picks the feature levels returned."""
    selection = {} if out_indices is None else {"out_indices": out_indices}
    if not pretrained:
        if weights_path is not None:
            _logger.warning("weights_path=%s is ignored because pretrained=False", weights_path)
        return reset_norm_layers(_create(name, pretrained=False, in_chans=in_chans, **selection))
    path = weights_file(name, weights_path, download)
    _logger.info("Loading ImageNet weights for %s from %s", name, path)
    with hub_offline():
        try:
            return _create(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                           in_chans=in_chans, **selection)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError) as err:
            # torch's own message ("retry with weights_only=False") names neither the file nor
            # the model whose weights it should hold.
            raise DataError(f"{path} cannot be loaded as ImageNet weights of encoder '{name}' "
                            f"({type(err).__name__}: {first_line(err)}): give the classification "
                            "model's checkpoint of this architecture (.pth, .bin or "
                            ".safetensors), or pretrained=false") from err


class FeatureEncoder(nn.Module):
    """The feature pyramid the decoders read, from a timm model on normalised input.

    `forward(x)` takes B x (3 * num_input_images) x H x W images in [0, 1] and returns the maps
    at `reductions` (2, 4, 8, 16, 32, or 4, 8, 16, 32 for encoders that start at 1/4);
    `channels` lists their widths.
    """

    def __init__(self, model: nn.Module, name: str, num_input_images: int = 1) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"encoder={name!r} offers no feature_info (timm features_only)")
        reductions = tuple(int(r) for r in info.reduction())
        try:
            chosen = select_levels(reductions)
        except ValueError as err:
            raise ValueError(f"encoder={name!r}: {err}") from None
        if chosen != tuple(range(len(reductions))):
            raise ValueError(f"encoder={name!r} returns levels at reductions {list(reductions)}; "
                             "build it with build_encoder, which keeps only the decoders' levels")
        self.model = model
        self.name = name
        self.num_input_images = num_input_images
        self.channels: tuple[int, ...] = tuple(int(c) for c in info.channels())
        self.reductions: tuple[int, ...] = reductions

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        expected = 3 * self.num_input_images
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(f"image must be B x {expected} x H x W, got shape {tuple(x.shape)}")
        return list(self.model((x - INPUT_MEAN) / INPUT_STD))


def build_encoder(
    name: str = "resnet18",
    pretrained: bool | str = False,
    weights_path: str | os.PathLike[str] | None = None,
    num_input_images: int = 1,
    download: bool = True,
) -> FeatureEncoder:
    """Feature encoder for FSRE (one image) or the pose network (`num_input_images` frames).

    For several frames the first convolution takes 3 * N channels; timm adapts pretrained RGB
    filters to them (repeated per frame, scaled by 3 / (3 N): Monodepth2's stem for N = 2).
    `pretrained="auto"` loads the weights when a local copy exists and otherwise warns and
    starts from random init; `True` insists (downloading them when it can) and raises
    PretrainedWeightsNotFound without them.
    """
    if pretrained == "auto":
        # The demo's setting: ImageNet weights when a local copy exists, else say so.
        try:
            return build_encoder(name, True, weights_path, num_input_images, download=False)
        except PretrainedWeightsNotFound as err:
            _logger.warning("pretrained=auto, using random initialisation: %s", err)
            return build_encoder(name, False, None, num_input_images)
    check_pretrained("pretrained", pretrained)
    check_encoder("encoder", name)
    if num_input_images < 1:
        raise ValueError(f"num_input_images must be >= 1, got {num_input_images}")
    levels = probe_encoder(name)
    assert isinstance(levels, FeatureLevels)  # check_encoder said so
    model = create_feature_model(name, pretrained, weights_path, in_chans=3 * num_input_images,
                                 download=download, out_indices=levels.out_indices)
    return FeatureEncoder(model, name, num_input_images)
