"""timm feature encoders with Monodepth2's input normalisation and ImageNet weights as timm finds
them.

`build_encoder` wraps `timm.create_model(name, features_only=True)` and keeps the maps the
decoders read (docs/design.md 3.1), chosen from the model's `feature_info`: the deepest level at
each reduction 2, 4, 8, 16, 32, where 4..32 are required and 2 is optional. A ResNet gives all
five (stem after the first ReLU, then layer1..layer4), as do EfficientNet, RegNet and MobileNet;
ConvNeXt and most hierarchical transformers start at 1/4 and give four. `check_encoder` finds
this out before anything is built for real, by building the model and running it once on the
meta device (no memory, no arithmetic), so an unusable encoder is a one-line config error.

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
import functools
import logging
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg
from torch import nn

from fsre_lightning.config.checks import check_choice, is_int, require
from fsre_lightning.errors import DataError, UserError, first_line

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
# true: ImageNet weights (downloaded when needed) or an error; false: random init; auto: weights
# when a local copy exists, else random init with a warning.
PRETRAINED = (True, False, "auto")


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
    out_indices: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a timm `features_only` model with ImageNet weights from the places the module
    docstring lists (`download=False`: local files only).

    `in_chans` must be 3 when pretrained (multi-frame inputs are adapted by `build_encoder`);
    `out_indices` (None: timm's default) picks the feature levels returned.
    """
    selection = {} if out_indices is None else {"out_indices": out_indices}
    if not pretrained:
        if weights_path is not None:
            _logger.warning("weights_path=%s is ignored because pretrained=False", weights_path)
        return reset_norm_layers(_create(name, pretrained=False, in_chans=in_chans, **selection))
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
            return _create(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                           **selection)
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


def stack_frame_weights(rgb_state: Mapping[str, torch.Tensor],
                        model_state: Mapping[str, torch.Tensor], num_input_images: int
                        ) -> dict[str, torch.Tensor]:
    """`rgb_state` (weights for 3-channel input) for a model taking `num_input_images` stacked
    frames: every weight whose input-channel dimension is 3 there and 3 N in `model_state` (the
    first convolution, whatever the model calls it) goes through `duplicate_first_conv`."""
    out = dict(rgb_state)
    widened = [k for k, w in rgb_state.items() if k in model_state
               and tuple(w.shape) != tuple(model_state[k].shape)]
    for key in widened:
        w, want = rgb_state[key], tuple(model_state[key].shape)
        if w.dim() < 2 or w.shape[1] != 3 or want != (w.shape[0], 3 * num_input_images,
                                                       *w.shape[2:]):
            raise ValueError(f"cannot adapt '{key}' {list(w.shape)} to {num_input_images} "
                             f"stacked frames {list(want)}")
        out[key] = duplicate_first_conv(w, num_input_images)
    if not widened:
        raise ValueError("found no first convolution to adapt to multi-frame input")
    return out


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
    check_encoder("encoder", name)
    if num_input_images < 1:
        raise ValueError(f"num_input_images must be >= 1, got {num_input_images}")
    levels = probe_encoder(name)
    assert isinstance(levels, FeatureLevels)  # check_encoder said so
    select = levels.out_indices
    if num_input_images == 1:
        return FeatureEncoder(create_feature_model(
            name, pretrained, weights_path, download=download, out_indices=select), name)
    model = create_feature_model(name, pretrained=False, in_chans=3 * num_input_images,
                                 out_indices=select)
    encoder = FeatureEncoder(model, name, num_input_images)
    if pretrained:
        rgb = create_feature_model(name, True, weights_path, download=download,
                                   out_indices=select)
        model.load_state_dict(stack_frame_weights(rgb.state_dict(), model.state_dict(),
                                                  num_input_images))
    return encoder
