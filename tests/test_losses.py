"""Photometric, smoothness and segmentation losses against direct implementations of
the formulas (docs/design.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.filters import box_blur

from fsre_lightning.losses import (
    min_reprojection_loss,
    photometric_loss,
    resize_labels,
    segmentation_loss,
    smoothness_loss,
    ssim,
)
from fsre_lightning.losses.photometric import box_filter3x3


def _direct_ssim(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Monodepth2's SSIM with explicit loops over the 3 x 3 window on reflection-padded arrays."""
    xn, yn = x.double().numpy(), y.double().numpy()
    pad = ((0, 0), (0, 0), (1, 1), (1, 1))
    xp, yp = np.pad(xn, pad, mode="reflect"), np.pad(yn, pad, mode="reflect")
    h, w = xn.shape[-2:]
    mu_x = np.zeros_like(xn)
    mu_y = np.zeros_like(xn)
    e_xx = np.zeros_like(xn)
    e_yy = np.zeros_like(xn)
    e_xy = np.zeros_like(xn)
    for dy in range(3):
        for dx in range(3):
            wx = xp[..., dy : dy + h, dx : dx + w]
            wy = yp[..., dy : dy + h, dx : dx + w]
            mu_x += wx / 9
            mu_y += wy / 9
            e_xx += wx * wx / 9
            e_yy += wy * wy / 9
            e_xy += wx * wy / 9
    c1, c2 = 0.01**2, 0.03**2
    sig_x, sig_y, sig_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    n = (2 * mu_x * mu_y + c1) * (2 * sig_xy + c2)
    d = (mu_x**2 + mu_y**2 + c1) * (sig_x + sig_y + c2)
    return np.clip((1 - n / d) / 2, 0, 1)


def test_box_filter_matches_reflection_padded_average_pool_and_kornia() -> None:
    x = torch.rand(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    ours = box_filter3x3(x)
    ref = F.avg_pool2d(torch.nn.ReflectionPad2d(1)(x), kernel_size=3, stride=1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, box_blur(x, (3, 3), border_type="reflect"))
    # Corner by hand: reflection mirrors row/column 1 into the padding.
    corner = x[0, 0, :2, :2].detach()
    by_hand = (corner[0, 0] + 2 * corner[0, 1] + 2 * corner[1, 0] + 4 * corner[1, 1]) / 9
    torch.testing.assert_close(ours[0, 0, 0, 0].detach(), by_hand)
    grad = torch.rand_like(ours)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(box_filter3x3, (x,))
    with pytest.raises(ValueError, match="H, W >= 2"):
        box_filter3x3(torch.rand(1, 1, 1, 5))


def test_ssim_matches_direct_box_window_implementation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 3, 6, 7, generator=gen, dtype=torch.float64)).clamp(0, 1)
    out = ssim(x, y)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), _direct_ssim(x, y), rtol=1e-10, atol=1e-12)
    # Unrelated images: larger dissimilarity, still within [0, 1].
    z = torch.rand(2, 3, 6, 7, generator=gen, dtype=torch.float64)
    far = ssim(x, z)
    np.testing.assert_allclose(far.numpy(), _direct_ssim(x, z), rtol=1e-10, atol=1e-12)
    assert far.mean() > out.mean()
    assert float(far.min()) >= 0 and float(far.max()) <= 1


def test_ssim_float32_and_identical_images() -> None:
    x = torch.rand(1, 3, 8, 10)
    torch.testing.assert_close(ssim(x, x), torch.zeros_like(x), atol=1e-6, rtol=0)
    y = torch.rand(1, 3, 8, 10)
    expected = torch.from_numpy(_direct_ssim(x, y)).float()
    torch.testing.assert_close(ssim(x, y), expected, atol=1e-5, rtol=1e-4)


def test_ssim_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="y"):
        ssim(torch.rand(1, 3, 8, 10), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match="x"):
        ssim(torch.rand(3, 8, 10), torch.rand(3, 8, 10))


