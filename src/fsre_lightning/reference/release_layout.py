"""What the files of a release fix about its networks (`infer_layout`).

The ResNet depth, CMA on/off and its scales, the segmentation decoder and the disparity scales
are read from the tensors' names and shapes; H and r from the CMA shapes, checked against the
caller's values or the reference's ``opt.json``. A file that does not fit is a
ReleaseFormatError naming the file and the key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsre_lightning.cityscapes import NUM_CLASSES
from fsre_lightning.config.checks import is_int
from fsre_lightning.errors import UserError
from fsre_lightning.models.decoder import DECODER_CHANNELS, NUM_SCALES
from fsre_lightning.models.network_config import SIZE_DIVISOR
from fsre_lightning.reference.keys import (
    CMA_FILE,
    DEPTH_FILE,
    ENCODER_EXTRAS,
    ENCODER_FILE,
    FIRST_HEAD,
    OPTIONS_FILE,
    POSE_ENCODER_FILE,
    POSE_FILE,
    RESNET_DEPTHS,
    SEG_FILE,
    resnet_name,
)

MAX_KEYS_SHOWN = 6


class ReleaseFormatError(UserError, ValueError):
    """A release folder or file does not hold what the reference layout expects."""


@dataclass(frozen=True)
class ReleaseLayout:
    """What the files of a release determine about its networks."""

    encoder: str
    segmentation: bool
    cma_scales: tuple[int, ...]
    disp_scales: tuple[int, ...]
    num_classes: int
    num_heads: int
    head_ratio: float
    pose_encoder: str | None

    def network_config(self, attention_scale: str = "reference") -> dict[str, Any]:
        """FSRENetwork keyword arguments (with Hydra's `_target_`) that rebuild the network."""
        return {
            "_target_": "fsre_lightning.models.FSRENetwork",
            "encoder": self.encoder,
            "pretrained": False,
            "weights_path": None,
            "num_classes": self.num_classes,
            "disp_scales": list(self.disp_scales),
            "cma_scales": list(self.cma_scales),
            "cma_targets": ["depth", "seg"],
            "num_heads": self.num_heads,
            "head_ratio": self.head_ratio,
            "attention_scale": attention_scale,
            "segmentation": self.segmentation,
        }

    def pose_config(self) -> dict[str, Any]:
        """PoseNetwork keyword arguments; a ResNet-18 when the release has no pose network."""
        return {
            "_target_": "fsre_lightning.models.PoseNetwork",
            "encoder": self.pose_encoder or "resnet18.tv_in1k",
            "pretrained": False,
            "weights_path": None,
        }


def shown(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = len(keys) - MAX_KEYS_SHOWN
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + (f", ... and {more} more" if more > 0 else "")


def resnet_depth(state: Mapping[str, Any], path: Path, in_channels: int) -> int:
    """ResNet depth (18, 34, 50, 101, 152) of the ``encoder.*`` keys of a release file."""
    first = "encoder.conv1.weight"
    weight = state.get(first)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        found = shown(k for k in state if k not in ENCODER_EXTRAS) or "no keys"
        raise ReleaseFormatError(
            f"{path}: no key {first!r}; expected the state dict of the reference's "
            f"ResnetEncoder (torchvision ResNet keys under 'encoder.'), found {found}")
    if weight.shape[1] != in_channels:
        raise ReleaseFormatError(
            f"{path}: {first} takes {weight.shape[1]} input channels, expected {in_channels} "
            f"({'one RGB frame' if in_channels == 3 else 'two RGB frames'})")
    blocks = []
    for stage in range(1, 5):
        pattern = re.compile(rf"encoder\.layer{stage}\.(\d+)\.conv1\.weight")
        ids = {int(m.group(1)) for k in state if (m := pattern.fullmatch(k))}
        blocks.append(max(ids) + 1 if ids else 0)
    kind = "bottleneck" if "encoder.layer1.0.conv3.weight" in state else "basic"
    depth = RESNET_DEPTHS.get((kind, tuple(blocks)))
    if depth is None:
        raise ReleaseFormatError(
            f"{path}: {kind} blocks per stage {blocks} are not a torchvision ResNet-18/34/50/"
            "101/152 (the encoders of the reference code)")
    return depth


def find_options(folder: Path) -> tuple[dict[str, Any], Path | None]:
    """The reference's training options: ``opt.json`` beside the weights, or one level up for
    Monodepth2's ``models/weights_<n>/`` folders (it writes ``models/opt.json``)."""
    candidates = [folder / OPTIONS_FILE]
    if folder.name.startswith("weights_"):
        candidates.append(folder.parent / OPTIONS_FILE)
    for path in candidates:
        if path.is_file():
            try:
                options = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ReleaseFormatError(f"{path} is not readable JSON: {err}") from err
            if not isinstance(options, dict):
                raise ReleaseFormatError(f"{path} must hold a JSON object of training options")
            return options, path
    return {}, None


def _decoder_heads(state: Mapping[str, Any], prefix: str, path: Path) -> dict[int, int]:
    """{scale: output channels} of the heads ``<prefix>decoder.<n>`` (n >= 10) of a file."""
    pattern = re.compile(rf"{re.escape(prefix)}decoder\.(\d+)\.conv\.weight")
    heads: dict[int, int] = {}
    for key, value in state.items():
        match = pattern.fullmatch(key)
        if not match or int(match.group(1)) < FIRST_HEAD or not isinstance(value, torch.Tensor):
            continue
        width = value.shape[1] if value.dim() == 4 else -1
        if width not in DECODER_CHANNELS:
            raise ReleaseFormatError(
                f"{path}: {key} has shape {tuple(value.shape)}; an output head reads one of "
                f"the decoder widths {list(DECODER_CHANNELS)}")
        scale = DECODER_CHANNELS.index(width)
        if scale in heads:
            raise ReleaseFormatError(f"{path}: two output heads read scale {scale} ({key})")
        heads[scale] = int(value.shape[0])
    if not heads:
        raise ReleaseFormatError(
            f"{path}: no output head {prefix}decoder.{FIRST_HEAD}.conv.weight; expected a "
            "Monodepth2 decoder (keys decoder.0 ... decoder.9 for the blocks, then the heads)")
    return heads


def _cma_scales(state: Mapping[str, Any], path: Path) -> tuple[int, ...]:
    """Decoder scales s of the ``att_d_to_s.<j>`` / ``att_s_to_d.<j>`` modules (s = j + 1)."""
    layers: dict[str, set[int]] = {"att_d_to_s": set(), "att_s_to_d": set()}
    for key in state:
        match = re.fullmatch(r"(att_d_to_s|att_s_to_d)\.(-?\d+)\..+", key)
        if match:
            layers[match.group(1)].add(int(match.group(2)))
    if layers["att_d_to_s"] != layers["att_s_to_d"]:
        odd = sorted(layers["att_d_to_s"] ^ layers["att_s_to_d"])
        raise ReleaseFormatError(
            f"{path}: CMA layers {odd} have only one of att_d_to_s / att_s_to_d; the reference "
            "CMA always holds both directions")
    bad = sorted(j for j in layers["att_d_to_s"] if not -1 <= j < NUM_SCALES - 1)
    if bad:
        raise ReleaseFormatError(f"{path}: CMA layer indices {bad} are outside -1..3 (the "
                                 "reference's cma_layers index, decoder scale s = index + 1)")
    return tuple(sorted((j + 1 for j in layers["att_d_to_s"]), reverse=True))


def _attention_shape(state: Mapping[str, Any], path: Path, scales: tuple[int, ...],
                     num_heads: int | None, head_ratio: float | None,
                     sources: tuple[str, str]) -> tuple[int, float]:
    """(H, r) of the CMA modules, read from their shapes and checked against the request."""
    found: list[tuple[int, int, int, str]] = []  # (scale, C, C', H) per CMA place
    for s in scales:
        c, j = DECODER_CHANNELS[s], s - 1
        q_key, w_key = f"att_d_to_s.{j}.query_conv.weight", f"att_d_to_s.{j}.W.0.weight"
        query, project = state.get(q_key), state.get(w_key)
        if not isinstance(query, torch.Tensor) or not isinstance(project, torch.Tensor):
            missing = q_key if not isinstance(query, torch.Tensor) else w_key
            raise ReleaseFormatError(f"{path}: missing key {missing} of the CMA at layer {j}")
        if query.dim() != 4 or project.dim() != 4 or query.shape[1] != c:
            raise ReleaseFormatError(
                f"{path}: {q_key} has shape {tuple(query.shape)}; the CMA at layer {j} (decoder "
                f"scale {s}) works on {c} channels")
        embed = int(project.shape[1])
        if embed < 1 or query.shape[0] % embed:
            raise ReleaseFormatError(
                f"{path}: {q_key} {tuple(query.shape)} and {w_key} {tuple(project.shape)} do not "
                "describe H embeddings of one width (query channels = H * C')")
        found.append((s, c, embed, int(query.shape[0]) // embed))
    heads = {h for *_, h in found}
    if len(heads) > 1:
        raise ReleaseFormatError(f"{path}: the CMA layers use different numbers of embeddings "
                                 f"{sorted(heads)}; one H for all is expected")
    inferred_h = found[0][3]
    # r from the widest place (the least truncation by int()), checked at every place.
    _, c0, e0, _ = max(found, key=lambda f: f[1])
    inferred_r = e0 / c0
    if any(int(inferred_r * c) != e for _, c, e, _ in found):
        raise ReleaseFormatError(f"{path}: the CMA embedding widths {[e for *_, e, _ in found]} "
                                 "do not follow one ratio r (C' = int(r * C))")
    want_h = inferred_h if num_heads is None else int(num_heads)
    want_r = inferred_r if head_ratio is None else float(head_ratio)
    for s, c, embed, h in found:
        if want_h != h or int(want_r * c) != embed:
            j = s - 1
            expected = (want_h * int(want_r * c), c, 1, 1)
            raise ReleaseFormatError(
                f"{path}: att_d_to_s.{j}.query_conv.weight has shape {(h * embed, c, 1, 1)} and "
                f"W.0.weight {(c, embed, 1, 1)}, i.e. H = {h} embeddings of C' = {embed} "
                f"(r = {embed / c:g}); num_heads={want_h} ({sources[0] or 'from the files'}) "
                f"and head_ratio={want_r:g} ({sources[1] or 'from the files'}) expect "
                f"query_conv {expected} and W.0 {(c, int(want_r * c), 1, 1)}. Pass "
                f"num_heads={h}, head_ratio={embed / c:g} (or leave them unset to read them "
                "from the files)")
    return want_h, want_r


def _requested(value: Any, options: Mapping[str, Any], key: str, options_path: Path | None
               ) -> tuple[Any, str]:
    """A requested H or r and where it came from: the caller, else opt.json, else nowhere."""
    if value is not None:
        return value, "given"
    if key in options and options_path is not None:
        return options[key], f"from {options_path}"
    return None, ""


def _check_options(options: Mapping[str, Any], options_path: Path | None, folder: Path,
                   combined: bool, cma: tuple[int, ...], disp_scales: tuple[int, ...]) -> None:
    """opt.json's CMA and scale flags must describe the files (the reference would not load
    them otherwise): a mismatch means the folder mixes files of two runs."""
    if options_path is None:
        return
    found = {
        "no_cma": not combined,
        "cma_layers": sorted(s - 1 for s in cma) if combined else None,
        "scales": sorted(disp_scales),
    }
    stated = {
        "no_cma": bool(options["no_cma"]) if "no_cma" in options else None,
        "cma_layers": (sorted(options["cma_layers"]) if combined and isinstance(
            options.get("cma_layers"), list) and not options.get("no_cma") else None),
        "scales": sorted(options["scales"]) if isinstance(options.get("scales"), list) else None,
    }
    for key, value in stated.items():
        if value is not None and found[key] is not None and value != found[key]:
            raise ReleaseFormatError(
                f"{options_path}: {key}={options[key]!r} but the weights in {folder} have "
                f"{key}={found[key]!r}; are opt.json and the .pth files from the same run?")


def infer_layout(folder: Path, files: Mapping[str, Mapping[str, Any]],
                 options: Mapping[str, Any], options_path: Path | None,
                 num_heads: int | None, head_ratio: float | None) -> ReleaseLayout:
    """Everything the files (and opt.json) fix about the networks of a release."""
    encoder_depth = resnet_depth(files[ENCODER_FILE], folder / ENCODER_FILE, 3)
    layers = options.get("num_layers")
    if layers is not None and layers != encoder_depth:
        raise ReleaseFormatError(f"{options_path}: num_layers={layers} but {folder / ENCODER_FILE}"
                                 f" holds a ResNet-{encoder_depth}")
    combined = CMA_FILE in files
    if combined:
        state, path = files[CMA_FILE], folder / CMA_FILE
        depth_heads = _decoder_heads(state, "depth_decoder.", path)
        seg_heads = _decoder_heads(state, "seg_decoder.", path)
        cma = _cma_scales(state, path)
    else:
        depth_heads = _decoder_heads(files[DEPTH_FILE], "", folder / DEPTH_FILE)
        seg_heads = (_decoder_heads(files[SEG_FILE], "", folder / SEG_FILE)
                     if SEG_FILE in files else {})
        cma = ()
    bad_depth = {s: n for s, n in depth_heads.items() if n != 1}
    if bad_depth:
        file = CMA_FILE if combined else DEPTH_FILE
        raise ReleaseFormatError(f"{folder / file}: the disparity heads must have one output, "
                                 f"found {bad_depth} (scale: outputs)")
    if seg_heads and set(seg_heads) != {0}:
        file = CMA_FILE if combined else SEG_FILE
        raise ReleaseFormatError(f"{folder / file}: the segmentation decoder must have one head "
                                 f"at full resolution, found heads at scales {sorted(seg_heads)}")
    _check_options(options, options_path, folder, combined, cma, tuple(sorted(depth_heads)))
    h, h_source = _requested(num_heads, options, "num_head", options_path)
    r, r_source = _requested(head_ratio, options, "head_ratio", options_path)
    if cma:
        h, r = _attention_shape(files[CMA_FILE], folder / CMA_FILE, cma, h, r,
                                (h_source, r_source))
    pose_encoder = None
    if POSE_ENCODER_FILE in files:
        pose_depth = resnet_depth(files[POSE_ENCODER_FILE], folder / POSE_ENCODER_FILE, 6)
        pose_encoder = resnet_name(pose_depth)
    return ReleaseLayout(
        encoder=resnet_name(encoder_depth),
        segmentation=bool(seg_heads),
        cma_scales=cma,
        disp_scales=tuple(sorted(depth_heads)),
        num_classes=seg_heads.get(0, NUM_CLASSES),
        num_heads=int(h) if h is not None else 4,
        head_ratio=float(r) if r is not None else 2.0,
        pose_encoder=pose_encoder,
    )


def files_present(folder: Path) -> list[str]:
    names = [ENCODER_FILE, CMA_FILE, DEPTH_FILE, SEG_FILE, POSE_ENCODER_FILE, POSE_FILE]
    present = [n for n in names if (folder / n).is_file()]
    if ENCODER_FILE not in present:
        listing = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        raise ReleaseFormatError(
            f"{folder} has no {ENCODER_FILE}: a release folder holds {ENCODER_FILE} and "
            f"{CMA_FILE} (FSRE-Depth) or {DEPTH_FILE} (FSRE-Depth without CMA, Monodepth2), "
            f"plus {POSE_ENCODER_FILE} and {POSE_FILE}; found {listing or 'nothing'}")
    if CMA_FILE in present and DEPTH_FILE in present:
        raise ReleaseFormatError(
            f"{folder} holds both {CMA_FILE} (FSRE-Depth with CMA) and {DEPTH_FILE} (without): "
            "keep the one of the model you mean")
    if CMA_FILE not in present and DEPTH_FILE not in present:
        raise ReleaseFormatError(
            f"{folder} has {ENCODER_FILE} but no depth decoder: expected {CMA_FILE} "
            f"(FSRE-Depth with CMA) or {DEPTH_FILE} (without CMA, Monodepth2)")
    if CMA_FILE in present and SEG_FILE in present:
        raise ReleaseFormatError(f"{folder}: {SEG_FILE} beside {CMA_FILE}; with CMA the "
                                 f"segmentation decoder is part of {CMA_FILE}")
    if (POSE_ENCODER_FILE in present) != (POSE_FILE in present):
        have, lack = ((POSE_ENCODER_FILE, POSE_FILE) if POSE_ENCODER_FILE in present
                      else (POSE_FILE, POSE_ENCODER_FILE))
        raise ReleaseFormatError(
            f"{folder} has {have} but no {lack}: the pose network is the pair of both "
            "(Monodepth2's 'shared' and 'posecnn' pose models are not supported)")
    return present


def training_resolution(folder: Path, encoder_state: Mapping[str, Any],
                        options: Mapping[str, Any], options_path: Path | None
                        ) -> tuple[int, int]:
    """(height, width) the release was trained at: encoder.pth's entries, else opt.json's."""
    values = []
    for key in ("height", "width"):
        value = encoder_state.get(key, options.get(key))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is None:
            raise ReleaseFormatError(
                f"{folder / ENCODER_FILE} has no '{key}' entry (the training resolution the "
                f"reference stores there) and there is no {OPTIONS_FILE} giving it")
        if not is_int(value) or value <= 0 or value % SIZE_DIVISOR:
            source = ENCODER_FILE if key in encoder_state else str(options_path)
            raise ReleaseFormatError(f"{folder / source}: {key}={value!r} is not a positive "
                                     f"multiple of {SIZE_DIVISOR}")
        values.append(value)
    return values[0], values[1]
