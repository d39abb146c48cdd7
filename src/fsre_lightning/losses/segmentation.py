"""Cross-entropy against pseudo-labels (design 3.9) and nearest-neighbour label resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsre_lightning.cityscapes import VOID


def _check_integer_labels(labels: torch.Tensor, name: str = "labels") -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = VOID
) -> torch.Tensor:
    """Mean cross-entropy over non-void pixels; 0 (with a graph, never NaN) when all are void.

    `logits` is B x N x H x W, `labels` B x H x W integer class ids at the logits' size.
    Equal to `F.cross_entropy(logits, labels, ignore_index=ignore_index)` whenever at least one
    pixel is labelled.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be B x N x H x W, got shape {tuple(logits.shape)}")
    _check_integer_labels(labels)
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must be B x H x W = {expected} (the logits' size), "
            f"got shape {tuple(labels.shape)}"
        )
    labels = labels.long()
    if logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous():
        # NHWC logits as rows of class scores (a view): the gradient comes back NHWC, so the
        # segmentation head's backward converts nothing (design 3.15, channels-last).
        n = logits.shape[1]
        total = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, n), labels.reshape(-1),
                                ignore_index=ignore_index, reduction="sum")
    else:
        total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1).to(total.dtype)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of B x H x W integer labels to `size` (h, w); returns long.

    Uses `F.interpolate(mode="nearest")` (the reference code's choice), so the picked source
    pixel is floor(dst_index * in_size / out_size).
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be B x H x W, got shape {tuple(labels.shape)}")
    _check_integer_labels(labels)
    size = (int(size[0]), int(size[1]))
    if tuple(labels.shape[1:]) == size:
        return labels.long()
    # float32 holds every integer label id (< 2**24) exactly.
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()
