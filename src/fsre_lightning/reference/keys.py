"""Where each of our tensors lives in a published FSRE-Depth / Monodepth2 release folder.

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
``fuse.0.conv.1``, ``fuse.1`` -> ``fuse.1``. Its attention divides by sqrt(H * C') (docs/design.md
section 3.11), so a release loads as ``attention_scale="reference"``. The two scalings differ by
sqrt(H) on the scores only, so ``attention_scale="paper"`` loads (and saves) exactly too: the
query convolution (weights and bias) is divided (multiplied) by sqrt(H).

H and r are not just a product in the files: ``W.0`` is a C' -> C convolution, so C' = r C and
H = (query channels) / C' are both fixed by the shapes. They are inferred; ``opt.json`` (the
reference's training options, beside the weights or in the parent ``models/`` folder of a
Monodepth2 ``weights_<n>`` folder) and the caller's values are checked against them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import NamedTuple

import torch

from fsre_lightning.models.decoder import NUM_SCALES
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


class Entry(NamedTuple):
    """Where one of our tensors lives in a release: file, key and, for pose.pth's last layer,
    how many leading output rows are ours (Monodepth2 stores two frames' outputs)."""

    file: str
    key: str
    rows: int | None = None


def resnet_name(depth: int) -> str:
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


# ------------------------------------------------------------------- attention scaling
def attention_scale_of(net: FSRENetwork) -> str:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    return modules[0].scale if modules else "reference"


def num_heads_of(net: FSRENetwork) -> int:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    return modules[0].num_heads if modules else 4


def head_ratio_of(net: FSRENetwork) -> float:
    modules = [*net.cma_depth.values(), *net.cma_seg.values()]
    if not modules:
        return 2.0
    return max(m.embed_channels / m.channels for m in modules)


def query_factor(scale_from: str, scale_to: str, num_heads: int) -> float:
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
