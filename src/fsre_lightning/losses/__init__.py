"""Pure loss functions (docs/design.md section 3; no state, no configuration).

- photometric: `ssim`, `photometric_loss`, `photometric_losses` (many predictions, one
  target), `ssim_target_stats`, `min_reprojection_loss`
- smoothness: `smoothness_loss`
- segmentation: `segmentation_loss`, `resize_labels`
- sgt: `sgt_loss` (semantics-guided triplet loss, memory-light formulation)
"""

from fsre_lightning.losses.photometric import (
    min_reprojection_loss,
    photometric_loss,
    photometric_losses,
    ssim,
    ssim_target_stats,
)
from fsre_lightning.losses.segmentation import resize_labels, segmentation_loss
from fsre_lightning.losses.sgt import sgt_loss
from fsre_lightning.losses.smoothness import smoothness_loss

__all__ = [
    "min_reprojection_loss",
    "photometric_loss",
    "photometric_losses",
    "resize_labels",
    "segmentation_loss",
    "sgt_loss",
    "smoothness_loss",
    "ssim",
    "ssim_target_stats",
]
