"""Image and label files into arrays and tensors: the one decoder of every pipeline.

Training (with and without the frame cache), evaluation, prediction and the pseudo-label
caches all read files through these functions, so a frame gets the same bytes whichever path
reads it. Images are resized with Lanczos (antialiased, as Monodepth2 does), labels with
nearest neighbour; a file PIL cannot read is a DataError naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsre_lightning.cityscapes import LABEL_ID_TO_TRAIN_ID, NUM_CLASSES, VOID
from fsre_lightning.errors import DataError

# What PIL raises for damaged or unreadable files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError)


def read_rgb(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB at the file's own size; DataError naming the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot decode image {path}: {err}; re-extract or re-convert it"
                        ) from err


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 H x W x 3 resized to `size` (height, width) as `decode_rgb` resizes."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.LANCZOS))


def decode_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """RGB image resized with Lanczos (antialiased, as Monodepth2): uint8 H x W x 3.

    The one resize of both pipelines: the frame cache stores exactly these bytes.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.LANCZOS)
            return np.asarray(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot decode image {path}: {err}; re-extract or re-convert it") from err


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (... x) H x W x 3 -> float (... x) 3 x H x W in [0, 1]."""
    out = np.moveaxis(rgb, -1, -3).astype(np.float32, order="C")
    out /= np.float32(255.0)
    return torch.from_numpy(out)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB image resized with Lanczos (antialiased, as Monodepth2) to 3 x H x W in [0, 1]."""
    return rgb_to_tensor(decode_rgb(path, size))


def _aspect_differs(a: tuple[int, int], b: tuple[int, int], tolerance: float = 0.02) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) > tolerance * (b[0] / b[1])


def decode_label(path: Path, size: tuple[int, int], label_format: str,
                 frame_path: Path | None = None) -> np.ndarray:
    """Pseudo-label PNG -> uint8 H x W train ids (255 void), resized with nearest neighbour.

    With `frame_path`, the label must be the frame's size or a scaled copy of it (same aspect
    ratio): a label of another image would otherwise be silently stretched onto the frame.
    """
    try:
        with Image.open(path) as img:
            if len(img.getbands()) != 1:
                raise DataError(f"label {path} has {len(img.getbands())} channels "
                                f"({img.mode}); expected a single-channel PNG of ids")
            if frame_path is not None:
                with Image.open(frame_path) as frame:
                    if _aspect_differs(img.size, frame.size):
                        raise DataError(
                            f"label {path} is {img.size[0]} x {img.size[1]} but its frame "
                            f"{frame_path} is {frame.size[0]} x {frame.size[1]}: the label "
                            f"belongs to another image or was cropped; regenerate it")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.NEAREST)
            arr = np.asarray(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot decode label {path}: {err}; regenerate it") from err
    if arr.max(initial=0) > 255:
        raise DataError(f"label {path} has values up to {arr.max()}; expected 8-bit ids")
    arr = arr.astype(np.uint8)
    if label_format == "label_ids":
        return LABEL_ID_TO_TRAIN_ID[arr]
    bad = (arr >= NUM_CLASSES) & (arr != VOID)
    if bad.any():
        raise DataError(f"label {path} holds {int(arr[bad][0])}, not a train id (0..18, 255): "
                        f"if it stores Cityscapes label ids set data.label_format=label_ids")
    return arr


def load_label(path: Path | None, size: tuple[int, int], label_format: str,
               frame_path: Path | None = None) -> torch.Tensor:
    """Pseudo-label PNG -> H x W long train ids; no path (a missing label) -> all void."""
    if path is None:
        return torch.full(size, VOID, dtype=torch.long)
    return torch.from_numpy(decode_label(path, size, label_format, frame_path).astype(np.int64))