def test_photometric_loss_matches_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 3, 6, 8, generator=gen, dtype=torch.float64)
    target = torch.rand(2, 3, 6, 8, generator=gen, dtype=torch.float64)
    out = photometric_loss(pred, target)
    assert out.shape == (2, 1, 6, 8)
    ssim_term = torch.from_numpy(_direct_ssim(pred, target)).mean(1, keepdim=True)
    l1 = (pred - target).abs().mean(1, keepdim=True)
    torch.testing.assert_close(out, 0.85 * ssim_term + 0.15 * l1)
    torch.testing.assert_close(photometric_loss(pred, target, alpha=0.0), l1)
    torch.testing.assert_close(photometric_loss(pred, target, alpha=1.0), ssim_term)
    assert float(photometric_loss(pred, pred).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="alpha"):
        photometric_loss(pred, target, alpha=1.5)
    with pytest.raises(ValueError, match="target"):
        photometric_loss(pred, target[:, :2])


def _map(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, 1, 2, 2)


def test_min_reprojection_picks_minimum_and_builds_automask() -> None:
    reprojection = [_map([[0.5, 0.1], [0.9, 0.3]]), _map([[0.4, 0.6], [0.8, 0.7]])]
    identity = [_map([[0.2, 0.9], [0.1, 0.9]]), _map([[0.9, 0.9], [0.95, 0.25]])]
    loss, mask = min_reprojection_loss(reprojection, identity, noise_std=0.0)
    per_pixel = torch.tensor([0.2, 0.1, 0.1, 0.25], dtype=torch.float64)
    torch.testing.assert_close(loss, per_pixel.mean())
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 2, 2)
    assert mask.flatten().tolist() == [False, True, False, False]

    loss_all, mask_all = min_reprojection_loss(reprojection)
    torch.testing.assert_close(loss_all, torch.tensor([0.4, 0.1, 0.8, 0.3]).double().mean())
    assert bool(mask_all.all()) and mask_all.shape == (1, 1, 2, 2)


def test_min_reprojection_exact_ties_go_to_identity_without_noise() -> None:
    reprojection = [_map([[0.3, 0.3], [0.3, 0.3]])]
    identity = [_map([[0.3, 0.5], [0.1, 0.3]])]
    loss, mask = min_reprojection_loss(reprojection, identity, noise_std=0.0)
    assert mask.flatten().tolist() == [False, True, False, False]
    torch.testing.assert_close(loss, torch.tensor([0.3, 0.3, 0.1, 0.3]).double().mean())


def test_min_reprojection_noise_comes_from_the_generator() -> None:
    reprojection = [_map([[0.3, 0.3], [0.3, 0.3]])]
    identity = [_map([[0.3, 0.3], [0.3, 0.3]]), _map([[0.3, 0.3], [0.3, 0.3]])]
    std = 1e-3
    loss, mask = min_reprojection_loss(
        reprojection, identity, noise_std=std, generator=torch.Generator().manual_seed(7)
    )
    noise = torch.randn((1, 2, 2, 2), generator=torch.Generator().manual_seed(7)).double()
    noisy_identity = torch.cat(identity, 1) + std * noise
    expected = torch.minimum(noisy_identity.amin(1, keepdim=True), reprojection[0])
    torch.testing.assert_close(loss, expected.mean())
    assert torch.equal(mask, noisy_identity.amin(1, keepdim=True) > reprojection[0])
    # The noise is really there: the result differs from the noise-free minimum, by ~std.
    assert float(loss) != pytest.approx(0.3, abs=1e-9)
    assert abs(float(loss) - 0.3) < 5 * std
    # Same seed, same result.
    loss2, mask2 = min_reprojection_loss(
        reprojection, identity, noise_std=std, generator=torch.Generator().manual_seed(7)
    )
    assert float(loss2) == float(loss) and torch.equal(mask2, mask)


