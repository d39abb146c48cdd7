"""Publish a trained model: `python -m fsre_lightning.export_reference <ckpt> --out <folder>`.

    python -m fsre_lightning.export_reference outputs/<run>/checkpoints/last.ckpt \\
        --out fsre_r18_release/ [--height 192 --width 640] [--overwrite]
    # scored by the reference code itself (add --no_cma for a network without CMA)
    python evaluate_depth.py --load_weights_folder fsre_r18_release --eval_mono --num_layers 18

the inverse of `import_reference`: loads the checkpoint's FSREModule and writes its depth and
pose networks with `fsre_lightning.reference.save_reference_release` as the folder FSRE-Depth's
own loaders read strictly: encoder.pth, decoder.pth (CMA on) or depth.pth (+ seg.pth),
pose_encoder.pth, pose.pth (six outputs) and opt.json; a network without segmentation gives
the encoder.pth + depth.pth that Monodepth2's evaluate_depth.py reads. The training
resolution stored in encoder.pth and opt.json is --height/--width, else the one the checkpoint
records (`fsre_lightning.trained.training_resolution`). A network the reference layout cannot hold
(one-directional CMA, a non-ResNet encoder, not 19 classes) is refused before anything is
written. An existing non-empty --out folder is refused unless --overwrite, which replaces the
release files and removes the stale ones a different architecture left (other files stay).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fsre_lightning.errors import ConfigError, UserError
from fsre_lightning.runtime import EXIT_USER_ERROR, USER_ERRORS, report_error


class ExportError(UserError):
    """A checkpoint or --out folder this command cannot export to a release."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fsre_lightning.export_reference",
        description="Write a trained FSREModule checkpoint as a published FSRE-Depth / "
                    "Monodepth2 model folder (encoder.pth, decoder.pth or depth.pth, "
                    "pose_encoder.pth, pose.pth, opt.json) for the reference code.")
    parser.add_argument("ckpt", type=Path, help="the Lightning checkpoint to export")
    parser.add_argument("--out", type=Path, required=True,
                        help="release folder to write (created; must be empty unless "
                             "--overwrite)")
    parser.add_argument("--height", type=int, default=None,
                        help="training height recorded in the release; default: the one the "
                             "checkpoint (or its run folder) records")
    parser.add_argument("--width", type=int, default=None,
                        help="training width recorded in the release (set with --height)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty --out folder, replacing its "
                             "release files")
    return parser.parse_args(argv)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty: choose a new folder, or pass --overwrite "
                          "to replace the release files in it")


def _resolution(ckpt: Path, height: int | None, width: int | None) -> tuple[int, int, str]:
    from fsre_lightning.trained import training_resolution

    try:
        return training_resolution(ckpt, height, width)
    except ConfigError as err:
        if height is None and width is None:
            raise ConfigError(f"{err} (here: --height H --width W)") from None
        raise


class Exported(NamedTuple):
    """What `export` wrote."""

    written: list[Path]
    removed: list[Path]  # stale release files of an earlier export, with --overwrite
    options: dict[str, Any]  # opt.json's content
    source: str  # where the resolution came from
    rescaled: bool  # CMA queries rescaled from the paper's attention scaling


def export(args: argparse.Namespace) -> Exported:
    """Write the checkpoint of `args.ckpt` as a release folder `args.out`."""
    import torch

    from fsre_lightning.reference import save_reference_release
    from fsre_lightning.reference.keys import (
        CMA_FILE,
        DEPTH_FILE,
        ENCODER_FILE,
        OPTIONS_FILE,
        POSE_ENCODER_FILE,
        POSE_FILE,
        SEG_FILE,
        attention_scale_of,
    )
    from fsre_lightning.reference.save import reference_options
    from fsre_lightning.trained import load_module

    # Every file name a release folder may hold: with --overwrite, those this export does not
    # write are removed (a decoder.pth beside a new depth.pth would make the folder unreadable).
    release_files = (ENCODER_FILE, CMA_FILE, DEPTH_FILE, SEG_FILE, POSE_ENCODER_FILE, POSE_FILE,
                     OPTIONS_FILE)
    out = args.out.expanduser()
    _check_out(out, args.overwrite)
    module = load_module(args.ckpt, torch.device("cpu"))
    height, width, source = _resolution(args.ckpt, args.height, args.width)
    try:
        written = save_reference_release(module.net, module.pose_net, out, height, width)
    except ValueError as err:  # a network the reference layout cannot hold
        raise ExportError(f"{args.ckpt} cannot be written as a reference release: {err}"
                          ) from err
    except OSError as err:
        raise ExportError(f"--out {out}: cannot write the release there ({err})") from err
    names = {p.name for p in written}
    removed = [out / n for n in release_files if n not in names and (out / n).is_file()]
    for path in removed:
        path.unlink()
    rescaled = bool(module.net.cma_scales) and attention_scale_of(module.net) == "paper"
    return Exported(written, removed, reference_options(module.net, height, width), source,
                    rescaled)


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fsre_lightning.export_reference <ckpt> --out <folder>`; returns the exit
    status (a bad checkpoint, network or folder: one line on stderr and 2)."""
    args = parse_args(argv)
    try:
        result = export(args)
    # OSError: an unreadable checkpoint or an --out that cannot be listed
    except (*USER_ERRORS, ValueError, OSError) as err:
        report_error("export_reference", err)
        return EXIT_USER_ERROR
    options, folder = result.options, result.written[0].parent
    print(f"release written to {folder}:")
    for path in result.written:
        print(f"  {path.name:<17} {_size(path)}")
    for path in result.removed:
        print(f"  {path.name:<17} removed (an earlier export's file this network does not use)")
    cma = ("none" if options["no_cma"] else f"layers {options['cma_layers']}, H = "
           f"{options['num_head']} x r = {options['head_ratio']:g}"
           + (" (queries rescaled for the reference's attention scaling)"
              if result.rescaled else ""))
    print(f"network     ResNet-{options['num_layers']}, CMA {cma}")
    print(f"resolution  {options['height']} x {options['width']} (from {result.source})")
    flags = f"--num_layers {options['num_layers']}" + (" --no_cma" if options["no_cma"] else "")
    print(f"score it with the reference code: python evaluate_depth.py --load_weights_folder "
          f"{folder} --eval_mono {flags}")
    print(f"read it back: python -m fsre_lightning.import_reference {folder} --out x.ckpt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
