"""Camera geometry for view synthesis (docs/design.md sections 3.2 to 3.5).

Conventions: images are B x C x H x W; intrinsics K and inv_K are B x 4 x 4 (pixel units at the
resolution of the image they are used with); a transform T (B x 4 x 4) maps points of the target
camera (frame 0) into the source camera, so `warp(source, depth_0, T, K, inv_K)` resamples the
source frame into the target view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry import create_meshgrid
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

# z below this is treated as on the camera plane, so projection never divides by zero.
_Z_EPS = 1e-7
# Image sizes of one pixel: kornia's guard against dividing by W - 1 = 0.
_PIXEL_EPS = 1e-14
# Grid coordinates are clamped to [-_GRID_LIMIT, _GRID_LIMIT]: with border padding every
# coordinate beyond +-1 samples the border with zero gradient, so the clamp changes nothing
# but keeps the sampler's index arithmetic finite (see `sample`).
_GRID_LIMIT = 2.0


def disp_to_depth(
    disp: torch.Tensor, min_depth: float = 0.1, max_depth: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map the network's sigmoid output to (scaled disparity, depth) in [min_depth, max_depth]."""
    min_disp = 1.0 / max_depth
    max_disp = 1.0 / min_depth
    scaled = min_disp + (max_disp - min_disp) * disp
    return scaled, 1.0 / scaled


def intrinsics_matrix(
    height: int,
    width: int,
    normalized: tuple[float, float, float, float],
    flip: bool = False,
) -> torch.Tensor:
    """4 x 4 pixel intrinsics from normalised (fx, fy, cx, cy) at one resolution (KITTI's are
    `data.kitti_layout.KITTI_INTRINSICS`).

    A horizontal flip mirrors the principal point (cx -> 1 - cx).
    """
    fx, fy, cx, cy = normalized
    if flip:
        cx = 1.0 - cx
    K = torch.eye(4)
    K[0, 0], K[0, 2] = fx * width, cx * width
    K[1, 1], K[1, 2] = fy * height, cy * height
    return K


def transformation_from_parameters(
    axisangle: torch.Tensor, translation: torch.Tensor, invert: bool = False
) -> torch.Tensor:
    """B x 4 x 4 rigid transform [R | t] from axis-angle and translation (each B x 3).

    `invert=True` returns the exact inverse [R^T | -R^T t]; the pose network predicts the
    motion of the pair in the order it was given, and the caller inverts for past frames.
    Computed in float32 (float64 stays) under any autocast: a bfloat16 rotation is off by
    ~4e-3 rad, pixels at KITTI's focal length.
    """
    with torch.autocast(axisangle.device.type, enabled=False):
        return _transformation(axisangle, translation, invert)


def _transformation(
    axisangle: torch.Tensor, translation: torch.Tensor, invert: bool
) -> torch.Tensor:
    low = (torch.float16, torch.bfloat16)
    axisangle = axisangle.reshape(-1, 3)
    translation = translation.reshape(-1, 3)
    if axisangle.dtype in low or translation.dtype in low:
        axisangle, translation = axisangle.float(), translation.float()
    R = axis_angle_to_rotation_matrix(axisangle)
    t = translation.unsqueeze(-1)
    if invert:
        R = R.transpose(1, 2)
        t = -R @ t
    bottom = torch.zeros_like(R[:, :1, :])
    top = torch.cat([R, t], dim=2)
    last = torch.cat([bottom, torch.ones_like(t[:, :1, :])], dim=2)
    return torch.cat([top, last], dim=1)


def pixel_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """1 x 3 x (H*W) homogeneous pixel coordinates (u, v, 1), row-major."""
    grid = create_meshgrid(height, width, normalized_coordinates=False, device=device)
    uv = grid.reshape(1, -1, 2).transpose(1, 2)
    return torch.cat([uv, torch.ones_like(uv[:, :1])], dim=1)


