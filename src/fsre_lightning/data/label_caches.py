"""Pseudo-label caches of a split: label PNGs imported, or predicted with a SegFormer.

Both write the uint8 train-id cache (19 Cityscapes classes, 255 void) the KITTI data module
reads (`fsre_lightning.data.frame_cache`), at the training resolution, keyed by each line's
frame 0:

- `import_labels` reads the label PNGs (the published release's layout, Cityscapes label ids or
  train ids) into ``labels_files_<split>_<H>x<W>``, exactly the cache the data module builds
  itself for ``data.label_source=files``: building it ahead of training saves that time.
- `predict_labels` runs a Cityscapes SegFormer (``transformers``' 19-class
  SegformerForSemanticSegmentation) on the native frames resized to `infer_size`, upsamples the
  logits bilinearly to the cache size and stores the argmax in
  ``labels_predicted_<split>_<H>x<W>`` (``data.label_source=predicted``). Weights come from a
  local folder or the Hugging Face cache (`DEFAULT_SEGMENTATION_MODEL` by default); nothing is
  downloaded unless `allow_download`. The model's classes must be Cityscapes' 19 train ids in
  order (checked by name when its config names them).

Builds are resumable and skipped when the cache is up to date. The command line is
`python -m fsre_lightning.pseudolabel` (`fsre_lightning.pseudolabel`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsre_lightning.cityscapes import CLASS_NAMES, NUM_CLASSES, VOID
from fsre_lightning.data.array_store import ArrayCache, CachedArray, file_signature
from fsre_lightning.data.decode import read_rgb
from fsre_lightning.data.frame_cache import build_label_cache, cache_name, frame_key, unique_rows
from fsre_lightning.data.kitti_layout import (
    find_image,
    label_path,
    missing_error,
    read_split,
    resolve_images,
)
from fsre_lightning.data.kitti_sources import DEFAULT_SEGMENTATION_MODEL
from fsre_lightning.errors import DataError, first_line
from fsre_lightning.models.pretrained import hub_unreachable
from fsre_lightning.runtime import resolve_device

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
    """A Cityscapes SegformerForSemanticSegmentation (19 outputs) in eval mode on `device`:
    from a folder, the Hugging Face cache, or (`allow_download`, when the hub can be reached)
    downloaded into that cache. Without network the error comes at once, not after the hub
    client's retries."""
    try:
        from transformers import SegformerForSemanticSegmentation
    except ImportError as err:
        raise ImportError(f"pseudolabel predict needs transformers: {SEG_EXTRA_HINT}") from err
    try:
        net = SegformerForSemanticSegmentation.from_pretrained(model, local_files_only=True)
    except OSError as err:
        if Path(model).exists() or not allow_download:
            raise DataError(f"cannot load the segmentation model {model!r}: {first_line(err)}. "
                            "Give a folder written by save_pretrained, a hub id already in the "
                            "Hugging Face cache, or allow the download (pseudolabel predict "
                            "--allow-download)") from None
        unreachable = hub_unreachable()
        if unreachable:
            raise DataError(f"the segmentation model {model!r} is not in the Hugging Face cache "
                            f"and there is no network ({unreachable}): give a folder written by "
                            f"save_pretrained, or fill the cache on a machine with network (`hf "
                            f"download {model}`) and copy it here") from None
        try:
            net = SegformerForSemanticSegmentation.from_pretrained(model)
        except OSError as err:
            raise DataError(f"cannot download the segmentation model {model!r}: "
                            f"{first_line(err)}: check the hub id") from None
    check_cityscapes_labels(model, net.config)
    return net.eval().to(device)


def check_cityscapes_labels(model: str, config: Any) -> None:
    """The model predicts the 19 Cityscapes train ids, in their order: by count, and by name
    when its config names its classes (a model with generic names LABEL_0.. is taken as is)."""
    if config.num_labels != NUM_CLASSES:
        raise DataError(f"the segmentation model {model!r} predicts {config.num_labels} "
                        f"classes; a Cityscapes model with the {NUM_CLASSES} train ids is needed "
                        f"(e.g. {DEFAULT_SEGMENTATION_MODEL})")
    names = [str(config.id2label.get(i, config.id2label.get(str(i), ""))) for i in
             range(NUM_CLASSES)] if getattr(config, "id2label", None) else []
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return
    normal = [n.lower().replace("_", " ").replace("-", " ").strip() for n in names]
    wrong = [(i, names[i], CLASS_NAMES[i]) for i in range(NUM_CLASSES)
             if normal[i] != CLASS_NAMES[i]]
    if wrong:
        i, got, want = wrong[0]
        raise DataError(f"the segmentation model {model!r} names output {i} {got!r} where the "
                        f"Cityscapes train id {i} is {want!r} ({len(wrong)} of {NUM_CLASSES} "
                        f"differ): its classes are not Cityscapes' train ids in order; use a "
                        f"Cityscapes model such as {DEFAULT_SEGMENTATION_MODEL}")


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
    image = Image.fromarray(read_rgb(path)).resize((infer_size[1], infer_size[0]),
                                                   Image.BILINEAR)
    arr = np.asarray(image, dtype=np.float32) / 255.0
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
    torch_device = resolve_device(device)
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
