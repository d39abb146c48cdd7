"""Colour maps and image panels: the one place logging, prediction and reports draw pictures
(`tracking.panels` sends them to the loggers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from kornia.color import ColorMap, apply_colormap
from PIL import Image

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
    disp = disp.detach().float()
    flat = disp.flatten(1)
    vmax = torch.quantile(flat, percentile / 100.0, dim=1).clamp_min(1e-8)
    vmin = flat.min(dim=1).values
    norm = (disp - vmin.view(-1, 1, 1, 1)) / (vmax - vmin).clamp_min(1e-8).view(-1, 1, 1, 1)
    return apply_colormap(norm.clamp(0, 1), _colormap(cmap, disp.device))


def colorize_error(error: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """B x 1 x H x W non-negative error (0 where undefined) -> B x 3 x H x W colours."""
    error = error.detach().float()
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


def make_panel(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-width B x 3 x H x W images vertically, per sample, then samples side by side.

    Returns a single 3 x H_total x W_total image, the shape loggers expect.
    """
    width = rows[0].shape[-1]
    resized = []
    for r in rows:
        r = r.detach().float().cpu()
        if r.shape[-1] != width:
            r = torch.nn.functional.interpolate(r, size=(r.shape[-2] * width // r.shape[-1], width))
        resized.append(r)
    per_sample = torch.cat(resized, dim=2)
    return torch.cat(list(per_sample), dim=2).clamp(0, 1)


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
