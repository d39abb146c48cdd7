"""Mixed precision: the networks may run in bfloat16, the loss never does (design 7.2).

Under `trainer.precision=bf16-mixed` autocast runs the convolutions in bfloat16; the loss must
still see float32 pixel coordinates, depths, SSIM statistics and SGT distances. These tests
watch every kernel the loss dispatches under CPU autocast (the CUDA rules are the same for the
ops involved: matmuls and convolutions go to bfloat16, element-wise ops follow their inputs).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.geometry import intrinsics_matrix
from fsre_lightning.module import FSREModule
from fsre_lightning.objective import compute_losses

H, W = 64, 192
FULL = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet18"}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet18"}
LOW = (torch.bfloat16, torch.float16)


class LowPrecisionOps(TorchDispatchMode):
    """Counts the kernels that produce a 16-bit floating-point tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.low: Counter[str] = Counter()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.total += 1
        results = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(r, torch.Tensor) and r.dtype in LOW for r in results):
            self.low[str(func)] += 1
        return out


def make_batch(b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(b, 3, 3, H, W, generator=g)
    frames[:, 2] = frames[:, 0].roll(2, dims=-1)
    K = intrinsics_matrix(H, W, KITTI_INTRINSICS).expand(b, 4, 4).clone()
    labels = torch.randint(0, 5, (b, H, W), generator=g)
    return {"frames": frames, "K": K, "inv_K": torch.linalg.inv(K), "labels": labels}


def test_bf16_networks_feed_a_float32_loss() -> None:
    torch.manual_seed(0)
    module = FSREModule(network=FULL, pose_network=POSE, image_log_every_n_steps=0)
    batch = make_batch()
    frames = batch["frames"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module.net(frames[:, 0])
        pose_ops = LowPrecisionOps()
        with pose_ops:
            transforms = module._transforms(frames)
        loss_ops = LowPrecisionOps()
        with loss_ops:
            losses = compute_losses(outputs, frames, batch["K"], batch["inv_K"], transforms,
                                    batch["labels"], module.loss_cfg, recompute=False)
    # The networks did run in bfloat16: the test would prove nothing otherwise.
    assert outputs["disp"][0].dtype == torch.bfloat16
    assert outputs["depth_features"][1].dtype == torch.bfloat16
    # The pose network's convolutions are bfloat16, its rigid transforms are not.
    assert pose_ops.low["aten.convolution.default"] > 0
    assert all(t.dtype == torch.float32 for t in transforms)
    assert not any("linalg" in op or "bmm" in op or "mm" in op for op in pose_ops.low), pose_ops.low
    # Not one kernel of the loss produces a 16-bit tensor.
    assert loss_ops.total > 100
    assert not loss_ops.low, loss_ops.low
    assert all(v.dtype == torch.float32 for v in losses.values() if v.is_floating_point())

    # Same numbers as the loss of the same outputs cast up front, without autocast.
    cast = {k: ({s: t.float() for s, t in v.items()} if isinstance(v, dict) else v.float())
            for k, v in outputs.items()}
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = compute_losses(cast, frames, batch["K"], batch["inv_K"], transforms,
                                        batch["labels"], module.loss_cfg, recompute=False)
    torch.manual_seed(1)
    plain = compute_losses(cast, frames, batch["K"], batch["inv_K"], transforms,
                           batch["labels"], module.loss_cfg, recompute=False)
    for name, value in plain.items():
        assert torch.equal(under_autocast[name], value), name
