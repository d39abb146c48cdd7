"""Semantics-guided triplet loss (the paper's eqs. 5-8; design 3.10), without the K^2 feature copy.

For each anchor pixel i with a non-void label, the K x K patch around it (stride 1) is split
into P+ (pixels of the anchor's class, the anchor included) and P- (pixels of another non-void
class); void pixels are in neither. Pixels outside the image (`border`): "reference", as the
published code (labels padded with -1, normalised features with zeros), are in P- at distance
sqrt(2) with no gradient; "exclude" leaves them out of both (design 5). A patch is a boundary patch
when |P+| >= T and |P-| >= T (T = K - 1 by default). With F_hat = F / ||F|| over channels and
the distance dist(i, j) = sqrt(max(2 - 2 <F_hat_i, F_hat_j>, 1e-9)):

    d+(i) = mean over P+ of dist,  d-(i) = mean over P- of dist,
    L_i = max(0, d+(i) - d-(i) + m),  L_SGT = mean of L_i over boundary patches (0 if none).

How it is computed (the reference code multiplies F_hat by an unfolded B x C x h x w x K^2
copy of itself, which costs K^2 times the feature map in memory and time):

- Distances depend on pairs, and the pair (i, i + o) is the pair (i + o, i) seen from the
  other end, so only the (K^2 - 1) / 2 offsets of one half-plane are evaluated as dot
  products over channels; the other half are shifted copies of those B x h x w maps. The
  anchor's cosine with itself is (||F|| / max(||F||, eps))^2, exactly 1 for any non-zero
  feature (distance sqrt(1e-9), no gradient), without the rounding noise of a dot product.
- Each dot product is taken between two slices (views) of F_hat, one row block at a time,
  so the only feature-sized temporary is one block (a few MB, cache resident).
- A custom autograd Function returns the gradient in closed form. With a_o(i) = dL/dcos_o(i)
  summed over both ends of each pair into A_o (o in the half-plane), the gradient w.r.t. F_hat is
      2 a_0(i) F_hat(i) + sum_o [A_o(i) F_hat(i + o) + A_o(i - o) F_hat(i - o)]
  i.e. two fused multiply-adds (slices again, row-blocked) per half-plane offset; the
  normalisation's gradient (g - F_hat <F_hat, g>) / ||F|| is applied in place.
- Beyond the feature map, its normalised copy and its gradient, memory is O(K^2 * B * h * w)
  for the per-offset scalar maps (distance, masks, coefficients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fsre_lightning.cityscapes import VOID
from fsre_lightning.config.checks import require
from fsre_lightning.loss_config import BORDERS, check_sgt_options
from fsre_lightning.losses.segmentation import _check_integer_labels

# Lower bound inside the square root: keeps the distance differentiable at 0.
DIST_EPS = 1e-9
# Eps of the channel-norm division (F.normalize's default).
NORM_EPS = 1e-12
# Feature elements per row block on CPU (B x C x rows x w); ~2.5 MB of float32 stays in cache.
_CPU_BLOCK_ELEMENTS = 640 * 1024

Offset = tuple[int, int]


def _half_offsets(kernel_size: int) -> list[Offset]:
    """Offsets (dy, dx) of one half of the K x K window: dy > 0, or dy == 0 and dx > 0."""
    p = kernel_size // 2
    return [
        (dy, dx)
        for dy in range(0, p + 1)
        for dx in range(-p, p + 1)
        if dy > 0 or (dy == 0 and dx > 0)
    ]


def _pair_region(h: int, w: int, dy: int, dx: int) -> tuple[int, int, int, int]:
    """Anchor rows [0, h - dy) and columns [x0, x1) whose partner (y + dy, x + dx) is inside."""
    return 0, h - dy, max(0, -dx), w - max(0, dx)


def _block_rows(fh: torch.Tensor) -> int:
    b, c, h, w = fh.shape
    return max(1, min(h, _CPU_BLOCK_ELEMENTS // max(1, b * c * w)))


def _row_blocked(t: torch.Tensor) -> bool:
    """Whether to evaluate offset by offset over row blocks (CPU, eager) or as one expression
    per offset over the whole map (GPUs, where cache blocking gains nothing and every block is
    a kernel launch, and torch.compile, which fuses the offsets into a few kernels and cannot
    trace writes into `out=` views)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _channel_dots(a: torch.Tensor, b: torch.Tensor, offsets: list[Offset]) -> torch.Tensor:
    """out[k, n, y, x] = <a[n, :, y, x], b[n, :, y + dy_k, x + dx_k]>, 0 where off-image.

    On CPU each product is taken between two slices (views), one row block at a time, so the
    only temporary of the features' kind is one block. Otherwise `b` is zero-padded once and
    each offset is one product with a shifted view of it.
    """
    n, _, h, w = a.shape
    if not _row_blocked(a):
        p = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
        padded = F.pad(b, [p, p, p, p]) if p else b
        return torch.stack([(a * _shift(padded, dy, dx, p)).sum(dim=1) for dy, dx in offsets])
    out = a.new_zeros((len(offsets), n, h, w))
    rows = _block_rows(a)
    for r0 in range(0, h, rows):
        for k, (dy, dx) in enumerate(offsets):
            _, y_end, x0, x1 = _pair_region(h, w, dy, dx)
            r1 = min(r0 + rows, y_end)
            if r1 <= r0 or x1 <= x0:
                continue
            anchor = a[:, :, r0:r1, x0:x1]
            partner = b[:, :, r0 + dy : r1 + dy, x0 + dx : x1 + dx]
            torch.sum(anchor * partner, dim=1, out=out[k, :, r0:r1, x0:x1])
    return out


