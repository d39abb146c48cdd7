"""What the networks accept, importable without torch: `NetworkConfig` (FSRENetwork's
`model.network`) and `PoseNetworkConfig` (`model.pose_network`) with their rules, and the
encoder check behind them.

`check_encoder` asks timm whether a model gives the maps the decoders read (docs/design.md
3.1) by building and running it once on the meta device (`probe_encoder`): that needs torch
and timm, so `config.checks.deferring_probes()` (the checks before a command's work starts:
--cfg, usage errors, a sweep's members) checks the name's form only and the command checks
the rest when its work starts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsre_lightning.config.checks as checks
from fsre_lightning.cityscapes import NUM_CLASSES
from fsre_lightning.config.checks import (
    check_choice,
    check_path,
    is_int,
    is_number,
    probes_deferred,
    require,
)
from fsre_lightning.errors import first_line

# Reductions of the encoder maps the decoders read (docs/design.md 3.1): 1/32 feeds decoder
# block s = 4, and 1/16, 1/8, 1/4, 1/2 are the skips of blocks s = 4, 3, 2, 1. The 1/2 map is
# optional: without it block 1 has no skip, as block 0 never has.
DECODER_REDUCTIONS = (2, 4, 8, 16, 32)


REQUIRED_REDUCTIONS = (4, 8, 16, 32)


# The deepest map is at 1/32: an input size must be a multiple of 32 for the skips to line up.
SIZE_DIVISOR = DECODER_REDUCTIONS[-1]


# The input size of the encoder check (on the meta device, so free): the paper's KITTI size.
PROBE_SIZE = (192, 640)


DECODER_CHANNELS = (16, 32, 64, 128, 256)


NUM_SCALES = len(DECODER_CHANNELS)


def check_scales(key: str, value: Any, allow_empty: bool = True) -> None:
    """Decoder scales (s = 0..4, block s at H / 2^s): unique integers, in any order."""
    scales = list(value) if isinstance(value, list | tuple) else None
    require(scales is not None, key, value, "a list of decoder scales, e.g. [0]")
    require(allow_empty or bool(scales), key, value, "give at least one scale")
    require(all(is_int(s) and 0 <= s < NUM_SCALES for s in scales), key, value,
            f"decoder scales are integers in 0..{NUM_SCALES - 1} (s = 0 is full resolution; "
            "the paper's layer l is 4 - s)")
    require(len(set(scales)) == len(scales), key, value, "scales must be unique")


ATTENTION_SCALES = ("paper", "reference")


# true: ImageNet weights (downloaded when needed) or an error; false: random init; auto: weights
# when a local copy exists, else random init with a warning.
PRETRAINED = (True, False, "auto")


def check_pretrained(key: str, value: Any) -> None:
    check_choice(key, value, PRETRAINED)


def check_image_size(key: str, value: Any) -> None:
    """A network input height or width: a positive multiple of 32."""
    require(is_int(value) and value > 0 and value % SIZE_DIVISOR == 0, key, value,
            f"the image size must be a positive multiple of {SIZE_DIVISOR} (the encoder "
            f"downsamples {SIZE_DIVISOR}x)")


def check_encoder(key: str, value: Any) -> None:
    """A timm architecture name (with or without a weight tag) whose `features_only` maps the
    decoders can read (`probe_encoder`): checked before anything is built for real, so a typo
    or an unusable model stops the run before data preparation, not inside timm."""
    require(isinstance(value, str) and bool(value) and ":" not in value, key, value,
            "a timm architecture name such as 'resnet18.tv_in1k', 'resnet50' or "
            "'convnext_tiny' (timm.list_models() lists them)")
    if probes_deferred():
        return
    import timm

    require(timm.is_model(value), key, value,
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


def _levels_of(model: Any, outputs: Sequence[Any], size: tuple[int, int]) -> FeatureLevels:
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


def _build_for_probe(name: str, device: str) -> Any:
    import timm
    import torch

    with torch.device(device):
        return timm.create_model(name, features_only=True, pretrained=False).eval()


def _run_probe(model: Any, device: str) -> list[Any]:
    import torch

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
    import torch

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


CMA_TARGETS = ("depth", "seg")


@dataclass(kw_only=True)
class NetworkConfig:
    """`model.network`: FSRENetwork's arguments and their rules (it builds this itself)."""

    _target_: str = "fsre_lightning.models.FSRENetwork"
    encoder: str = "resnet18"
    pretrained: Any = False
    num_classes: int = NUM_CLASSES
    disp_scales: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    cma_scales: list[int] = field(default_factory=lambda: [4, 3, 2])
    num_heads: int = 4
    head_ratio: float = 2.0
    cma_targets: list[str] = field(default_factory=lambda: ["depth", "seg"])
    attention_scale: str = "paper"
    segmentation: bool = True
    weights_path: str | None = None

    def __post_init__(self) -> None:
        check_encoder("encoder", self.encoder)
        check_pretrained("pretrained", self.pretrained)
        checks.check_path("weights_path", self.weights_path, nullable=True)
        checks.check_int("num_classes", self.num_classes, lo=1)
        check_scales("disp_scales", self.disp_scales, allow_empty=False)
        check_scales("cma_scales", self.cma_scales)
        checks.check_int("num_heads", self.num_heads, lo=1,
                        what="H, the number of embeddings, must be an integer >= 1")
        checks.check_number("head_ratio", self.head_ratio, lo=0, strict=True)
        targets = list(self.cma_targets) if isinstance(self.cma_targets, list | tuple) else None
        checks.require(targets is not None and bool(targets)
                      and set(targets) <= set(CMA_TARGETS) and len(set(targets)) == len(targets),
                      "cma_targets", self.cma_targets,
                      f"a non-empty subset of {list(CMA_TARGETS)}")
        checks.check_choice("attention_scale", self.attention_scale, ATTENTION_SCALES)
        checks.require(self.segmentation or not self.cma_scales, "cma_scales", self.cma_scales,
                      "CMA needs the segmentation decoder: use [] with segmentation=false")


@dataclass(kw_only=True)
class PoseNetworkConfig:
    """`model.pose_network`: PoseNetwork's arguments and their rules."""

    _target_: str = "fsre_lightning.models.PoseNetwork"
    encoder: str = "resnet18"
    pretrained: Any = False
    weights_path: str | None = None
    init_translation: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def __post_init__(self) -> None:
        check_encoder("encoder", self.encoder)
        check_pretrained("pretrained", self.pretrained)
        check_path("weights_path", self.weights_path, nullable=True)
        t = self.init_translation
        require(isinstance(t, list | tuple) and len(t) == 3 and all(is_number(v) for v in t),
                "init_translation", t, "three numbers (x, y, z); forward motion is (0, 0, -t)")
