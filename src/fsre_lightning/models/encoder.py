"""timm feature encoders with Monodepth2's input normalisation and ImageNet weights as timm finds
them.

`build_encoder` wraps `timm.create_model(name, features_only=True)` and checks that the model
yields five maps at strides 2, 4, 8, 16, 32 (docs/design.md 3.1: stem after the first ReLU, then
layer1..layer4 for a ResNet).

`pretrained=True` takes the weights from, in this order:

1. `weights_path`: a local checkpoint of the *classification* model (timm or torchvision key
   names, `.pth`/`.bin`/`.safetensors`), handed to timm as
   `pretrained_cfg_overlay=dict(file=...)`;
2. the local Hugging Face hub cache (`HF_HUB_CACHE` / `HF_HOME`, default
   `~/.cache/huggingface/hub`) for the model's `hf_hub_id`, probed with `HF_HUB_OFFLINE=1`;
3. the torch hub cache (`$TORCH_HOME/hub/checkpoints`) for the model's legacy URL;
4. a download from the Hugging Face hub into its standard cache (as timm does), unless
   `HF_HUB_OFFLINE` is set or there is no network.

If none gives the file, `PretrainedWeightsNotFound` names it and says how to provide it.
`pretrained="auto"` (the demo's setting) never downloads: a local copy or random init.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from fsre_lightning.errors import DataError, UserError, first_line
from fsre_lightning.rules import check_choice, is_int, require

_logger = logging.getLogger(__name__)

# Monodepth2 / FSRE normalise with one mean and std for every channel (design 3.1).
INPUT_MEAN = 0.45
INPUT_STD = 0.225
EXPECTED_REDUCTIONS = (2, 4, 8, 16, 32)
# Five stride-2 stages: an input size must be a multiple of 32 for the decoder's skips to line up.
SIZE_DIVISOR = EXPECTED_REDUCTIONS[-1]
# true: ImageNet weights (downloaded when needed) or an error; false: random init; auto: weights
# when a local copy exists, else random init with a warning.
PRETRAINED = (True, False, "auto")


def check_image_size(key: str, value: Any) -> None:
    """A network input height or width: a positive multiple of 32."""
    require(is_int(value) and value > 0 and value % SIZE_DIVISOR == 0, key, value,
            f"the image size must be a positive multiple of {SIZE_DIVISOR} (the encoder "
            f"downsamples {SIZE_DIVISOR}x)")


def check_encoder(key: str, value: Any) -> None:
    """A timm architecture name (with or without a weight tag): known before anything is
    built, so a typo stops the run before data preparation, not inside timm."""
    require(isinstance(value, str) and ":" not in value and timm.is_model(value), key, value,
            "a timm architecture name such as 'resnet18.tv_in1k' or 'resnet50' "
            "(timm.list_models() lists them)")


def check_pretrained(key: str, value: Any) -> None:
    check_choice(key, value, PRETRAINED)


class PretrainedWeightsNotFound(UserError, RuntimeError):  # noqa: N818 - name given by the API
    """Pretrained weights were asked for but neither a local copy nor a download gives them."""


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 for the duration of a cache probe, then restore the environment."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return "~/.cache/huggingface/hub"


def _find_cached_weights(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """Look for the model's weights in the local HF hub and torch hub caches, offline.

    Returns the file (or None) and a human-readable list of the places that were probed.
    """
    probed: list[str] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo_id, _, revision = str(hub_id).partition("@")
        filename = pretrained_cfg.get("hf_hub_filename")
        filenames = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            with _hf_offline():
                for name in filenames:
                    probed.append(f"HF hub cache {_hf_cache_dir()} : {repo_id}/{name}")
                    found = try_to_load_from_cache(repo_id, name, revision=revision or None)
                    if isinstance(found, str) and os.path.isfile(found):
                        return Path(found), probed
    url = pretrained_cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        probed.append(f"torch hub cache {candidate}")
        if candidate.is_file():
            return candidate, probed
    return None, probed


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download_weights(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, str]:
    """Download the model's weights from the Hugging Face hub into its standard cache.

    Returns the file, or None and why not (offline, no network, no such file on the hub).
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None, "the model has no Hugging Face hub id to download from"
    if _hub_offline():
        return None, "HF_HUB_OFFLINE is set, so nothing was downloaded"
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = str(hub_id).partition("@")
    filename = pretrained_cfg.get("hf_hub_filename")
    failures = []
    for name in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None)), ""
        except Exception as err:  # no network, proxy, 404, ...: each is reported by name
            failures.append(f"{repo_id}/{name}: {type(err).__name__}: {first_line(err)}")
    return None, "the download failed (" + "; ".join(failures) + ")"


