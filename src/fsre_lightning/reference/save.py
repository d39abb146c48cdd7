"""Write our networks as a release folder the published code loads strictly.

`save_reference_release` is the inverse of `load_reference_release`: the same key mapping
(`fsre_lightning.reference.keys`), the reference's attention scaling folded into the query
weights, and an ``opt.json`` with the flags the reference's evaluate_depth.py needs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fsre_lightning.cityscapes import NUM_CLASSES
from fsre_lightning.models.fsre import FSRENetwork
from fsre_lightning.models.pose import PoseNetwork
from fsre_lightning.reference.keys import (
    CLASSIFIER_OUTPUTS,
    ENCODER_FILE,
    OPTIONS_FILE,
    POSE_ENCODER_FILE,
    attention_scale_of,
    depth_network_entries,
    head_ratio_of,
    num_heads_of,
    pose_network_entries,
    query_factor,
    rescale_queries,
)
from fsre_lightning.reference.release_layout import ReleaseFormatError, resnet_depth


def _check_writable(net: FSRENetwork) -> None:
    if net.cma_scales and set(net.cma_targets) != {"depth", "seg"}:
        raise ValueError(f"cma_targets={list(net.cma_targets)}: the reference CMA module always "
                         "refines both decoders, it cannot hold a one-directional CMA")
    if net.segmentation and net.num_classes != NUM_CLASSES:
        raise ValueError(f"num_classes={net.num_classes}: the reference segmentation decoder "
                         f"has {NUM_CLASSES} outputs")


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
    rescale_queries(ours, "", query_factor(attention_scale_of(depth), "reference",
                                            num_heads_of(depth)))
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
        "num_head": num_heads_of(depth),
        "head_ratio": head_ratio_of(depth),
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
