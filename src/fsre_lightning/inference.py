"""A trained model as a plain inference graph, shared by `predict` and `export`.

`InferenceModel` takes float RGB images in [0, 1] (B x 3 x H x W, H and W multiples of 32) and
returns the disparity and depth of `disp_to_depth` (SPEC section 2), plus segmentation when
asked. The input normalisation ((x - 0.45) / 0.225) is part of the encoder, so it is inside
every exported graph too. `camera_height_scale` turns relative depth into metres from a known
camera height above a flat ground.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from fsre_lightning.checkpointing import CheckpointMismatchError
from fsre_lightning.config import ConfigError
from fsre_lightning.geometry import KITTI_INTRINSICS, disp_to_depth
from fsre_lightning.module import FSREModule

log = logging.getLogger(__name__)

SEG_OUTPUTS = ("labels", "logits")
# Cityscapes train ids taken as the ground plane: road, sidewalk, terrain.
GROUND_CLASSES = (0, 1, 9)


class InferenceModel(nn.Module):
    """image -> (disp, depth) or (disp, depth, segmentation); see the module docstring.

    disp and depth are B x 1 x H x W (depth = 1 / disp, in the training's relative units);
    segmentation is B x H x W int64 train ids (`seg_output="labels"`) or the B x C x H x W
    logits (`"logits"`, what `predict` upsamples before its argmax).
    """

    def __init__(self, net: nn.Module, min_depth: float, max_depth: float,
                 segmentation: bool = False, seg_output: str = "labels") -> None:
        super().__init__()
        if seg_output not in SEG_OUTPUTS:
            raise ValueError(f"seg_output={seg_output!r}: use one of {SEG_OUTPUTS}")
        if segmentation and getattr(net, "seg_decoder", None) is None:
            raise ValueError("the network has no segmentation decoder")
        self.net = net
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.segmentation, self.seg_output = segmentation, seg_output

    @property
    def output_names(self) -> list[str]:
        return ["disp", "depth", *(["segmentation"] if self.segmentation else [])]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(image)
        disp, depth = disp_to_depth(out["disp"][0], self.min_depth, self.max_depth)
        if not self.segmentation:
            return disp, depth
        logits = out["seg_logits"]
        return disp, depth, (logits.argmax(1) if self.seg_output == "labels" else logits)


def load_trained_module(ckpt_path: str | Path, device: torch.device) -> FSREModule:
    """`evaluate.load_module`, with every way a checkpoint can be of another model naming it."""
    from fsre_lightning.evaluate import load_module  # evaluate imports the entry-point stack

    ckpt_path = Path(ckpt_path)
    try:
        return load_module(ckpt_path, device)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{ckpt_path}: {err}") from err
    except (TypeError, KeyError) as err:
        # hyper-parameters this version's networks do not take: another model's checkpoint
        raise CheckpointMismatchError(
            f"{ckpt_path}: its model config does not build with this version of "
            f"fsre_lightning ({type(err).__name__}: {err})") from err


def build_inference_model(module: FSREModule, ckpt_path: str | Path, segmentation: bool,
                          seg_output: str = "labels") -> InferenceModel:
    """The module's depth network as an InferenceModel; a clear error when seg is missing."""
    if segmentation and not module.has_segmentation:
        raise ConfigError(f"segmentation=true but {ckpt_path} has no segmentation decoder "
                          "(a Monodepth2 baseline): use segmentation=false")
    model = InferenceModel(module.net, module.loss_cfg.min_depth, module.loss_cfg.max_depth,
                           segmentation, seg_output)
    return model.eval()


def run_config_value(ckpt_path: str | Path, key: str) -> object | None:
    """`key` of the training run's config.yaml (beside checkpoints/), or None."""
    run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(run_config), key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def training_intrinsics(ckpt_path: str | Path, given: Sequence[float] | None
                        ) -> tuple[float, float, float, float]:
    """Normalised (fx, fy, cx, cy): `given`, else the training run's data.intrinsics, else
    KITTI's."""
    if given is not None:
        fx, fy, cx, cy = (float(v) for v in given)
        return fx, fy, cx, cy
    saved = run_config_value(ckpt_path, "data.intrinsics")
    if not isinstance(saved, list):
        return KITTI_INTRINSICS
    if run_config_value(ckpt_path, "data.intrinsics_units") == "pixels":
        # data=video_folder in pixels: normalised by the training frames' size, if still there
        from fsre_lightning.data.kitti import DataError
        from fsre_lightning.data.video_folder import normalise_intrinsics, scan_sequences

        root = run_config_value(ckpt_path, "data.root")
        try:
            return normalise_intrinsics(saved, "pixels", scan_sequences(Path(str(root))))
        except DataError as err:
            raise ConfigError(f"{ckpt_path} was trained with intrinsics in pixels {saved} and "
                              f"its frames cannot be read ({err}): give intrinsics=[fx, fy, "
                              "cx, cy] normalised by the image width and height") from err
    fx, fy, cx, cy = (float(v) for v in saved)
    return fx, fy, cx, cy


def ground_mask(size: tuple[int, int], labels: torch.Tensor | None = None,
                min_fraction: float = 0.01) -> torch.Tensor:
    """H x W bool mask of pixels taken as flat ground.

    Predicted road/sidewalk/terrain when `labels` has enough of them; otherwise the bottom
    15 % of rows and middle half of columns, which a forward-facing vehicle camera sees as
    road in front of it.
    """
    height, width = size
    if labels is not None:
        mask = torch.isin(labels, torch.tensor(GROUND_CLASSES, device=labels.device))
        if mask.float().mean() >= min_fraction:
            return mask
    mask = torch.zeros(size, dtype=torch.bool)
    mask[int(height * 0.85):, width // 4: width - width // 4] = True
    return mask


def camera_height_scale(depth: torch.Tensor, intrinsics: Sequence[float], camera_height: float,
                        mask: torch.Tensor) -> float:
    """Factor turning `depth` (H x W, relative units) into metres, from the camera height.

    The ground pixels of `mask` are back-projected with the normalised intrinsics; a plane is
    fitted to them (least squares, refitted on the 80 % closest points so that cars and kerbs
    on the mask do not tilt it) and its distance to the camera is the predicted camera height.
    """
    height, width = depth.shape[-2:]
    depth = depth.reshape(height, width).double().cpu()
    mask = mask.reshape(height, width).cpu() & torch.isfinite(depth) & (depth > 0)
    if int(mask.sum()) < 3:
        raise ValueError("fewer than 3 ground pixels: cannot estimate the camera height")
    fx, fy, cx, cy = intrinsics
    # Integer pixel centres, as `geometry.backproject` uses with the same K.
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                          torch.arange(width, dtype=torch.float64), indexing="ij")
    x = (u / width - cx) / fx * depth
    y = (v / height - cy) / fy * depth
    points = torch.stack([x[mask], y[mask], depth[mask]], dim=1)

    def fit(pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centroid = pts.mean(0)
        normal = torch.linalg.svd(pts - centroid, full_matrices=False).Vh[-1]
        return normal, centroid

    normal, centroid = fit(points)
    if len(points) >= 10:
        residual = ((points - centroid) @ normal).abs()
        keep = residual <= torch.quantile(residual, 0.8)
        normal, centroid = fit(points[keep])
    # y points down: a ground plane's normal is close to the y axis. Otherwise (a wall, a
    # car filling the mask) the fit says nothing about height; the median y still does.
    if abs(float(normal[1])) >= 0.7:
        predicted = abs(float(centroid @ normal))
    else:
        predicted = float(points[:, 1].median())
    if not predicted > 0:
        raise ValueError("the ground pixels are not below the camera: cannot estimate its height")
    return camera_height / predicted
