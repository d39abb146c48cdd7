"""Read and write the published FSRE-Depth and Monodepth2 weights in their own file layout.

A release is a folder of PyTorch state dicts, one per sub-network of the reference code
(hyBlue/FSRE-Depth, itself built on nianticlabs/monodepth2):

=================  ===========================================================================
file               keys (reference module -> ours)
=================  ===========================================================================
encoder.pth        ``encoder.<torchvision ResNet key>`` -> ``encoder.model.<key>`` (timm uses
                   torchvision's names); ``encoder.fc.*`` (the unused classifier) and the plain
                   entries ``height``, ``width`` (training size) and ``use_stereo``
                   (Monodepth2) are not weights
decoder.pth        CMA on (FSRE-Depth): ``depth_decoder.<decoder>``, ``seg_decoder.<decoder>``,
                   ``att_d_to_s.<j>.*`` -> ``cma_depth.<s>.*``, ``att_s_to_d.<j>.*`` ->
                   ``cma_seg.<s>.*`` with the reference's CMA layer j = s - 1
depth.pth          CMA off (FSRE-Depth without CMA, Monodepth2): ``<decoder>`` of the depth
seg.pth            decoder, and of the segmentation decoder when it was trained
pose_encoder.pth   ``encoder.<torchvision key>`` of the 6-channel pose ResNet, ``encoder.fc.*``
pose.pth           ``net.0..3`` -> ``decoder.0, 2, 4, 6`` (our ReLUs sit between); Monodepth2
                   predicts two frames (12 outputs), the first six are the pair's motion
=================  ===========================================================================

``<decoder>`` is Monodepth2's flat ``decoder.<n>`` list: for block s (= 4..0) ``n = 2 (4 - s)``
is the first ConvBlock (``.conv.conv.*`` -> ``upconv0.<s>.conv.1.*``), ``n + 1`` the second
(-> ``upconv1.<s>``); heads follow from ``n = 10`` in ascending scale order (``.conv.*`` ->
``heads.<s>.1.*``). A head's scale is read from its input width (16, 32, 64, 128, 256 are
distinct), so Monodepth2 folders trained with fewer scales load too.

CMA: the reference's ``MultiEmbedding`` names map ``query_conv/key_conv/value_conv`` ->
``query/key/value``, ``W.0/W.1`` -> ``project.0/project.1``, ``fuse.0.conv.conv`` ->
``fuse.0.conv.1``, ``fuse.1`` -> ``fuse.1``. Its attention divides by sqrt(H * C') (SPEC
section 3), so a release loads as ``attention_scale="reference"``. The two scalings differ by
sqrt(H) on the scores only, so ``attention_scale="paper"`` loads (and saves) exactly too: the
query convolution (weights and bias) is divided (multiplied) by sqrt(H).

H and r are not just a product in the files: ``W.0`` is a C' -> C convolution, so C' = r C and
H = (query channels) / C' are both fixed by the shapes. They are inferred; ``opt.json`` (the
reference's training options, beside the weights or in the parent ``models/`` folder of a
Monodepth2 ``weights_<n>`` folder) and the caller's values are checked against them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fsre_lightning.models.cma import ATTENTION_SCALES
from fsre_lightning.models.decoder import DECODER_CHANNELS, NUM_SCALES
from fsre_lightning.models.fsre import FSRENetwork
from fsre_lightning.models.pose import PoseNetwork

ENCODER_FILE = "encoder.pth"
CMA_FILE = "decoder.pth"
DEPTH_FILE = "depth.pth"
SEG_FILE = "seg.pth"
POSE_ENCODER_FILE = "pose_encoder.pth"
POSE_FILE = "pose.pth"
OPTIONS_FILE = "opt.json"

# Entries of encoder.pth that are not weights: the training size (and Monodepth2's stereo flag).
ENCODER_EXTRAS = ("height", "width", "use_stereo")
# torchvision's ImageNet classifier, part of the reference's encoder modules but never run.
CLASSIFIER_KEYS = ("encoder.fc.weight", "encoder.fc.bias")
CLASSIFIER_OUTPUTS = 1000
# The reference's segmentation decoder always has 19 outputs (Cityscapes train ids).
REFERENCE_NUM_CLASSES = 19
# Head outputs start after the ten decoder ConvBlocks in Monodepth2's flat list.
FIRST_HEAD = 2 * NUM_SCALES
POSE_OUTPUTS = 6
# (block type, blocks per stage) -> depth; the reference's ResnetEncoder offers these five.
RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
CMA_NAMES = (  # reference MultiEmbedding prefix -> ours
    ("query_conv.", "query."),
    ("key_conv.", "key."),
    ("value_conv.", "value."),
    ("W.0.", "project.0."),
    ("W.1.", "project.1."),
    ("fuse.0.conv.conv.", "fuse.0.conv.1."),
    ("fuse.1.", "fuse.1."),
)
# Keys that a release saved by a PyTorch older than 0.4.1 lacks; their value never matters
# in eval mode (BatchNorm with momentum), so their absence is not an error.
OPTIONAL_SUFFIX = ".num_batches_tracked"
MAX_KEYS_SHOWN = 6


class ReleaseFormatError(ValueError):
    """A release folder or file does not hold what the reference layout expects."""


class Entry(NamedTuple):
    """Where one of our tensors lives in a release: file, key and, for pose.pth's last layer,
    how many leading output rows are ours (Monodepth2 stores two frames' outputs)."""

    file: str
    key: str
    rows: int | None = None


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
    # decoder.pth (the reference's CMA module) rather than depth.pth / seg.pth
    combined: bool

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


@dataclass
class ReferenceRelease:
    """Networks loaded from a release folder, with what was found and what was left out."""

    depth: FSRENetwork
    pose: PoseNetwork | None
    height: int
    width: int
    layout: ReleaseLayout
    folder: Path
    options: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ key mapping
def _resnet_name(depth: int) -> str:
    # .tv_in1k: torchvision's ImageNet weights, what both reference codes started from.
    return f"resnet{depth}.tv_in1k"


def decoder_release_key(our_key: str, head_scales: Iterable[int]) -> str:
    """Monodepth2 decoder key (``decoder.<n>...``) of a MonodepthDecoder key."""
    parts = our_key.split(".")
    kind, scale = parts[0], int(parts[1])
    if kind in ("upconv0", "upconv1") and parts[2:4] == ["conv", "1"]:
        n = 2 * (NUM_SCALES - 1 - scale) + (kind == "upconv1")
        return f"decoder.{n}.conv.conv.{'.'.join(parts[4:])}"
    if kind == "heads" and parts[2] == "1":
        n = FIRST_HEAD + sorted(head_scales).index(scale)
        return f"decoder.{n}.conv.{'.'.join(parts[3:])}"
    raise KeyError(f"no reference name for decoder key {our_key!r}")


def cma_release_key(our_key: str) -> str:
    """MultiEmbedding key of a CrossTaskAttention key (without the module prefix)."""
    for theirs, ours in CMA_NAMES:
        if our_key.startswith(ours):
            return theirs + our_key[len(ours):]
    raise KeyError(f"no reference name for CMA key {our_key!r}")


def depth_network_entries(net: FSRENetwork) -> dict[str, Entry]:
    """Every key of `net`'s state dict -> its place in the release (see the module doc)."""
    combined = bool(net.cma_scales)
    depth_file, seg_file = (CMA_FILE, CMA_FILE) if combined else (DEPTH_FILE, SEG_FILE)
    depth_prefix, seg_prefix = ("depth_decoder.", "seg_decoder.") if combined else ("", "")
    out: dict[str, Entry] = {}
    for key in net.state_dict():
        module, _, rest = key.partition(".")
        if module == "encoder":
            out[key] = Entry(ENCODER_FILE, "encoder." + rest.removeprefix("model."))
        elif module == "depth_decoder":
            out[key] = Entry(depth_file,
                             depth_prefix + decoder_release_key(rest, net.disp_scales))
        elif module == "seg_decoder":
            out[key] = Entry(seg_file, seg_prefix + decoder_release_key(rest, (0,)))
        elif module in ("cma_depth", "cma_seg"):
            scale, _, inner = rest.partition(".")
            name = "att_d_to_s" if module == "cma_depth" else "att_s_to_d"
            out[key] = Entry(CMA_FILE, f"{name}.{int(scale) - 1}.{cma_release_key(inner)}")
        else:
            raise KeyError(f"no reference name for {key!r}")
    return out


def pose_network_entries(net: PoseNetwork) -> dict[str, Entry]:
    """Every key of the pose network's state dict -> its place in the release."""
    out: dict[str, Entry] = {}
    convs = [name for name, m in net.decoder.named_children() if isinstance(m, torch.nn.Conv2d)]
    for key in net.state_dict():
        module, _, rest = key.partition(".")
        if module == "encoder":
            out[key] = Entry(POSE_ENCODER_FILE, "encoder." + rest.removeprefix("model."))
        elif module == "decoder":
            index, _, param = rest.partition(".")
            last = convs.index(index) == len(convs) - 1
            out[key] = Entry(POSE_FILE, f"net.{convs.index(index)}.{param}",
                             POSE_OUTPUTS if last else None)
        else:
            raise KeyError(f"no reference name for {key!r}")
    return out


# ------------------------------------------------------------------------------ reading files
def _shown(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = len(keys) - MAX_KEYS_SHOWN
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + (f", ... and {more} more" if more > 0 else "")


def read_state_file(path: Path) -> dict[str, Any]:
    """A release file as a plain dict; unreadable or non-state-dict files are ReleaseFormatError.

    weights_only: a release holds tensors and numbers only, so no pickled code ever runs.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        # torch's weights-only refusal is a page of advice; its one informative line says
        # what the file holds besides tensors (or where a truncated pickle broke off).
        lines = [ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln]
        first = (lines[0].split(". ")[0] if lines
                 else text.splitlines()[0] if text else type(err).__name__)
        raise ReleaseFormatError(
            f"{path} cannot be read as a PyTorch state dict of tensors and numbers "
            f"({type(err).__name__}: {first}); is the file truncated (an interrupted download "
            "or unzip) or not a weights file?") from err
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ReleaseFormatError(f"{path} is not a state dict (a mapping of names to tensors), "
                                 f"got {type(state).__name__}")
    return dict(state)


def resnet_depth(state: Mapping[str, Any], path: Path, in_channels: int) -> int:
    """ResNet depth (18, 34, 50, 101, 152) of the ``encoder.*`` keys of a release file."""
    first = "encoder.conv1.weight"
    weight = state.get(first)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        found = _shown(k for k in state if k not in ENCODER_EXTRAS) or "no keys"
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
        pose_encoder = _resnet_name(pose_depth)
    return ReleaseLayout(
        encoder=_resnet_name(encoder_depth),
        segmentation=bool(seg_heads),
        cma_scales=cma,
        disp_scales=tuple(sorted(depth_heads)),
        num_classes=seg_heads.get(0, REFERENCE_NUM_CLASSES),
        num_heads=int(h) if h is not None else 4,
        head_ratio=float(r) if r is not None else 2.0,
        pose_encoder=pose_encoder,
        combined=combined,
    )


def _files_present(folder: Path) -> list[str]:
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


def _ignored_entries(layout: ReleaseLayout) -> dict[str, dict[str, str]]:
    """Per file, the keys that are read but deliberately not loaded, with the reason."""
    classifier = {k: "torchvision's ImageNet classifier, never run" for k in CLASSIFIER_KEYS}
    out = {ENCODER_FILE: {**classifier, "height": "training height",
                          "width": "training width", "use_stereo": "Monodepth2's stereo flag"}}
    if layout.pose_encoder is not None:
        out[POSE_ENCODER_FILE] = classifier
    return out


def collect_state(folder: Path, files: Mapping[str, Mapping[str, Any]],
                  entries: Mapping[str, Entry], target: Mapping[str, torch.Tensor],
                  ignored: Mapping[str, Mapping[str, str]], notes: list[str]
                  ) -> dict[str, torch.Tensor]:
    """Our state dict from the release files; every file key must be used or in `ignored`.

    Missing, unexpected and mis-shaped keys are reported per file, naming the keys.
    """
    state: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {}
    problems: dict[str, list[str]] = {}
    for ours, entry in entries.items():
        used.setdefault(entry.file, set()).add(entry.key)
        file_state = files[entry.file]
        if entry.key not in file_state:
            if not entry.key.endswith(OPTIONAL_SUFFIX):
                problems.setdefault(entry.file, []).append(f"missing {entry.key}")
            continue
        value = file_state[entry.key]
        expected = tuple(target[ours].shape)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if entry.rows is not None and shape is not None and shape[0] % entry.rows == 0 \
                and shape[0] > 0 and shape[1:] == expected[1:]:
            if shape[0] > entry.rows:
                notes.append(f"{entry.file}: {entry.key}[{entry.rows}:{shape[0]}] (outputs "
                             "for a second frame pair, which Monodepth2 predicts and never uses)")
            value, shape = value[: entry.rows], expected
        if shape != expected:
            problems.setdefault(entry.file, []).append(
                f"{entry.key} has shape {shape if shape is not None else type(value).__name__}, "
                f"expected {expected}")
            continue
        state[ours] = value
    for file, file_state in files.items():
        skip = ignored.get(file, {})
        extra = [k for k in file_state if k not in used.get(file, set()) and k not in skip]
        if extra:
            problems.setdefault(file, []).append(f"unexpected {_shown(extra)}")
        notes.extend(f"{file}: {k} ({skip[k]})" for k in file_state if k in skip)
    if problems:
        lines = [f"{folder / file}: " + "; ".join(items[:MAX_KEYS_SHOWN])
                 + (f"; ... and {len(items) - MAX_KEYS_SHOWN} more"
                    if len(items) > MAX_KEYS_SHOWN else "")
                 for file, items in problems.items()]
        raise ReleaseFormatError(
            "the release does not match the reference layout the other files imply:\n  "
            + "\n  ".join(lines))
    return state


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    full = module.state_dict()
    # Old releases lack num_batches_tracked: keep ours (0) for those; nothing else is optional.
    full.update(state)
    module.load_state_dict(full, strict=True)


def _query_factor(scale_from: str, scale_to: str, num_heads: int) -> float:
    """Factor on the query convolution that keeps the attention scores when moving from one
    attention scaling to the other (paper: / sqrt(C'), reference: / sqrt(H C'))."""
    if scale_from == scale_to:
        return 1.0
    return math.sqrt(num_heads) if scale_to == "reference" else 1.0 / math.sqrt(num_heads)


def rescale_queries(state: dict[str, torch.Tensor], prefix: str, factor: float) -> None:
    """Multiply the CMA query convolutions (weight and bias) of a state dict by `factor`."""
    if factor == 1.0:
        return
    pattern = re.compile(rf"{re.escape(prefix)}cma_(depth|seg)\.\d+\.query\.(weight|bias)")
    for key in list(state):
        if pattern.fullmatch(key):
            state[key] = state[key] * factor


def _resolution(folder: Path, encoder_state: Mapping[str, Any], options: Mapping[str, Any],
                options_path: Path | None) -> tuple[int, int]:
    values = []
    for key in ("height", "width"):
        value = encoder_state.get(key, options.get(key))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is None:
            raise ReleaseFormatError(
                f"{folder / ENCODER_FILE} has no '{key}' entry (the training resolution the "
                f"reference stores there) and there is no {OPTIONS_FILE} giving it")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 32:
            source = ENCODER_FILE if key in encoder_state else str(options_path)
            raise ReleaseFormatError(f"{folder / source}: {key}={value!r} is not a positive "
                                     "multiple of 32")
        values.append(value)
    return values[0], values[1]


def load_reference_release(folder: str | os.PathLike[str], num_heads: int | None = None,
                           head_ratio: float | None = None,
                           attention_scale: str = "reference") -> ReferenceRelease:
    """Load a FSRE-Depth or Monodepth2 release folder into FSRENetwork (+ PoseNetwork).

    The ResNet depth, CMA on/off and its scales, segmentation decoder and disparity scales come
    from the files; H and r (`num_heads`, `head_ratio`) from the CMA shapes, checked against
    the given values or, when those are None, against ``opt.json``. Every tensor is loaded or
    listed in `ReferenceRelease.ignored`; anything else is a ReleaseFormatError naming the file
    and key. `attention_scale="paper"` folds the reference's extra 1 / sqrt(H) into the query
    convolution, so both choices reproduce the release's outputs. Networks come back in eval
    mode (BatchNorm uses the release's running statistics).
    """
    if attention_scale not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, "
                         f"got {attention_scale!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"release folder {str(folder)!r} does not exist: unzip the "
                                "published model and pass the folder holding encoder.pth")
    present = _files_present(folder)
    files = {name: read_state_file(folder / name) for name in present}
    options, options_path = find_options(folder)
    layout = infer_layout(folder, files, options, options_path, num_heads, head_ratio)
    height, width = _resolution(folder, files[ENCODER_FILE], options, options_path)

    config = layout.network_config(attention_scale)
    depth = FSRENetwork(**{k: v for k, v in config.items() if k != "_target_"})
    entries = depth_network_entries(depth)
    pose = None
    if layout.pose_encoder is not None:
        pose = PoseNetwork(encoder=layout.pose_encoder, pretrained=False)
        entries.update({f"pose.{k}": v for k, v in pose_network_entries(pose).items()})
    target = {**depth.state_dict(), **({f"pose.{k}": v for k, v in pose.state_dict().items()}
                                        if pose is not None else {})}
    notes: list[str] = []
    state = collect_state(folder, files, entries, target, _ignored_entries(layout), notes)
    depth_state = {k: v for k, v in state.items() if not k.startswith("pose.")}
    rescale_queries(depth_state, "", _query_factor("reference", attention_scale,
                                                   layout.num_heads))
    _load_into(depth, depth_state)
    if pose is not None:
        _load_into(pose, {k[len("pose."):]: v for k, v in state.items() if k.startswith("pose.")})
        pose.eval()
    return ReferenceRelease(depth=depth.eval(), pose=pose, height=height, width=width,
                            layout=layout, folder=folder, options=options, ignored=notes)


# ------------------------------------------------------------------------------ writing files
def _attention_scale_of(net: FSRENetwork) -> str:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    return modules[0].scale if modules else "reference"


def _num_heads_of(net: FSRENetwork) -> int:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    return modules[0].num_heads if modules else 4


def _head_ratio_of(net: FSRENetwork) -> float:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    if not modules:
        return 2.0
    return max(m.embed_channels / m.channels for m in modules)


def _check_writable(net: FSRENetwork) -> None:
    if net.cma_scales and set(net.cma_targets) != {"depth", "seg"}:
        raise ValueError(f"cma_targets={list(net.cma_targets)}: the reference CMA module always "
                         "refines both decoders, it cannot hold a one-directional CMA")
    if net.segmentation and net.num_classes != REFERENCE_NUM_CLASSES:
        raise ValueError(f"num_classes={net.num_classes}: the reference segmentation decoder "
                         f"has {REFERENCE_NUM_CLASSES} outputs")


def _classifier(channels: int) -> dict[str, torch.Tensor]:
    # The reference's loaders are strict and its encoder modules carry torchvision's classifier,
    # so the keys must exist; zeros, since the classifier is never run.
    return {"encoder.fc.weight": torch.zeros(CLASSIFIER_OUTPUTS, channels),
            "encoder.fc.bias": torch.zeros(CLASSIFIER_OUTPUTS)}


def release_state_dicts(depth: FSRENetwork, pose: PoseNetwork | None, height: int, width: int
                        ) -> dict[str, dict[str, Any]]:
    """The release files (name -> state dict) that hold `depth` and `pose`."""
    _check_writable(depth)
    for key, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 32:
            raise ValueError(f"{key}={value!r}: the training resolution is a positive multiple "
                             "of 32")
    files: dict[str, dict[str, Any]] = {}
    ours = {k: v.detach().cpu().clone() for k, v in depth.state_dict().items()}
    rescale_queries(ours, "", _query_factor(_attention_scale_of(depth), "reference",
                                            _num_heads_of(depth)))
    for key, entry in depth_network_entries(depth).items():
        files.setdefault(entry.file, {})[entry.key] = ours[key]
    encoder = files[ENCODER_FILE]
    try:
        resnet_depth(encoder, Path(ENCODER_FILE), 3)
    except ReleaseFormatError as err:
        raise ValueError(f"encoder={depth.encoder.name!r}: the reference layout holds "
                         f"torchvision ResNet encoders only ({err})") from err
    encoder.update(_classifier(depth.encoder.channels[-1]))
    encoder.update({"height": int(height), "width": int(width)})
    if pose is not None:
        pose_state = {k: v.detach().cpu().clone() for k, v in pose.state_dict().items()}
        for key, entry in pose_network_entries(pose).items():
            files.setdefault(entry.file, {})[entry.key] = pose_state[key]
        resnet_depth(files[POSE_ENCODER_FILE], Path(POSE_ENCODER_FILE), 6)
        files[POSE_ENCODER_FILE].update(_classifier(pose.encoder.channels[-1]))
    return files


def reference_options(depth: FSRENetwork, height: int, width: int) -> dict[str, Any]:
    """The reference's training options that describe `depth` (written as opt.json): the
    flags its evaluate_depth.py needs (num_layers, no_cma, cma_layers, num_head, head_ratio)."""
    match = re.fullmatch(r"resnet(\d+)", depth.encoder.name.split(".")[0])
    return {
        "height": height,
        "width": width,
        "num_layers": int(match.group(1)) if match else None,
        "scales": list(depth.disp_scales),
        "no_cma": not depth.cma_scales,
        "cma_layers": [s - 1 for s in depth.cma_scales],
        "num_head": _num_heads_of(depth),
        "head_ratio": _head_ratio_of(depth),
    }


def save_reference_release(depth: FSRENetwork, pose: PoseNetwork | None,
                           folder: str | os.PathLike[str], height: int, width: int
                           ) -> list[Path]:
    """Write `depth` (and `pose`) as a release folder the reference code loads strictly.

    CMA on: encoder.pth + decoder.pth; off: encoder.pth + depth.pth (+ seg.pth); with a pose
    network also pose_encoder.pth + pose.pth (FSRE-Depth's six-output pose decoder). A network
    trained with `attention_scale="paper"` is written with sqrt(H) folded into its query
    convolutions, so the reference's scaling gives the same outputs. opt.json records the
    architecture flags. Score the folder with the reference's own script, e.g.
    ``python evaluate_depth.py --load_weights_folder <folder> --eval_mono --num_layers 18``
    (plus ``--no_cma`` without CMA). Returns the written files.
    """
    folder = Path(folder).expanduser()
    files = release_state_dicts(depth, pose, height, width)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, state in files.items():
        path = folder / name
        tmp = path.with_name(f".{name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # never a half-written file under the final name
        written.append(path)
    options = folder / OPTIONS_FILE
    options.write_text(json.dumps(reference_options(depth, height, width), indent=2) + "\n")
    written.append(options)
    return written
