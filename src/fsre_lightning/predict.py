"""Depth for your own images and videos: `python -m fsre_lightning.predict ckpt_path=... input=...`.

    python -m fsre_lightning.predict ckpt_path=run/checkpoints/last.ckpt input=photo.jpg output=out
    python -m fsre_lightning.predict ckpt_path=... input=frames/ output=out segmentation=true
    python -m fsre_lightning.predict ckpt_path=... input=drive.mp4 output=out side_by_side=true \\
        camera_height=1.65

`input` is an image, a folder of images (sorted by name, not recursive) or a video file (read
with imageio + imageio-ffmpeg: `pip install 'fsre-lightning[video]'`). The network runs at the
training resolution (recorded in the checkpoint, or height/width); `resolution=input` resizes the
outputs back to each input's size (disparity bilinearly, segmentation logits bilinearly before
the argmax), `resolution=network` keeps the network's. Per image NAME, in `output`:

- NAME_depth.png: colour-mapped disparity (near is bright); NAME_overlay.png, the same
  blended over the input, with `overlay=true`;
- NAME_disp.npy / NAME_depth.npy: float32 H x W disparity and depth (`save_arrays`);
- NAME_seg.png (Cityscapes colours) and NAME_seg_ids.png (train ids) with `segmentation=true`.

A video VIDEO gives VIDEO_<frame>_depth.png (and _seg.png) per frame, one VIDEO.npz holding
`disp` and `depth` (N x H x W float32), `segmentation` (N x H x W uint8) when asked, `scale`
(N,) and `fps`, and with `side_by_side=true` VIDEO_side_by_side.mp4 (input | depth
[| segmentation]); a folder gives side_by_side.mp4 of its images in order.

Depth is relative (the training's units) unless a scale is given: `scale_factor=s` multiplies
it, `camera_height=h` (metres) estimates the scale per frame from the ground plane (predicted
road/sidewalk/terrain when the model has a segmentation decoder, else the bottom centre of the
image) with the training intrinsics (`intrinsics=[fx, fy, cx, cy]`, normalised, to override).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import resolve_device

log = logging.getLogger(__name__)


def network_size(cfg: DictConfig, ckpt_path: Path) -> tuple[int, int]:
    from fsre_lightning.trained import training_resolution

    height, width, source = training_resolution(ckpt_path, cfg.height, cfg.width)
    log.info("network input %d x %d (from %s)", height, width, source)
    return height, width


def run(cfg: DictConfig) -> dict[str, Any]:
    """Predict as the config says; returns the summary printed at the end."""
    validate_config(cfg, "predict")
    # The work's imports after the checks: a usage error answers without torch.
    from fsre_lightning.inference.model import build_inference_model
    from fsre_lightning.inference.runner import Settings, find_inputs, predict
    from fsre_lightning.trained import load_module, training_intrinsics
    ckpt_path = Path(cfg.ckpt_path)
    source = find_inputs(cfg.input)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint")
    size = network_size(cfg, ckpt_path)
    device = resolve_device(cfg.device)
    module = load_module(ckpt_path, device)
    segmentation = bool(cfg.segmentation)
    # The ground mask for camera_height uses the predicted road when there is a decoder.
    use_seg = segmentation or (cfg.camera_height is not None and module.has_segmentation)
    model = build_inference_model(module, ckpt_path, use_seg, seg_output="logits")
    intrinsics = training_intrinsics(ckpt_path, cfg.get("intrinsics"))
    settings = Settings(size, cfg.resolution, segmentation, bool(cfg.save_arrays),
                        cfg.scale_factor, cfg.camera_height, intrinsics, bool(cfg.overlay))
    output = Path(cfg.output)
    summary = predict(model, source, output, settings, device, cfg.batch_size,
                      bool(cfg.side_by_side), cfg.fps, bool(cfg.progress))
    print(f"{summary['frames']} frames of {source.path} -> {output}"
          + (f"; {summary['npz']}" if summary["npz"] else "")
          + (f"; {summary['video']}" if summary["video"] else "")
          + (f"; depth scale (median) {summary['scale_median']:.4g}"
             if cfg.scale_factor is not None or cfg.camera_height is not None else
             "; depth is relative (give camera_height= or scale_factor= for metres)"))
    return summary


main = hydra_command("predict", run)


if __name__ == "__main__":
    sys.exit(main())