def _not_found(name: str, hub_id: str | None, detail: str) -> PretrainedWeightsNotFound:
    hint = f" (Hugging Face repo '{hub_id}')" if hub_id else ""
    return PretrainedWeightsNotFound(
        f"pretrained=True but the ImageNet weights of encoder '{name}'{hint} are not available: "
        f"{detail}. On a machine with network access they are downloaded into the Hugging Face "
        f"cache on first use; offline, provide them with weights_path=<local checkpoint of the "
        f"timm/torchvision classification model>, or copy that cache ({_hf_cache_dir()}, e.g. "
        f"after `hf download {hub_id or '<repo>'}` elsewhere), or set pretrained=false to train "
        f"from scratch"
    )


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
) -> nn.Module:
    """Build a timm `features_only` model with ImageNet weights from the places the module
    docstring lists (`download=False`: local files only).

    `in_chans` must be 3 when pretrained (multi-frame inputs are adapted by `build_encoder`).
    """
    if not pretrained:
        if weights_path is not None:
            _logger.warning("weights_path=%s is ignored because pretrained=False", weights_path)
        return reset_norm_layers(_create(name, pretrained=False, in_chans=in_chans))
    if in_chans != 3:
        raise ValueError(f"in_chans={in_chans}: pretrained weights are loaded for 3 channels")
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise _not_found(name, None, f"weights_path={str(path)!r} does not exist")
    else:
        known = get_pretrained_cfg(name)
        cfg = known.to_dict() if known is not None else {}
        found, probed = _find_cached_weights(cfg)
        detail = "no local copy (looked in " + ("; ".join(probed) or "no known place") + ")"
        if found is None and download:
            found, why = _download_weights(cfg)
            detail = f"{detail} and {why}"
        if found is None:
            raise _not_found(name, cfg.get("hf_hub_id"), detail)
        path = found
    _logger.info("Loading ImageNet weights for %s from %s", name, path)
    with _hf_offline():
        try:
            return _create(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError) as err:
            # torch's own message ("retry with weights_only=False") names neither the file nor
            # the model whose weights it should hold.
            raise DataError(f"{path} cannot be loaded as ImageNet weights of encoder '{name}' "
                            f"({type(err).__name__}: {first_line(err)}): give the classification "
                            "model's checkpoint of this architecture (.pth, .bin or "
                            ".safetensors), or pretrained=false") from err


class FeatureEncoder(nn.Module):
    """Five-level feature pyramid of a timm model on normalised input.

    `forward(x)` takes B x (3 * num_input_images) x H x W images in [0, 1] and returns the five
    maps at strides 2..32; `channels` lists their widths.
    """

    def __init__(self, model: nn.Module, name: str, num_input_images: int = 1) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"encoder={name!r} offers no feature_info (timm features_only)")
        reductions = tuple(int(r) for r in info.reduction())
        if reductions != EXPECTED_REDUCTIONS:
            raise ValueError(
                f"encoder={name!r} gives {len(reductions)} feature levels with reductions "
                f"{list(reductions)}; FSRE needs five levels with reductions "
                f"{list(EXPECTED_REDUCTIONS)} (e.g. a timm ResNet)"
            )
        self.model = model
        self.name = name
        self.num_input_images = num_input_images
        self.channels: tuple[int, ...] = tuple(int(c) for c in info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        expected = 3 * self.num_input_images
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(f"image must be B x {expected} x H x W, got shape {tuple(x.shape)}")
        return list(self.model((x - INPUT_MEAN) / INPUT_STD))


def _first_conv_key(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv", "conv1")
    if isinstance(first, (list, tuple)):
        first = first[0]
    key = f"{first}.weight"
    if key not in state_dict:
        raise ValueError(f"cannot find the first convolution '{key}' to adapt to multi-frame input")
    return key


def duplicate_first_conv(weight: torch.Tensor, num_input_images: int) -> torch.Tensor:
    """Monodepth2's multi-frame stem: repeat RGB filters per frame and divide by the count.

    The response to N identical frames then equals the pretrained response to one frame.
    """
    return torch.cat([weight] * num_input_images, dim=1) / num_input_images


def build_encoder(
    name: str = "resnet18",
    pretrained: bool | str = False,
    weights_path: str | os.PathLike[str] | None = None,
    num_input_images: int = 1,
    download: bool = True,
) -> FeatureEncoder:
    """Feature encoder for FSRE (one image) or the pose network (`num_input_images` frames).

    For several frames the first convolution takes 3 * N channels; pretrained RGB filters are
    duplicated N times and divided by N (done here, independent of timm's own adaptation).
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
    if num_input_images < 1:
        raise ValueError(f"num_input_images must be >= 1, got {num_input_images}")
    if num_input_images == 1:
        return FeatureEncoder(
            create_feature_model(name, pretrained, weights_path, download=download), name)
    model = create_feature_model(name, pretrained=False, in_chans=3 * num_input_images)
    encoder = FeatureEncoder(model, name, num_input_images)
    if pretrained:
        rgb = create_feature_model(name, True, weights_path, download=download)
        state = rgb.state_dict()
        key = _first_conv_key(model, state)
        state[key] = duplicate_first_conv(state[key], num_input_images)
        model.load_state_dict(state)
    return encoder
