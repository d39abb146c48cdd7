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

import functools
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

from fsre_lightning.config.checks import is_int, require
from fsre_lightning.errors import DataError, first_line
from fsre_lightning.models.pretrained import (
    PretrainedWeightsNotFound,
    check_pretrained,
    hub_offline,
    weights_file,
)

_logger = logging.getLogger(__name__)

# Monodepth2 / FSRE normalise with one mean and std for every channel (design 3.1).
INPUT_MEAN = 0.45
INPUT_STD = 0.225
# Reductions of the encoder maps the decoders read (docs/design.md 3.1): 1/32 feeds decoder
# block s = 4, and 1/16, 1/8, 1/4, 1/2 are the skips of blocks s = 4, 3, 2, 1. The 1/2 map is
# optional: without it block 1 has no skip, as block 0 never has.
DECODER_REDUCTIONS = (2, 4, 8, 16, 32)
REQUIRED_REDUCTIONS = (4, 8, 16, 32)
# The deepest map is at 1/32: an input size must be a multiple of 32 for the skips to line up.
SIZE_DIVISOR = DECODER_REDUCTIONS[-1]
# The input size of the encoder check (on the meta device, so free): the paper's KITTI size.
PROBE_SIZE = (192, 640)


def check_image_size(key: str, value: Any) -> None:
    """A network input height or width: a positive multiple of 32."""
    require(is_int(value) and value > 0 and value % SIZE_DIVISOR == 0, key, value,
            f"the image size must be a positive multiple of {SIZE_DIVISOR} (the encoder "
            f"downsamples {SIZE_DIVISOR}x)")


def check_encoder(key: str, value: Any) -> None:
    """A timm architecture name (with or without a weight tag) whose `features_only` maps the
    decoders can read (`probe_encoder`): checked before anything is built for real, so a typo
    or an unusable model stops the run before data preparation, not inside timm."""
    require(isinstance(value, str) and ":" not in value and timm.is_model(value), key, value,
            "a timm architecture name such as 'resnet18.tv_in1k', 'resnet50' or "
            "'convnext_tiny' (timm.list_models() lists them)")
    levels = probe_encoder(value)
    require(isinstance(levels, FeatureLevels), key, value, str(levels))


@dataclass(frozen=True)
class FeatureLevels:
    """The maps of a timm `features_only` model that the decoders read, shallowest first.

    `out_indices` is what `timm.create_model` must be given to return exactly these maps, or
    None when the model's default already does.
    """

    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    out_indices: tuple[int, ...] | None


def select_levels(reductions: Sequence[int]) -> tuple[int, ...]:
    """Positions, in `feature_info` order, of the maps the decoders read: the deepest level at
    each of DECODER_REDUCTIONS that the model has. ValueError (the reason) when a required
    reduction is missing or the levels are not ordered from shallow to deep."""
    found = [int(r) for r in reductions]
    missing = [r for r in REQUIRED_REDUCTIONS if r not in found]
    if missing:
        raise ValueError(
            f"its features_only levels are at reductions {found}, without "
            f"{', '.join(f'1/{r}' for r in missing)}; the decoders need maps at 1/4, 1/8, 1/16 "
            "and 1/32 (and use 1/2 when there is one), as timm's CNNs (resnet18, "
            "efficientnet_b0, regnetx_002) and hierarchical models (convnext_tiny) give")
    chosen = tuple(max(i for i, r in enumerate(found) if r == want)
                   for want in DECODER_REDUCTIONS if want in found)
    if list(chosen) != sorted(chosen):
        raise ValueError(f"its features_only levels (reductions {found}) do not run from "
                         "shallow to deep")
    return chosen


def _levels_of(model: nn.Module, outputs: Sequence[torch.Tensor], size: tuple[int, int]
               ) -> FeatureLevels:
    """The decoders' levels of a features_only `model` whose forward on a 1 x 3 x `size` input
    gave `outputs`; ValueError (the reason) unless they are B x C x H/r x W/r as
    `feature_info` says."""
    info = model.feature_info
    reductions = [int(r) for r in info.reduction()]
    channels = [int(c) for c in info.channels()]
    chosen = select_levels(reductions)
    if len(outputs) != len(reductions):
        raise ValueError(f"it returns {len(outputs)} maps where feature_info lists "
                         f"{len(reductions)}")
    for i in chosen:
        h, w = size[0] // reductions[i], size[1] // reductions[i]
        got = tuple(outputs[i].shape)
        if got != (1, channels[i], h, w):
            layout = " (channels-last)" if got == (1, h, w, channels[i]) else ""
            raise ValueError(f"its map at 1/{reductions[i]} has shape {list(got)}{layout} on a "
                             f"{size[0]} x {size[1]} input, not B x C x H/r x W/r = "
                             f"{[1, channels[i], h, w]}")
    out_indices = None
    if chosen != tuple(range(len(reductions))):
        out_indices = tuple(int(info.out_indices[i]) for i in chosen)
    return FeatureLevels(tuple(channels[i] for i in chosen), tuple(reductions[i] for i in chosen),
                         out_indices)


def _build_for_probe(name: str, device: str) -> nn.Module:
    with torch.device(device):
        return timm.create_model(name, features_only=True, pretrained=False).eval()


def _run_probe(model: nn.Module, device: str) -> list[torch.Tensor]:
    with torch.device(device), torch.no_grad():
        return list(model(torch.zeros(1, 3, *PROBE_SIZE)))


@functools.cache
def probe_encoder(name: str) -> FeatureLevels | str:
    """The decoders' levels of timm model `name`, or why the decoders cannot use it.

    The model is built and run once at PROBE_SIZE on the meta device, which costs neither
    memory nor arithmetic whatever its size; only what fails there (an operation without a meta
    kernel) is redone on the CPU, where a failure is the model's own (e.g. a fixed input size:
    ViT, Swin).
    """
    # The probe must not move the global random state: networks built after it (and seeded
    # before it) get the same initial weights whether or not a probe ran first.
    with torch.random.fork_rng(devices=[]):
        return _probe(name)


def _probe(name: str) -> FeatureLevels | str:
    device = "meta"
    try:
        model = _build_for_probe(name, device)
    except Exception:  # settled on the CPU
        device = "cpu"
        try:
            model = _build_for_probe(name, device)
        except Exception as err:  # timm's reason, quoted
            return (f"timm cannot build it with features_only ({type(err).__name__}: "
                    f"{first_line(err)})")
    try:
        select_levels(model.feature_info.reduction())
    except ValueError as err:
        return str(err)
    try:
        try:
            outputs = _run_probe(model, device)
        except Exception:  # settled on the CPU (a meta failure proves nothing)
            if device == "cpu":
                raise
            device = "cpu"
            model = _build_for_probe(name, device)
            outputs = _run_probe(model, device)
    except Exception as err:  # the model's own failure, quoted
        return (f"it fails on a {PROBE_SIZE[0]} x {PROBE_SIZE[1]} input in features_only mode "
                f"({type(err).__name__}: {first_line(err)}); models with a fixed input size "
                "(ViT, Swin) are not supported")
    try:
        return _levels_of(model, outputs, PROBE_SIZE)
    except ValueError as err:
        return str(err)


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
