"""Colour maps and image panels: the one place logging, prediction and reports draw pictures
(`tracking.panels` sends them to the loggers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from kornia.color import ColorMap, apply_colormap
from PIL import Image, ImageDraw, ImageFont

from fsre_lightning.cityscapes import PALETTE, VOID

CITYSCAPES_PALETTE = torch.tensor(PALETTE, dtype=torch.float32) / 255.0

_COLORMAPS: dict[tuple[str, str], ColorMap] = {}


def _colormap(name: str, device: torch.device) -> ColorMap:
    key = (name, str(device))
    if key not in _COLORMAPS:
        _COLORMAPS[key] = ColorMap(name, num_colors=256, device=device)
    return _COLORMAPS[key]


def colorize_disparity(
    disp: torch.Tensor, percentile: float = 95.0, cmap: str = "plasma"
) -> torch.Tensor:
    """B x 1 x H x W disparity -> B x 3 x H x W colours in [0, 1], normalised per image.

    Each image is scaled by its own `percentile` value so that a few near pixels do not wash the
    picture out (Monodepth2's figures use the 95th percentile the same way).
    """
    if disp.dim() != 4 or disp.shape[1] != 1:
        raise ValueError(f"disp must be B x 1 x H x W, got shape {tuple(disp.shape)}")
    disp = disp.detach().float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    flat = disp.flatten(1)
    vmax = torch.quantile(flat, percentile / 100.0, dim=1).clamp_min(1e-8)
    vmin = flat.min(dim=1).values
    norm = (disp - vmin.view(-1, 1, 1, 1)) / (vmax - vmin).clamp_min(1e-8).view(-1, 1, 1, 1)
    return apply_colormap(norm.clamp(0, 1), _colormap(cmap, disp.device))


def colorize_error(error: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """B x 1 x H x W non-negative error (0 where undefined) -> B x 3 x H x W colours."""
    error = error.detach().float().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    top = vmax if vmax is not None else float(error.max().clamp_min(1e-8))
    return apply_colormap((error / top).clamp(0, 1), _colormap("turbo", error.device))


def colorize_segmentation(labels: torch.Tensor, ignore_index: int = VOID) -> torch.Tensor:
    """B x H x W train ids -> B x 3 x H x W Cityscapes colours; void pixels are black."""
    palette = CITYSCAPES_PALETTE.to(labels.device)
    valid = (labels >= 0) & (labels < len(palette)) & (labels != ignore_index)
    colours = palette[labels.clamp(0, len(palette) - 1)]
    colours = colours * valid.unsqueeze(-1)
    return colours.permute(0, 3, 1, 2)


def overlay(image: torch.Tensor, colours: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend colour maps over images (both B x 3 x H x W in [0, 1])."""
    return (1 - alpha) * image + alpha * colours


def depth_overlay(image: torch.Tensor, disp: torch.Tensor, alpha: float = 0.5,
                  cmap: str = "plasma") -> torch.Tensor:
    """Colour-mapped disparity (B x 1 x H x W) blended over images (B x 3 x H x W in [0, 1])."""
    return overlay(image, colorize_disparity(disp, cmap=cmap), alpha)


def side_by_side(images: list[torch.Tensor]) -> torch.Tensor:
    """3 x H x W images placed left to right; each is resized (bilinear) to the first's height.

    One video frame of `fsre_lightning.predict`: input | depth | segmentation.
    """
    height = images[0].shape[-2]
    out = []
    for image in images:
        image = image.detach().float().cpu()
        if image.shape[-2] != height:
            width = max(1, round(image.shape[-1] * height / image.shape[-2]))
            image = torch.nn.functional.interpolate(image[None], size=(height, width),
                                                    mode="bilinear", align_corners=False)[0]
        out.append(image)
    return torch.cat(out, dim=-1).clamp(0, 1)


# Labelled panels: the width of the row-label column and the gap between samples, in pixels.
_LABEL_WIDTH = 190
_GAP = 2


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def labelled_panel(rows: list[tuple[str, torch.Tensor]],
                   colour_bar: tuple[str, float, float] | None = None) -> torch.Tensor:
    """One 3 x H x W image of labelled rows: each row's B x 3 x h x w images side by side
    (resized to the first row's size), its label on the left; with `colour_bar` = (colour map,
    low, high), a scale of that map under the rows, its ends labelled."""
    height, width = rows[0][1].shape[-2:]
    count = rows[0][1].shape[0]
    row_h = max(height, 18)
    total_w = _LABEL_WIDTH + count * (width + _GAP)
    bar_h = 34 if colour_bar else 0
    canvas = Image.new("RGB", (total_w, len(rows) * (row_h + _GAP) + bar_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for r, (label, images) in enumerate(rows):
        images = images.detach().float().cpu().nan_to_num(0.0)
        if tuple(images.shape[-2:]) != (height, width):
            images = torch.nn.functional.interpolate(images, size=(height, width), mode="nearest")
        top = r * (row_h + _GAP)
        draw.text((4, top + row_h // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        for i in range(min(count, images.shape[0])):
            tile = Image.fromarray(to_uint8(images[i]))
            canvas.paste(tile, (_LABEL_WIDTH + i * (width + _GAP), top))
    if colour_bar:
        name, low, high = colour_bar
        ramp = torch.linspace(0, 1, count * width).view(1, 1, 1, -1).expand(1, 1, 10, -1)
        strip = apply_colormap(ramp, _colormap(name, ramp.device))[0]
        top = len(rows) * (row_h + _GAP)
        canvas.paste(Image.fromarray(to_uint8(strip)), (_LABEL_WIDTH, top + 4))
        draw.text((4, top + 9), "error scale", fill=(0, 0, 0), font=font, anchor="lm")
        for value, x, anchor in ((low, _LABEL_WIDTH, "la"),
                                 ((low + high) / 2, _LABEL_WIDTH + count * width // 2, "ma"),
                                 (high, _LABEL_WIDTH + count * width, "ra")):
            text = f"{value:g}" + ("+" if value == high else "")
            draw.text((x, top + 16), text, fill=(0, 0, 0), font=font, anchor=anchor)
    array = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
    return array.float() / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """3 x H x W float image in [0, 1] -> H x W x 3 uint8 array."""
    arr = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write a 3 x H x W float image as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path
