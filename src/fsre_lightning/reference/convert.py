"""A release folder as a Lightning checkpoint of FSREModule (what `import_reference` writes).

The checkpoint's hyper-parameters rebuild the release's networks, so `evaluate`, `predict`,
`FSREModule.load_from_checkpoint` and `train init_weights=...` take it; it also records the
release's training data (`training_data`: its input size, KITTI's camera, frames 0, -1, 1) and
where it came from. Without pose files the pose network is left randomly initialised
(evaluation does not use it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fsre_lightning.checkpoints import TRAINING_DATA_KEY, AtomicCheckpointIO, training_data_entry
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.module import FSREModule
from fsre_lightning.reference.load import ReferenceRelease

RELEASE_KEY = "reference_release"


def release_module(release: ReferenceRelease) -> FSREModule:
    """An FSREModule holding the release's networks, with hyper-parameters that rebuild them."""
    layout = release.layout
    loss: dict[str, Any] = {key: float(release.options[key])
                            for key in ("min_depth", "max_depth") if key in release.options}
    if not layout.segmentation:
        # The Monodepth2 baseline: no semantic terms (as conf/model/monodepth2.yaml).
        loss.update(segmentation_weight=0.0, sgt_weight=0.0)
    module = FSREModule(network=layout.network_config(), pose_network=layout.pose_config(),
                        loss=loss)
    module.net.load_state_dict(release.depth.state_dict())
    if release.pose is not None:
        module.pose_net.load_state_dict(release.pose.state_dict())
    return module.eval()


def release_checkpoint(release: ReferenceRelease) -> dict[str, Any]:
    """A Lightning checkpoint (weights, hyper-parameters, epoch 0) of `release_module`."""
    module = release_module(release)
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        # The published models are trained on KITTI with frames (0, -1, 1).
        TRAINING_DATA_KEY: training_data_entry(release.height, release.width, KITTI_INTRINSICS,
                                               (0, -1, 1), release.layout.segmentation),
        RELEASE_KEY: {
            "folder": str(release.folder),
            "has_pose": release.pose is not None,
            "ignored": list(release.ignored),
        },
    }


def write_checkpoint(release: ReferenceRelease, out: str | Path) -> Path:
    """Write `release_checkpoint` atomically to `out` and return the path."""
    out = Path(out).expanduser()
    AtomicCheckpointIO().save_checkpoint(release_checkpoint(release), out)
    return out


def _count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def describe(release: ReferenceRelease) -> list[str]:
    """What the release holds, one line per part, for the console."""
    layout, net = release.layout, release.depth
    depth = layout.encoder.split(".")[0].removeprefix("resnet")
    cma_params = _count(net.cma_depth) + _count(net.cma_seg)
    lines = [
        f"encoder        ResNet-{depth} ({layout.encoder}), {_millions(_count(net.encoder))} "
        "parameters",
        f"depth decoder  disparity at scales s = {', '.join(map(str, layout.disp_scales))}, "
        f"{_millions(_count(net.depth_decoder))} parameters",
    ]
    if layout.segmentation:
        lines.append(f"segmentation   {layout.num_classes} classes, "
                     f"{_millions(_count(net.seg_decoder))} parameters")
    else:
        lines.append("segmentation   none (Monodepth2 layout)")
    if layout.cma_scales:
        scales = ", ".join(map(str, layout.cma_scales))
        paper = ", ".join(str(4 - s) for s in layout.cma_scales)
        lines.append(f"CMA            s = {scales} (paper l = {paper}), H = {layout.num_heads} x "
                     f"r = {layout.head_ratio:g}, attention scaling 'reference', "
                     f"{_millions(cma_params)} parameters")
    else:
        lines.append("CMA            none")
    lines.append(f"resolution     {release.height} x {release.width} (the training input)")
    if release.pose is not None:
        pose_depth = (layout.pose_encoder or "").split(".")[0].removeprefix("resnet")
        lines.append(f"pose network   ResNet-{pose_depth}, 6-channel input, "
                     f"{_millions(_count(release.pose))} parameters")
    else:
        lines.append("pose network   none in the release: left randomly initialised")
    lines.append(f"parameters     depth network {_count(net):,}, pose network "
                 f"{_count(release.pose):,}")
    for note in release.ignored:
        lines.append(f"not loaded     {note}")
    return lines
