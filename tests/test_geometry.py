import math

import pytest
import torch
import torch.nn.functional as F

from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.geometry import (
    backproject,
    disp_to_depth,
    intrinsics_matrix,
    project,
    sample,
    transformation_from_parameters,
    warp,
)


def _intrinsics(b: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    K = intrinsics_matrix(h, w, KITTI_INTRINSICS).expand(b, 4, 4).clone()
    return K, torch.linalg.inv(K)


def test_intrinsics_follow_kitti_normalised_values_and_flip() -> None:
    K = intrinsics_matrix(192, 640, KITTI_INTRINSICS)
    assert K[0, 0] == pytest.approx(0.58 * 640)
    assert K[1, 1] == pytest.approx(1.92 * 192)
    assert K[0, 2] == pytest.approx(320) and K[1, 2] == pytest.approx(96)
    flipped = intrinsics_matrix(192, 640, normalized=(0.58, 1.92, 0.3, 0.5), flip=True)
    assert flipped[0, 2] == pytest.approx(0.7 * 640)


def test_disp_to_depth_range() -> None:
    scaled, depth = disp_to_depth(torch.tensor([0.0, 1.0]), 0.1, 100.0)
    assert depth[0] == pytest.approx(100.0) and depth[1] == pytest.approx(0.1)
    assert torch.allclose(scaled * depth, torch.ones(2))


def test_transformation_matches_rodrigues_and_inverts_exactly() -> None:
    axisangle = torch.tensor([[0.0, 0.0, math.pi / 2]])
    translation = torch.tensor([[1.0, 2.0, 3.0]])
    M = transformation_from_parameters(axisangle, translation)
    expected_R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(M[0, :3, :3], expected_R, atol=1e-6)
    assert torch.allclose(M[0, :3, 3], translation[0])
    g = torch.Generator().manual_seed(0)
    aa, t = torch.randn(4, 3, generator=g) * 0.2, torch.randn(4, 3, generator=g)
    inv = transformation_from_parameters(aa, t, invert=True)
    eye = transformation_from_parameters(aa, t) @ inv
    assert torch.allclose(eye, torch.eye(4).expand(4, 4, 4), atol=1e-5)


def test_backproject_project_roundtrip_is_identity_grid() -> None:
    b, h, w = 2, 8, 12
    K, inv_K = _intrinsics(b, h, w)
    depth = torch.rand(b, 1, h, w) * 10 + 1
    grid = project(backproject(depth, inv_K), K, torch.eye(4).expand(b, 4, 4), h, w)
    xs = torch.linspace(-1, 1, w).view(1, 1, w).expand(b, h, w)
    ys = torch.linspace(-1, 1, h).view(1, h, 1).expand(b, h, w)
    assert torch.allclose(grid[..., 0], xs, atol=1e-5)
    assert torch.allclose(grid[..., 1], ys, atol=1e-5)


def test_warp_with_identity_pose_and_constant_depth_returns_source() -> None:
    b, h, w = 2, 64, 192
    K, inv_K = _intrinsics(b, h, w)
    source = torch.rand(b, 3, h, w)
    depth = torch.full((b, 1, h, w), 7.5)
    out = warp(source, depth, torch.eye(4).expand(b, 4, 4), K, inv_K)
    assert torch.allclose(out, source, atol=1e-4)


def test_warp_translation_shifts_by_disparity() -> None:
    # A camera moved 1 m to the right sees a fronto-parallel plane at depth Z shifted by
    # fx / Z pixels: source(u - fx * tx / Z) lands on target pixel u.
    b, h, w = 1, 32, 96
    K, inv_K = _intrinsics(b, h, w)
    Z, tx = 10.0, 1.0
    shift = float(K[0, 0, 0]) * tx / Z
    u = torch.arange(w, dtype=torch.float32)
    source = (u / w).view(1, 1, 1, w).expand(b, 3, h, w).contiguous()
    T = torch.eye(4).expand(b, 4, 4).clone()
    T[:, 0, 3] = -tx  # target points expressed in a camera 1 m to the right
    out = warp(source, torch.full((b, 1, h, w), Z), T, K, inv_K)
    expected = ((u - shift).clamp(0, w - 1) / w).view(1, 1, 1, w).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-4)


def test_grid_coordinates_equal_kornias_normalisation() -> None:
    from kornia.geometry.conversions import normalize_pixel_coordinates

    from fsre_lightning.geometry import to_grid_coordinates

    uv = torch.rand(2, 5, 7, 2, dtype=torch.float64) * torch.tensor([6.0, 4.0]) * 1.5 - 1
    torch.testing.assert_close(to_grid_coordinates(uv, 5, 7),
                               normalize_pixel_coordinates(uv, 5, 7), rtol=1e-15, atol=1e-15)
    corners = torch.tensor([[0.0, 0.0], [6.0, 4.0]])
    assert to_grid_coordinates(corners, 5, 7).tolist() == [[-1.0, -1.0], [1.0, 1.0]]


def test_sample_is_grid_sample_where_the_grid_is_finite_and_never_crashes() -> None:
    """`geometry.sample` gives grid_sample's values and gradients (border padding) for any
    finite grid, far outside the image included; a NaN coordinate samples NaN and an infinite
    one the border, forward and backward, where PyTorch's CPU backward segfaulted on NaN."""
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(2, 5, 7, 2, generator=g, dtype=torch.float64) * 8 - 4).requires_grad_()
    expected = F.grid_sample(source, grid, padding_mode="border", align_corners=True)
    got = sample(source, grid)
    assert torch.equal(got, expected)
    weights = torch.rand(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((expected * weights).sum(), (source, grid))
    assert all(torch.equal(a, b) for a, b in zip(
        grads, torch.autograd.grad((got * weights).sum(), (source, grid)), strict=True))

    bad = grid.detach().clone().requires_grad_()
    with torch.no_grad():
        bad[0, 1, 2, 0] = float("nan")
        bad[1, 3, 4] = float("inf")
    out = sample(source, bad)
    assert out[0, :, 1, 2].isnan().all() and out.isnan().sum() == 3  # one pixel, 3 channels
    border = F.grid_sample(source, torch.ones(1, 1, 1, 2, dtype=torch.float64)[[0, 0]],
                           padding_mode="border", align_corners=True)
    assert torch.equal(out[1, :, 3, 4], border[1, :, 0, 0])
    (out.nan_to_num() * weights).sum().backward()
    assert torch.isfinite(source.grad).all() and bad.grad[0, 1, 2].eq(0).all()
