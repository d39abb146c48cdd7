"""Build the pseudo-label cache of a split: import label PNGs, or predict them with SegFormer.

    python -m fsre_lightning.pseudolabel import --root ROOT --split-dir SPLITS --split train val \\
        --height 192 --width 640 --cache-dir CACHE [--label-root ROOT/segmentation] \\
        [--label-format label_ids|train_ids] [--allow-missing]
    python -m fsre_lightning.pseudolabel predict --root ROOT --split-dir SPLITS --split train val \\
        --height 192 --width 640 --cache-dir CACHE --model FOLDER_OR_HF_NAME \\
        [--device auto|cpu|cuda] [--batch-size 8] [--infer-size 384 1248] [--allow-download]

Both write one uint8 train-id cache (19 Cityscapes classes, 255 void) per split into CACHE (the
data module's ``data.cache_dir``), at the training resolution, keyed by the split's frames 0:

- ``import`` reads ``<label-root>/<date>/<drive>_sync/image_0X/<10-digit frame>.png`` (FSRE-Depth's
  release layout) holding Cityscapes label ids (``--label-format label_ids``, the default; mapped
  by the Cityscapes table of SPEC section 5) or train ids; resized with nearest neighbour. It
  writes ``labels_files_<split>_<H>x<W>``, exactly the cache the data module builds itself for
  ``data.label_source=files`` with the same label_dir/label_format: running it ahead of training
  (say on a CPU machine) saves that time. Frames without a label PNG fail the run, listed, unless
  ``--allow-missing`` (then their rows are void).
- ``predict`` runs a Cityscapes SegFormer (``transformers``' SegformerForSemanticSegmentation,
  whose 19 outputs are the train ids) on the native frames resized to ``--infer-size``, upsamples
  the logits bilinearly to the cache size and stores the argmax in
  ``labels_predicted_<split>_<H>x<W>``: train with ``data.label_source=predicted``. Weights come
  from ``--model`` (a local folder or a Hugging Face cache name; nothing is downloaded unless
  ``--allow-download``). Needs the optional extra: ``pip install 'fsre-lightning[seg]'``.

Builds show a progress bar, are resumable (an interrupted run continues where it stopped when run
again with the same arguments) and are skipped when the cache is already up to date.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsre_lightning.data.cache import ArrayCache, CachedArray, CacheError, file_signature
from fsre_lightning.data.kitti import (
    LABEL_FORMATS,
    NUM_CLASSES,
    VOID,
    DataError,
    build_label_cache,
    cache_name,
    find_image,
    frame_key,
    label_path,
    missing_error,
    read_split,
    resolve_images,
    unique_rows,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEG_EXTRA_HINT = "install the optional extra: pip install 'fsre-lightning[seg]' (transformers)"


def split_name_of(split_file: Path) -> str:
    """`eigen_zhou/train_files.txt` -> "train" (the name the data module's caches use)."""
    stem = split_file.stem
    return stem[: -len("_files")] if stem.endswith("_files") else stem


# --------------------------------------------------------------------------- import
def import_labels(
    root: Path,
    split_file: Path,
    cache_dir: Path,
    size: tuple[int, int],
    label_root: Path | None = None,
    label_format: str = "label_ids",
    allow_missing: bool = False,
    img_ext: str = "auto",
    workers: int = 0,
    progress: bool = True,
) -> CachedArray:
    """The data module's label cache (label_source=files) of one split, from label PNGs."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"--label-format {label_format!r}: use one of {LABEL_FORMATS}")
    root = Path(root)
    label_root = Path(label_root) if label_root else root / "segmentation"
    entries = read_split(split_file)
    name = split_name_of(split_file)
    frames = [row[0] for row in resolve_images(root, entries, [0], img_ext, name)]
    paths = [label_path(label_root, e) for e in entries]
    missing = [p for p in paths if not p.exists()]
    if missing and not allow_missing:
        raise missing_error("pseudo-labels", missing,
                            f"Frames of the {name} split without a label PNG under "
                            f"{label_root}; pass --allow-missing to store them as void (255).")
    absent = set(missing)
    keys, label_files, _ = unique_rows([[frame_key(e)] for e in entries],
                                       [[None if p in absent else p] for p in paths])
    frame_of = dict(zip([frame_key(e) for e in entries], frames, strict=True))
    return build_label_cache(cache_dir, cache_name("labels_files", name, *size), label_root,
                             keys, label_files, [frame_of[k] for k in keys], size, label_format,
                             workers, progress)


# --------------------------------------------------------------------------- predict
def load_segformer(model: str, device: torch.device, allow_download: bool = False
                   ) -> torch.nn.Module:
    """A Cityscapes SegformerForSemanticSegmentation (19 outputs) in eval mode on `device`."""
    try:
        from transformers import SegformerForSemanticSegmentation
    except ImportError as err:
        raise ImportError(f"pseudolabel predict needs transformers: {SEG_EXTRA_HINT}") from err
    try:
        net = SegformerForSemanticSegmentation.from_pretrained(
            model, local_files_only=not allow_download)
    except OSError as err:
        raise DataError(f"cannot load SegFormer weights from --model {model!r}: {err}. Give a "
                        f"folder written by save_pretrained, a name already in the Hugging Face "
                        f"cache, or --allow-download") from err
    if net.config.num_labels != NUM_CLASSES:
        raise DataError(f"--model {model!r} predicts {net.config.num_labels} classes; a "
                        f"Cityscapes model with the {NUM_CLASSES} train ids is needed (e.g. "
                        f"nvidia/segformer-b5-finetuned-cityscapes-1024-1024)")
    return net.eval().to(device)


def normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the model folder's preprocessor_config.json, else ImageNet's."""
    config = Path(model) / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        return (tuple(values.get("image_mean", IMAGENET_MEAN)),
                tuple(values.get("image_std", IMAGENET_STD)))
    return IMAGENET_MEAN, IMAGENET_STD


def read_for_segformer(path: Path, infer_size: tuple[int, int], mean: Sequence[float],
                       std: Sequence[float]) -> np.ndarray:
    """Native frame -> float32 3 x h x w, bilinear to infer_size, normalised."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((infer_size[1], infer_size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode image {path}: {err}; re-extract or re-convert it") from err
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@torch.inference_mode()
def predict_train_ids(net: torch.nn.Module, images: torch.Tensor, size: tuple[int, int]
                      ) -> np.ndarray:
    """B x 3 x h x w normalised images -> uint8 B x H x W argmax train ids at `size`."""
    logits = net(pixel_values=images).logits
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _model_identity(model: str) -> dict[str, Any]:
    folder = Path(model)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return {"model": str(folder.resolve()), "weights": file_signature(files, folder)}
    return {"model": model}


def predict_labels(
    root: Path,
    split_file: Path,
    cache_dir: Path,
    size: tuple[int, int],
    model: str,
    device: str = "auto",
    batch_size: int = 8,
    infer_size: tuple[int, int] = (384, 1248),
    allow_missing: bool = False,
    allow_download: bool = False,
    img_ext: str = "auto",
    workers: int = 0,
    progress: bool = True,
    load_model: Callable[[str, torch.device, bool], torch.nn.Module] = load_segformer,
) -> CachedArray:
    """SegFormer train ids of every frame 0 of a split, cached as labels_predicted_<split>."""
    root = Path(root)
    entries = read_split(split_file)
    name = split_name_of(split_file)
    frames = [find_image(root, e, e.frame, img_ext) for e in entries]
    missing = [frame_key(e) for e, p in zip(entries, frames, strict=True) if p is None]
    if missing and not allow_missing:
        raise missing_error("frames", missing,
                            f"Frames of the {name} split not found under {root} (img_ext "
                            f"{img_ext}); pass --allow-missing to store them as void (255).")
    keys, paths, _ = unique_rows([[frame_key(e)] for e in entries], [[p] for p in frames])
    present = [p for p in paths if p is not None]
    signature = file_signature(present, root)
    fields = {"kind": "labels", "source": "predict", **_model_identity(model),
              "root": str(root.resolve()), "frames": signature, "missing": missing,
              "infer_size": list(infer_size), "size": list(size)}
    info = {"kind": "labels", "source": "predict", "model": model, "root": str(root.resolve()),
            "height": size[0], "width": size[1], "missing": missing,
            # The data module re-checks this so that labels of replaced frames are not used.
            "frames_signature": signature if not missing else None}
    torch_device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    mean, std = normalisation(model)
    state: dict[str, torch.nn.Module] = {}
    pool = ThreadPoolExecutor(workers if workers > 0 else None)

    def fill(rows: np.ndarray) -> np.ndarray:
        if "net" not in state:  # only when something is left to predict
            state["net"] = load_model(model, torch_device, allow_download)
        out = np.full((len(rows), *size), VOID, dtype=np.uint8)
        todo = [i for i, r in enumerate(rows) if paths[r] is not None]
        if todo:
            batch = np.stack(list(pool.map(
                lambda i: read_for_segformer(paths[rows[i]], infer_size, mean, std), todo)))
            images = torch.from_numpy(batch).to(torch_device)
            out[todo] = predict_train_ids(state["net"], images, size)
        return out

    try:
        return ArrayCache(cache_dir, cache_name("labels_predicted", name, *size)).ensure(
            keys, size, fields, fill, chunk_size=batch_size, info=info, progress=progress)
    finally:
        pool.shutdown(cancel_futures=True)


# --------------------------------------------------------------------------- CLI
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
    pred.add_argument("--model", required=True,
                      help="SegformerForSemanticSegmentation folder (save_pretrained) or a name "
                           "in the Hugging Face cache, with Cityscapes' 19 train ids")
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
    size = (args.height, args.width)
    try:
        for flag, value in (("--height", args.height), ("--width", args.width)):
            if value <= 0 or value % 32:
                raise ValueError(f"{flag} {value}: the training size is a positive multiple "
                                 f"of 32 (data.height, data.width)")
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
    except (DataError, CacheError, ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
