import torch

from fsre_lightning.tracking.panels import log_image
from fsre_lightning.visualize import (
    CITYSCAPES_PALETTE,
    colorize_disparity,
    colorize_segmentation,
)


def test_disparity_colours_are_monotone_in_the_colormap_index() -> None:
    disp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(2, 1, 4, 64)
    rgb = colorize_disparity(disp, percentile=100.0)
    assert rgb.shape == (2, 3, 4, 64)
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0
    # plasma runs from dark blue to bright yellow: red and green grow with disparity
    assert rgb[0, 0, 0, -1] > rgb[0, 0, 0, 0] and rgb[0, 1, 0, -1] > rgb[0, 1, 0, 0]


def test_segmentation_palette_and_void() -> None:
    labels = torch.tensor([[[0, 13, 255]]])
    rgb = colorize_segmentation(labels)
    assert torch.allclose(rgb[0, :, 0, 0], CITYSCAPES_PALETTE[0])
    assert torch.allclose(rgb[0, :, 0, 1], CITYSCAPES_PALETTE[13])
    assert torch.all(rgb[0, :, 0, 2] == 0)


def test_png_fallback_without_a_logger(tmp_path) -> None:
    log_image(None, "train/panel", torch.rand(3, 16, 32), 7, tmp_path)
    assert (tmp_path / "train_panel_0000007.png").exists()