def _shift(maps: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """out[..., y, x] = maps[..., y + dy, x + dx], 0 outside; `maps` is zero-padded by `pad`."""
    h, w = maps.shape[-2] - 2 * pad, maps.shape[-1] - 2 * pad
    return maps[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


class _SGTLoss(torch.autograd.Function):
    """Forward: normalisation and loss; backward: the closed-form gradient of both."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        features: torch.Tensor,
        labels: torch.Tensor,
        kernel_size: int,
        margin: float,
        threshold: int,
        ignore_index: int,
        outside_negative: bool,
    ) -> torch.Tensor:
        b, _, h, w = features.shape
        p = kernel_size // 2
        half = _half_offsets(kernel_size)
        # F_hat = F / max(||F||, eps), as F.normalize.
        norm = torch.linalg.vector_norm(features, dim=1, keepdim=True)
        denom = norm.clamp(min=NORM_EPS)
        fh = features / denom
        # The anchor with itself: <F_hat, F_hat> = (||F|| / max(||F||, eps))^2, exactly 1 (so
        # the distance is exactly sqrt(1e-9)) unless the feature is (near) zero. Computing it
        # as a dot product would only add rounding noise (2 - 2 cos ~ 1e-7 in float32).
        cos_self = (norm / denom).squeeze(1).square()
        cos_pairs = _channel_dots(fh, fh, half)
        cos_pad = F.pad(cos_pairs, [p, p, p, p])
        # Outside the image: void (in neither set), or a label of no class (a negative whose
        # cosine is the zero padding's: distance sqrt(2), and no gradient, since the backward
        # pass only visits pairs inside the image).
        outside = (-1 if ignore_index != -1 else -2) if outside_negative else ignore_index
        lab_pad = labels.new_full((b, h + 2 * p, w + 2 * p), outside)
        lab_pad[:, p : p + h, p : p + w] = labels

        # Every offset of the window, in the order [anchor, half..., mirrored half...].
        full: list[Offset] = [(0, 0), *half, *[(-dy, -dx) for dy, dx in half]]
        n_half = len(half)
        cos_maps = [cos_self, *cos_pairs]
        for k, (dy, dx) in enumerate(half):
            # cos_{-o}(i) = <fh(i), fh(i - o)> = cos_o(i - o)
            cos_maps.append(_shift(cos_pad[k], -dy, -dx, p))
        cos = torch.stack(cos_maps)  # K^2 x B x h x w
        neighbour = torch.stack([_shift(lab_pad, dy, dx, p) for dy, dx in full])

        anchor_valid = labels != ignore_index
        pos = (neighbour == labels) & anchor_valid
        neg = (neighbour != labels) & (neighbour != ignore_index) & anchor_valid
        sq = 2 - 2 * cos
        dist = sq.clamp(min=DIST_EPS).sqrt()
        n_pos = pos.sum(dim=0)
        n_neg = neg.sum(dim=0)
        boundary = (n_pos >= threshold) & (n_neg >= threshold)
        n_boundary = boundary.sum().clamp(min=1).to(fh.dtype)
        inv_pos = 1.0 / n_pos.clamp(min=1).to(fh.dtype)
        inv_neg = 1.0 / n_neg.clamp(min=1).to(fh.dtype)
        d_pos = (dist * pos).sum(dim=0) * inv_pos
        d_neg = (dist * neg).sum(dim=0) * inv_neg
        hinge = d_pos - d_neg + margin
        per_anchor = torch.where(boundary, hinge.clamp(min=0), torch.zeros_like(hinge))
        loss = per_anchor.sum() / n_boundary

        if ctx.needs_input_grad[0]:
            # dL/d dist_o(i) for every offset, then through sqrt(clamp(2 - 2 cos)).
            weight = (boundary & (hinge > 0)).to(fh.dtype) / n_boundary
            d_dist = weight * (pos * inv_pos - neg * inv_neg)
            d_cos = torch.where(sq >= DIST_EPS, -d_dist / dist, torch.zeros_like(dist))
            # Fold both ends of each pair onto the half-plane offset o:
            # A_o(i) = a_o(i) + a_{-o}(i + o).
            d_cos_pad = F.pad(d_cos[1 + n_half :], [p, p, p, p])
            coeff = d_cos[: 1 + n_half].clone()
            for k, (dy, dx) in enumerate(half):
                coeff[k + 1] += _shift(d_cos_pad[k], dy, dx, p)
            ctx.save_for_backward(fh, norm, coeff)
            ctx.kernel_size = kernel_size
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        fh, norm, coeff = ctx.saved_tensors
        half = _half_offsets(ctx.kernel_size)
        coeff = coeff * grad_output
        # The anchor with itself: d<fh(i), fh(i)> / d fh(i) = 2 fh(i) (coeff[0] is 0 unless the
        # feature is below the normalisation eps, where the clamp in the sqrt is not active).
        grad = fh * (2 * coeff[0]).unsqueeze(1)
        # Each half-plane pair (i, i + o): fh(i) += A_o(i) fh(i + o), fh(i + o) += A_o(i) fh(i).
        if _row_blocked(fh):
            _pair_gradients_blocked(grad, fh, coeff, half)
        else:
            grad = grad + _pair_gradients(fh, coeff, half)
        # Through F_hat = F / max(||F||, eps): (g - F_hat <F_hat, g>) / ||F|| where the norm is
        # above eps, g / eps where the clamp holds it (F.normalize's autograd gradient).
        radial = _channel_dots(fh, grad, [(0, 0)])[0].unsqueeze(1)
        radial = torch.where(norm >= NORM_EPS, radial, torch.zeros_like(radial))
        grad.addcmul_(fh, radial, value=-1).div_(norm.clamp(min=NORM_EPS))
        return grad, None, None, None, None, None, None


def _pair_gradients_blocked(
    grad: torch.Tensor, fh: torch.Tensor, coeff: torch.Tensor, half: list[Offset]
) -> None:
    """Add both ends' pair gradients into `grad` in place: one fused multiply-add per end and
    half-plane offset, one row block at a time (pairs with an end off the image add nothing)."""
    _, _, h, w = fh.shape
    rows = _block_rows(fh)
    for r0 in range(0, h, rows):
        for k, (dy, dx) in enumerate(half):
            _, y_end, x0, x1 = _pair_region(h, w, dy, dx)
            r1 = min(r0 + rows, y_end)
            if r1 <= r0 or x1 <= x0:
                continue
            a = coeff[k + 1, :, r0:r1, x0:x1].unsqueeze(1)
            anchor = (slice(None), slice(None), slice(r0, r1), slice(x0, x1))
            partner = (slice(None), slice(None), slice(r0 + dy, r1 + dy), slice(x0 + dx, x1 + dx))
            grad[anchor].addcmul_(a, fh[partner])
            grad[partner].addcmul_(a, fh[anchor])


def _pair_gradients(fh: torch.Tensor, coeff: torch.Tensor, half: list[Offset]) -> torch.Tensor:
    """The same sum as `_pair_gradients_blocked`, out of place, over zero-padded maps: the
    anchor end reads the partner through a shifted view of padded F_hat (0 off the image), the
    partner end reads A_o F_hat through a view shifted the other way."""
    p = max(max(abs(dy), abs(dx)) for dy, dx in half)
    fh_pad = F.pad(fh, [p, p, p, p])
    total = torch.zeros_like(fh)
    for k, (dy, dx) in enumerate(half):
        a = coeff[k + 1].unsqueeze(1)
        total = total + a * _shift(fh_pad, dy, dx, p)
        total = total + _shift(F.pad(a * fh, [p, p, p, p]), -dy, -dx, p)
    return total


def sgt_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    kernel_size: int = 5,
    margin: float = 0.3,
    threshold: int | None = None,
    ignore_index: int = VOID,
    border: str = "reference",
) -> torch.Tensor:
    """Semantics-guided triplet loss of one feature map (the paper's eqs. 5-8), a scalar.

    `features` is B x C x h x w; `labels` B x h x w integer class ids at the same size
    (`ignore_index`, 255, is void). `threshold` None means K - 1. `border`: "reference"
    (outside-image neighbours are negatives at distance sqrt(2), as in the published code that
    produced the paper's numbers) or "exclude" (they are in neither set). Returns the mean hinge
    over boundary patches, or 0 (still attached to the graph of `features`) when there are none.
    Half-precision features are evaluated in float32.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be B x C x h x w, got shape {tuple(features.shape)}")
    if labels.dim() != 3:
        raise ValueError(f"labels must be B x h x w, got shape {tuple(labels.shape)}")
    _check_integer_labels(labels)
    expected = (features.shape[0], *features.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must be B x h x w = {expected} (the features' batch and size), "
            f"got shape {tuple(labels.shape)}; resize them with resize_labels"
        )
    k, m, t = check_sgt_options(kernel_size, margin, threshold)
    require(border in BORDERS, "border", border, f"one of {', '.join(BORDERS)}")

    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return _SGTLoss.apply(features, labels.to(torch.long), k, m, t, int(ignore_index),
                          border == "reference")