def backproject(depth: torch.Tensor, inv_K: torch.Tensor) -> torch.Tensor:
    """Lift every pixel to a 3-D point in its camera: B x 1 x H x W depth -> B x 4 x (H*W)."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be B x 1 x H x W, got shape {tuple(depth.shape)}")
    b, _, h, w = depth.shape
    pix = pixel_grid(h, w, depth.device).to(depth.dtype)
    rays = inv_K[:, :3, :3] @ pix
    points = rays * depth.reshape(b, 1, -1)
    return torch.cat([points, torch.ones_like(points[:, :1])], dim=1)


def project(
    points: torch.Tensor, K: torch.Tensor, T: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Project B x 4 x N camera points, moved by T, into a sampling grid B x H x W x 2.

    The grid is in grid_sample's [-1, 1] coordinates for align_corners=True.
    """
    cam = (K @ T)[:, :3, :] @ points
    uv = cam[:, :2] / (cam[:, 2:3] + _Z_EPS)
    uv = uv.transpose(1, 2).reshape(points.shape[0], height, width, 2)
    return to_grid_coordinates(uv, height, width)


def to_grid_coordinates(uv: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates (..., 2) as (u, v) to grid_sample's [-1, 1] for align_corners=True.

    kornia's `normalize_pixel_coordinates` computes the same, but builds its factors as a new
    tensor on every call: on a GPU an upload that waits for the queue, twice per scale and
    source batch in every step. Python scalars are folded into the kernels instead.
    """
    sx = 2.0 / max(width - 1, _PIXEL_EPS)
    sy = 2.0 / max(height - 1, _PIXEL_EPS)
    return torch.stack([uv[..., 0] * sx - 1.0, uv[..., 1] * sy - 1.0], dim=-1)


def warp(
    source: torch.Tensor,
    depth: torch.Tensor,
    T: torch.Tensor,
    K: torch.Tensor,
    inv_K: torch.Tensor,
) -> torch.Tensor:
    """Synthesise the target view from `source` given the target's depth and T (target->source).

    Bilinear sampling with border padding and align_corners=True (the paper's eq. 1).
    """
    if source.shape[-2:] != depth.shape[-2:]:
        raise ValueError(
            f"source {tuple(source.shape)} and depth {tuple(depth.shape)} differ in size"
        )
    h, w = depth.shape[-2:]
    return sample(source, project(backproject(depth, inv_K), K, T, h, w))


def sample(source: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear `grid_sample` with border padding and align_corners=True that no grid value can
    crash: a NaN coordinate samples NaN, an infinite one the border (docs/design.md section 6).

    grid_sample computes memory addresses from the coordinates; PyTorch's CPU backward (2.14)
    segfaults on a NaN one (border and reflection padding), and Inductor's decomposition
    gathers with indices cast from them. So the kernel only ever sees finite coordinates in
    [-2, 2] (where the border padding makes the clamp exact, value and gradient), and the
    samples of NaN coordinates are set to NaN afterwards, so that a diverged depth or pose
    still shows as a non-finite loss to `model.nonfinite`. Two fused element-wise passes, no
    host read.
    """
    bad = torch.isnan(grid).any(dim=-1).unsqueeze(1)  # B x 1 x H x W
    safe = torch.nan_to_num(grid, nan=0.0).clamp(-_GRID_LIMIT, _GRID_LIMIT)
    out = F.grid_sample(source, safe, mode="bilinear", padding_mode="border", align_corners=True)
    return out.masked_fill(bad, float("nan"))


def warp_many(
    sources: torch.Tensor,
    depth: torch.Tensor,
    transforms: torch.Tensor,
    K: torch.Tensor,
    inv_K: torch.Tensor,
) -> torch.Tensor:
    """`warp` of S source frames with one target depth: S x B x C x H x W.

    `sources` is S x B x C x H x W and `transforms` S x B x 4 x 4. The back-projection of the
    depth is shared by the S sources and all of them are sampled in one grid_sample call;
    each output equals `warp(sources[i], depth, transforms[i], K, inv_K)`.
    """
    if sources.dim() != 5 or sources.shape[-2:] != depth.shape[-2:]:
        raise ValueError(
            f"sources must be S x B x C x H x W at the depth's size {tuple(depth.shape[-2:])}, "
            f"got shape {tuple(sources.shape)}"
        )
    n, b, c, h, w = sources.shape
    points = backproject(depth, inv_K)
    grid = project(
        points.repeat(n, 1, 1), K.repeat(n, 1, 1), transforms.reshape(n * b, 4, 4), h, w
    )
    return sample(sources.reshape(n * b, c, h, w), grid).reshape(n, b, c, h, w)
