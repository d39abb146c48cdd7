"""Prediction on your own images, folders and videos (the library side of `predict`).

`find_inputs` classifies what `input` names (an image, a folder of images in name order, a
video read with imageio-ffmpeg), `predict_batch` runs the inference graph at the network size
and resizes the outputs back, `write_outputs` writes the per-image files (colour-mapped depth,
arrays, segmentation, an optional overlay) and `predict` runs the whole source, spooling a
video's arrays to one .npz and its frames to an optional side-by-side mp4. The file names
and options are documented with the command, `fsre_lightning.predict`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fsre_lightning.data.decode import read_rgb, resize_rgb, rgb_to_tensor
from fsre_lightning.data.kitti_layout import IMAGE_EXTENSIONS
from fsre_lightning.errors import DataError, first_line
from fsre_lightning.inference.model import InferenceModel
from fsre_lightning.inference.scale import camera_height_scale, ground_mask
from fsre_lightning.visualize import (
    colorize_disparity,
    colorize_segmentation,
    depth_overlay,
    save_image,
    to_uint8,
)
from fsre_lightning.visualize import side_by_side as side_by_side_frame

log = logging.getLogger(__name__)

# What `input` may name: the frames a KITTI folder holds, and other images PIL reads.
IMAGE_SUFFIXES = (*(f".{ext}" for ext in IMAGE_EXTENSIONS), ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
VIDEO_EXTRA_HINT = "pip install 'fsre-lightning[video]' (imageio and imageio-ffmpeg)"
DEFAULT_FPS = 10.0


# ------------------------------------------------------------------------------- inputs
def _imageio(path: Path) -> Any:
    try:
        import imageio.v2 as iio
        import imageio_ffmpeg  # noqa: F401  (imageio's FFMPEG plugin needs it)
    except ImportError as err:
        raise DataError(f"{path}: reading or writing videos needs imageio and "
                        f"imageio-ffmpeg: {VIDEO_EXTRA_HINT}") from err
    return iio


def open_video(path: Path) -> tuple[Any, float, int | None]:
    """(reader, fps, frame count or None) of a video; DataError naming the file."""
    iio = _imageio(path)
    try:
        reader = iio.get_reader(path, format="FFMPEG")
        meta = reader.get_meta_data()
    except Exception as err:  # imageio/ffmpeg raise OSError, RuntimeError, IndexError, ...
        raise DataError(f"cannot read video {path}: {type(err).__name__}: {first_line(err)} "
                        "(not a video, truncated, or a codec ffmpeg lacks)") from err
    fps = float(meta.get("fps") or DEFAULT_FPS)
    duration = meta.get("duration")
    count = (round(float(duration) * fps)
             if isinstance(duration, int | float) and np.isfinite(duration) else None)
    return reader, fps, count


@dataclass
class Source:
    """What `input` names: an image, a folder of images or a video."""

    path: Path
    kind: str  # image | folder | video
    files: list[Path]
    fps: float = DEFAULT_FPS
    count: int | None = None

    @property
    def stem(self) -> str:
        return self.path.stem if self.kind != "folder" else self.path.name

    def frames(self) -> Iterator[tuple[str, np.ndarray]]:
        """(output name, H x W x 3 uint8 RGB) in order."""
        if self.kind != "video":
            for file in self.files:
                yield file.stem, read_rgb(file)
            return
        reader, _, _ = open_video(self.path)
        index = 0
        try:
            while True:
                try:
                    frame = reader.get_next_data()
                except (StopIteration, IndexError):
                    break
                except Exception as err:  # a truncated stream fails mid-way
                    raise DataError(f"cannot read frame {index} of video {self.path}: "
                                    f"{type(err).__name__}: {err}") from err
                yield f"{self.stem}_{index:06d}", np.ascontiguousarray(frame[..., :3])
                index += 1
        finally:
            reader.close()
        if index == 0:
            raise DataError(f"video {self.path} holds no frames")


def find_inputs(path: str | Path) -> Source:
    """Classify `input`; clear errors for a missing path, an empty folder, an unknown type."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input={str(path)!r}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "give a folder of frames, an image or a video file")
        stems = [p.stem for p in files]
        if len(set(stems)) != len(stems):
            raise DataError(f"input folder {path} has images that differ only by extension "
                            "(their outputs would overwrite one another)")
        return Source(path, "folder", files, count=len(files))
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return Source(path, "image", [path], count=1)
    if suffix in VIDEO_SUFFIXES:
        reader, fps, count = open_video(path)
        reader.close()
        return Source(path, "video", [], fps=fps, count=count)
    raise DataError(f"input {path}: unknown file type {suffix or '(none)'}; images "
                    f"{', '.join(IMAGE_SUFFIXES)} or videos {', '.join(VIDEO_SUFFIXES)}")


