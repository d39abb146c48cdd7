"""Build the pseudo-label cache of a split: import label PNGs, or predict them with SegFormer.

    python -m fsre_lightning.pseudolabel import --root ROOT --split-dir SPLITS --split train val \\
        --height 192 --width 640 --cache-dir CACHE [--label-root ROOT/segmentation] \\
        [--label-format label_ids|train_ids] [--allow-missing]
    python -m fsre_lightning.pseudolabel predict --root ROOT --split-dir SPLITS --split train val \\
        --height 192 --width 640 --cache-dir CACHE [--model FOLDER_OR_HUB_ID] \\
        [--device auto|cpu|cuda] [--batch-size 8] [--infer-size 384 1248] [--allow-download]

Both write one uint8 train-id cache (19 Cityscapes classes, 255 void) per split into CACHE (the
data module's ``data.cache_dir``), at the training resolution, keyed by the split's frames 0:

- ``import`` reads ``<label-root>/<date>/<drive>_sync/image_0X/<10-digit frame>.png`` (FSRE-Depth's
  release layout) holding Cityscapes label ids (``--label-format label_ids``, the default; mapped
  by the Cityscapes table) or train ids; resized with nearest neighbour. It
  writes ``labels_files_<split>_<H>x<W>``, exactly the cache the data module builds itself for
  ``data.label_source=files`` with the same label_dir/label_format: running it ahead of training
  (say on a CPU machine) saves that time. Frames without a label PNG fail the run, listed, unless
  ``--allow-missing`` (then their rows are void).
- ``predict`` runs a Cityscapes SegFormer (``transformers``' SegformerForSemanticSegmentation,
  whose 19 outputs are the train ids) on the native frames resized to ``--infer-size``, upsamples
  the logits bilinearly to the cache size and stores the argmax in
  ``labels_predicted_<split>_<H>x<W>``: train with ``data.label_source=predicted``. Weights come
  from ``--model`` (a local folder or a Hugging Face hub id, by default
  nvidia/segformer-b5-finetuned-cityscapes-1024-1024; nothing is downloaded unless
  ``--allow-download``, and without network that fails at once); its classes must be the 19
  Cityscapes train ids in order. Needs the optional extra: ``pip install 'fsre-lightning[seg]'``.

Builds show a progress bar, are resumable (an interrupted run continues where it stopped when run
again with the same arguments) and are skipped when the cache is already up to date.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fsre_lightning.data.array_store import CacheError
from fsre_lightning.data.kitti_layout import LABEL_FORMATS
from fsre_lightning.data.kitti_sources import DEFAULT_SEGMENTATION_MODEL
from fsre_lightning.errors import DataError
from fsre_lightning.models.network_config import check_image_size
from fsre_lightning.runtime import EXIT_USER_ERROR, USER_ERRORS, report_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fsre_lightning.pseudolabel", description=__doc__,
        epilog="Options of each source: python -m fsre_lightning.pseudolabel import --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, required=True,
                        help="KITTI raw folder (holding 2011_09_26/ ...)")
    common.add_argument("--split-dir", type=Path,
                        help="folder with <split>_files.txt (e.g. Monodepth2's splits/eigen_zhou)")
    common.add_argument("--split", nargs="+", default=["train", "val"],
                        help="split names in --split-dir")
    common.add_argument("--split-file", type=Path, nargs="+",
                        help="split files instead of --split-dir/--split; the cache is named "
                             "after the file (train_files.txt -> train)")
    common.add_argument("--height", type=int, default=192, help="training height (data.height)")
    common.add_argument("--width", type=int, default=640, help="training width (data.width)")
    common.add_argument("--cache-dir", type=Path, required=True,
                        help="the data module's data.cache_dir")
    common.add_argument("--img-ext", default="auto", choices=["auto", "png", "jpg", "jpeg"])
    common.add_argument("--allow-missing", action="store_true",
                        help="store frames without a label (import) or image (predict) as void "
                             "instead of failing")
    common.add_argument("--workers", type=int, default=0,
                        help="decoding threads (0 = all cores)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    imp = sub.add_parser("import", parents=[common], help="label PNGs -> cache",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    imp.add_argument("--label-root", type=Path,
                     help="folder of <date>/<drive>_sync/image_0X/<frame>.png (default: "
                          "ROOT/segmentation)")
    imp.add_argument("--label-format", choices=list(LABEL_FORMATS), default="label_ids",
                     help="Cityscapes label ids (FSRE-Depth's release) or train ids")

    pred = sub.add_parser("predict", parents=[common], help="SegFormer predictions -> cache",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pred.add_argument("--model", default=DEFAULT_SEGMENTATION_MODEL,
                      help="SegformerForSemanticSegmentation folder (save_pretrained) or a "
                           "Hugging Face hub id (in its cache, or with --allow-download), with "
                           "Cityscapes' 19 train ids in order")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pred.add_argument("--batch-size", type=int, default=8)
    pred.add_argument("--infer-size", type=int, nargs=2, default=[384, 1248],
                      metavar=("H", "W"), help="size the native frames are resized to for the "
                                               "network")
    pred.add_argument("--allow-download", action="store_true",
                      help="let transformers download --model when it is not cached")
    return parser


def _split_files(args: argparse.Namespace) -> list[Path]:
    if args.split_file:
        return list(args.split_file)
    if args.split_dir is None:
        raise DataError("give --split-dir (with --split) or --split-file")
    return [args.split_dir / f"{name}_files.txt" for name in args.split]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from fsre_lightning.data.label_caches import import_labels, predict_labels  # torch
    size = (args.height, args.width)
    try:
        for flag, value in (("--height", args.height), ("--width", args.width)):
            check_image_size(flag, value)
        for split_file in _split_files(args):
            common = {"root": args.root, "split_file": split_file, "cache_dir": args.cache_dir,
                      "size": size, "allow_missing": args.allow_missing,
                      "img_ext": args.img_ext, "workers": args.workers,
                      "progress": not args.quiet}
            if args.source == "import":
                cache = import_labels(label_root=args.label_root,
                                      label_format=args.label_format, **common)
            else:
                cache = predict_labels(model=args.model, device=args.device,
                                       batch_size=args.batch_size,
                                       infer_size=tuple(args.infer_size),
                                       allow_download=args.allow_download, **common)
            missing = cache.info.get("missing", [])
            print(f"{cache.path}: {len(cache)} frames at {args.height} x {args.width}"
                  + (f", {len(missing)} without a label (void), e.g. {missing[:3]}"
                     if missing else ""))
    except (*USER_ERRORS, CacheError, ImportError, ValueError) as err:
        report_error("pseudolabel", err)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
