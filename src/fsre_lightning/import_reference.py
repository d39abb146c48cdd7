"""Import a published model: `python -m fsre_lightning.import_reference <folder> [--out x.ckpt]`.

    # FSRE-Depth's release (link in the reference README), or a Monodepth2 model folder
    python -m fsre_lightning.import_reference FSRE-Depth/ --out fsre_r18.ckpt
    python -m fsre_lightning.evaluate ckpt_path=fsre_r18.ckpt data=kitti \\
        data.root=/data/kitti_raw data.split_dir=/data/splits/eigen

reads the release folder with `fsre_lightning.reference.load_reference_release` (the networks
the files determine, the reference's attention scaling) and writes a Lightning checkpoint of
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

from fsre_lightning.runtime import EXIT_USER_ERROR, USER_ERRORS, report_error


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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fsre_lightning.import_reference <folder>`; returns the exit status (a bad
    folder: one line on stderr and 2)."""
    args = parse_args(argv)
    from fsre_lightning.reference import describe, load_reference_release, write_checkpoint

    try:
        release = load_reference_release(args.folder, args.num_heads, args.head_ratio)
        out = args.out or Path(f"{args.folder.resolve().name}.ckpt")
        print(f"release {release.folder}:")
        for line in describe(release):
            print(f"  {line}")
        path = write_checkpoint(release, out)
    # ValueError: weights the networks refuse; OSError: an unwritable --out
    except (*USER_ERRORS, ValueError, OSError) as err:
        report_error("import_reference", err)
        return EXIT_USER_ERROR
    print(f"checkpoint written to {path}")
    print(f"score it: python -m fsre_lightning.evaluate ckpt_path={path} data=kitti "
          "data.root=<kitti_raw> data.split_dir=<splits/eigen>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
