"""Import a published model: `python -m fsre_lightning.import_reference <folder> [--out x.ckpt]`.

    # FSRE-Depth's release (link in the reference README), or a Monodepth2 model folder
    python -m fsre_lightning.import_reference FSRE-Depth/ --out fsre_r18.ckpt
    python -m fsre_lightning.evaluate ckpt_path=fsre_r18.ckpt data=kitti \\
        data.root=/data/kitti_raw data.split_dir=/data/splits/eigen

reads the release folder with `models.load_reference_release` (the networks the files
determine, the reference's attention scaling) and writes a Lightning checkpoint of
`FSREModule` whose hyper-parameters rebuild that network, so `evaluate`,
`FSREModule.load_from_checkpoint` and `train init_weights=...` (fine-tuning) take it. The
checkpoint also records the release's training resolution (`input_size`), which `evaluate`
uses unless height/width are given. Without pose files the pose network is left randomly
initialised (evaluation does not use it) and the output says so.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fsre_lightning.checkpointing import AtomicCheckpointIO
from fsre_lightning.models.release import (
    ReferenceRelease,
    ReleaseFormatError,
    load_reference_release,
)
from fsre_lightning.module import FSREModule

# Top-level checkpoint entries beside Lightning's: the network input size of the release.
INPUT_SIZE_KEY = "input_size"
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
        INPUT_SIZE_KEY: [release.height, release.width],
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fsre_lightning.import_reference",
        description="Turn a published FSRE-Depth or Monodepth2 model folder (encoder.pth, "
                    "decoder.pth or depth.pth, pose_encoder.pth, pose.pth) into a checkpoint "
                    "for fsre_lightning's evaluate and train.")
    parser.add_argument("folder", type=Path, help="the unzipped release folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint to write (default: <folder name>.ckpt in the current "
                             "directory)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="H of the CMA modules; default: read from the files (checked "
                             "against opt.json when present)")
    parser.add_argument("--head-ratio", type=float, default=None,
                        help="r of the CMA modules; default: read from the files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Entry point; a bad folder ends with one line on stderr and exit status 2."""
    args = parse_args(argv)
    try:
        release = load_reference_release(args.folder, args.num_heads, args.head_ratio)
        out = args.out or Path(f"{args.folder.resolve().name}.ckpt")
        print(f"release {release.folder}:")
        for line in describe(release):
            print(f"  {line}")
        path = write_checkpoint(release, out)
    except (ReleaseFormatError, FileNotFoundError, NotADirectoryError, ValueError,
            OSError) as err:
        print(f"fsre_lightning.import_reference: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"checkpoint written to {path}")
    print(f"score it: python -m fsre_lightning.evaluate ckpt_path={path} data=kitti "
          "data.root=<kitti_raw> data.split_dir=<splits/eigen>")
    return path


if __name__ == "__main__":
    main()