def to_network(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """3 x H x W float in [0, 1] at the network size, resized as training resizes (Lanczos)."""
    return rgb_to_tensor(resize_rgb(rgb, size))


def batched(items: Iterator[tuple[str, np.ndarray]], size: int
            ) -> Iterator[list[tuple[str, np.ndarray]]]:
    batch: list[tuple[str, np.ndarray]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------ outputs
class VideoArrays:
    """Per-frame arrays of a video, spooled to disk, then written as one .npz.

    Frames go to raw temporary files as they come, so a long video never sits in memory;
    `save` memory-maps them into np.savez, which copies them in chunks.
    """

    def __init__(self, folder: Path) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=".predict-", dir=folder))
        self.files: dict[str, Any] = {}
        self.meta: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.count: dict[str, int] = {}
        self.scales: list[float] = []

    def append(self, key: str, array: np.ndarray) -> None:
        if key not in self.files:
            self.files[key] = open(self.tmp / key, "wb")  # noqa: SIM115 (closed in save/close)
            self.meta[key] = (array.dtype, array.shape)
            self.count[key] = 0
        if (array.dtype, array.shape) != self.meta[key]:
            raise DataError(f"video frames change size mid-stream ({self.meta[key][1]} -> "
                            f"{array.shape}): use resolution=network")
        self.files[key].write(np.ascontiguousarray(array).tobytes())
        self.count[key] += 1

    def save(self, path: Path, **extra: Any) -> Path:
        arrays: dict[str, Any] = dict(extra)
        for key, handle in self.files.items():
            handle.close()
            dtype, shape = self.meta[key]
            arrays[key] = np.memmap(self.tmp / key, dtype=dtype, mode="r",
                                    shape=(self.count[key], *shape))
        arrays["scale"] = np.asarray(self.scales, np.float32)
        np.savez(path, **arrays)
        return path

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class SideBySideWriter:
    """An mp4 of side-by-side frames (ffmpeg via imageio); sizes padded to even numbers."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.writer: Any = None
        self.size: tuple[int, ...] | None = None

    def append(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)))  # yuv420p needs even sizes
        if self.size is not None and frame.shape[:2] != self.size:
            # images of a folder may differ in size; a video has one
            frame = np.asarray(Image.fromarray(frame).resize(self.size[::-1], Image.BILINEAR))
        self.size = frame.shape[:2]
        if self.writer is None:
            self.writer = _imageio(self.path).get_writer(
                self.path, format="FFMPEG", fps=self.fps, macro_block_size=2)
        self.writer.append_data(frame)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Settings:
    size: tuple[int, int]
    resolution: str
    segmentation: bool
    save_arrays: bool
    scale_factor: float | None
    camera_height: float | None
    intrinsics: tuple[float, float, float, float]
    overlay: bool = False


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def predict_batch(model: InferenceModel, frames: Sequence[np.ndarray], settings: Settings,
                  device: torch.device) -> list[dict[str, Any]]:
    """Per frame: disp and depth (H x W float32 numpy), scale, labels (uint8) when asked."""
    images = torch.stack([to_network(f, settings.size) for f in frames]).to(device)
    outputs = model(images)
    disp_net, depth_net = outputs[0], outputs[1]
    logits = outputs[2] if len(outputs) > 2 else None
    results = []
    for i, frame in enumerate(frames):
        out_size = frame.shape[:2] if settings.resolution == "input" else settings.size
        disp = _resize(disp_net[i:i + 1].float(), out_size)[0, 0]
        labels = None
        if logits is not None and settings.segmentation:
            labels = _resize(logits[i:i + 1].float(), out_size).argmax(1)[0].to(torch.uint8)
        scale = 1.0
        if settings.scale_factor is not None:
            scale = float(settings.scale_factor)
        elif settings.camera_height is not None:
            # At the network resolution: the intrinsics are normalised, so any size works, and
            # this one is the same for every frame.
            net_labels = logits[i].argmax(0).cpu() if logits is not None else None
            mask = ground_mask(settings.size, net_labels)
            try:
                scale = camera_height_scale(depth_net[i, 0], settings.intrinsics,
                                            settings.camera_height, mask)
            except ValueError as err:
                log.warning("frame %d: %s; its depth stays relative (scale 1)", i, err)
        results.append({
            "disp": disp.cpu().numpy().astype(np.float32),
            "depth": (scale / disp.clamp_min(1e-8)).cpu().numpy().astype(np.float32),
            "scale": scale,
            "labels": None if labels is None else labels.cpu().numpy(),
        })
    return results


def write_outputs(name: str, frame: np.ndarray, result: dict[str, Any], folder: Path,
                  settings: Settings, arrays: VideoArrays | None,
                  video: SideBySideWriter | None) -> None:
    disp = torch.from_numpy(result["disp"])[None, None]
    depth_colour = colorize_disparity(disp)[0]
    save_image(depth_colour, folder / f"{name}_depth.png")
    image = rgb_to_tensor(frame)
    if image.shape[-2:] != depth_colour.shape[-2:]:
        # the input at the output's size, so that overlay and panels line up pixel for pixel
        image = _resize(image[None], tuple(depth_colour.shape[-2:]))[0]
    if settings.overlay:
        save_image(depth_overlay(image[None], disp)[0], folder / f"{name}_overlay.png")
    panels = [image, depth_colour]
    labels = result["labels"]
    if labels is not None:
        seg_colour = colorize_segmentation(torch.from_numpy(labels.astype(np.int64))[None])[0]
        save_image(seg_colour, folder / f"{name}_seg.png")
        panels.append(seg_colour)
        if arrays is None:
            Image.fromarray(labels).save(folder / f"{name}_seg_ids.png")
    if arrays is not None:
        arrays.append("disp", result["disp"])
        arrays.append("depth", result["depth"])
        if labels is not None:
            arrays.append("segmentation", labels)
        arrays.scales.append(result["scale"])
    elif settings.save_arrays:
        np.save(folder / f"{name}_disp.npy", result["disp"])
        np.save(folder / f"{name}_depth.npy", result["depth"])
    if video is not None:
        video.append(to_uint8(side_by_side_frame(panels)))


def predict(model: InferenceModel, source: Source, folder: Path, settings: Settings,
            device: torch.device, batch_size: int = 4, side_by_side: bool = False,
            fps: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Run `model` over `source`, writing into `folder`; returns a summary."""
    folder.mkdir(parents=True, exist_ok=True)
    is_video = source.kind == "video"
    arrays = VideoArrays(folder) if is_video and settings.save_arrays else None
    video = None
    if side_by_side:
        name = f"{source.stem}_side_by_side.mp4" if is_video else "side_by_side.mp4"
        video = SideBySideWriter(folder / name, fps or source.fps)
    count, scales = 0, []
    try:
        with tqdm(total=source.count, unit="frame", disable=not progress,
                  desc=f"predict {source.path.name}") as bar:
            for batch in batched(source.frames(), batch_size):
                results = predict_batch(model, [f for _, f in batch], settings, device)
                for (name, frame), result in zip(batch, results, strict=True):
                    write_outputs(name, frame, result, folder, settings, arrays, video)
                    scales.append(result["scale"])
                count += len(batch)
                bar.update(len(batch))
        npz = None
        if arrays is not None:
            npz = arrays.save(folder / f"{source.stem}.npz",
                              fps=np.float32(fps or source.fps))
    finally:
        if arrays is not None:
            arrays.close()
        if video is not None:
            video.close()
    return {"frames": count, "output": str(folder), "npz": str(npz) if npz else None,
            "video": str(video.path) if video is not None else None,
            "scale_median": float(np.median(scales)) if scales else None}