def test_min_reprojection_validates_inputs() -> None:
    with pytest.raises(ValueError, match="reprojection"):
        min_reprojection_loss([])
    with pytest.raises(ValueError, match="reprojection"):
        min_reprojection_loss([torch.rand(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="identity"):
        min_reprojection_loss([torch.rand(1, 1, 4, 4)], [torch.rand(1, 1, 4, 5)])
    with pytest.raises(ValueError, match="noise_std"):
        min_reprojection_loss([torch.rand(1, 1, 4, 4)], noise_std=-1.0)


def _direct_smoothness(disp: torch.Tensor, image: torch.Tensor) -> float:
    d = disp.double().numpy()
    im = image.double().numpy()
    b, _, h, w = d.shape
    total_x = total_y = 0.0
    for n in range(b):
        dn = d[n, 0] / (d[n, 0].mean() + 1e-7)
        for y in range(h):
            for x in range(w - 1):
                wgt = np.exp(-np.abs(im[n, :, y, x] - im[n, :, y, x + 1]).mean())
                total_x += abs(dn[y, x] - dn[y, x + 1]) * wgt
        for y in range(h - 1):
            for x in range(w):
                wgt = np.exp(-np.abs(im[n, :, y, x] - im[n, :, y + 1, x]).mean())
                total_y += abs(dn[y, x] - dn[y + 1, x]) * wgt
    return total_x / (b * h * (w - 1)) + total_y / (b * (h - 1) * w)


def test_smoothness_matches_direct_implementation() -> None:
    gen = torch.Generator().manual_seed(2)
    disp = torch.rand(2, 1, 5, 7, generator=gen, dtype=torch.float64) + 0.1
    image = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    out = smoothness_loss(disp, image)
    assert out.dim() == 0
    assert float(out) == pytest.approx(_direct_smoothness(disp, image), rel=1e-10)
    # Mean normalisation: scaling the disparity does not change the loss.
    assert float(smoothness_loss(3.0 * disp, image)) == pytest.approx(float(out), rel=1e-6)
    # A constant disparity is perfectly smooth.
    assert float(smoothness_loss(torch.ones_like(disp), image)) == 0.0


def test_smoothness_rejects_image_of_another_size() -> None:
    with pytest.raises(ValueError, match="image"):
        smoothness_loss(torch.rand(1, 1, 6, 8), torch.rand(1, 3, 12, 16))


def test_segmentation_loss_equals_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 19, 6, 8, generator=gen)
    labels = torch.randint(0, 19, (2, 6, 8), generator=gen)
    labels[0, :2] = 255
    out = segmentation_loss(logits, labels)
    torch.testing.assert_close(out, F.cross_entropy(logits, labels, ignore_index=255))
    # Other integer dtypes are accepted.
    torch.testing.assert_close(segmentation_loss(logits, labels.to(torch.uint8)), out)


def test_segmentation_loss_keeps_channels_last_logits_and_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 19, 6, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 19, (2, 6, 8), generator=gen)
    labels[1, :, :3] = 255
    nhwc = logits.contiguous(memory_format=torch.channels_last).requires_grad_()
    nchw = logits.clone().requires_grad_()
    out, ref = segmentation_loss(nhwc, labels), segmentation_loss(nchw, labels)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    out.backward()
    ref.backward()
    torch.testing.assert_close(nhwc.grad, nchw.grad, rtol=1e-14, atol=1e-16)
    assert nhwc.grad.is_contiguous(memory_format=torch.channels_last)


def test_segmentation_loss_all_void_is_zero_with_a_graph() -> None:
    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255, dtype=torch.long)
    out = segmentation_loss(logits, labels)
    assert torch.isfinite(out) and out.item() == 0.0
    assert out.grad_fn is not None
    out.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_segmentation_loss_validates_labels() -> None:
    logits = torch.randn(2, 19, 4, 4)
    with pytest.raises(ValueError, match="labels"):
        segmentation_loss(logits, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        segmentation_loss(logits, torch.zeros(2, 4, 4))


def test_resize_labels_is_nearest_and_keeps_ids() -> None:
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 19, (2, 12, 20), generator=gen)
    labels[0, 0, 0] = 255
    out = resize_labels(labels, (5, 7))
    assert out.dtype == torch.long and out.shape == (2, 5, 7)
    rows = torch.tensor([int(i * 12 / 5) for i in range(5)])
    cols = torch.tensor([int(j * 20 / 7) for j in range(7)])
    assert torch.equal(out, labels[:, rows][:, :, cols])
    assert out[0, 0, 0] == 255
    # Downsampling by 2 keeps the top-left pixel of each 2 x 2 cell; same size is a no-op.
    assert torch.equal(resize_labels(labels, (6, 10)), labels[:, ::2, ::2])
    assert torch.equal(resize_labels(labels.to(torch.uint8), (12, 20)), labels)
    with pytest.raises(ValueError, match="labels"):
        resize_labels(labels[0], (6, 10))
