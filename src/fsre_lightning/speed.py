"""Options that change the speed and memory of FSREModule's training step, never its maths
(`model.channels_last`, `compile`, `compile_mode`, `gradient_checkpointing`, `compile_loss`;
figures in benchmarks/README.md, design section 7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fsre_lightning.config.checks import check_choice
from fsre_lightning.losses import photometric_losses
from fsre_lightning.module_config import COMPILE_MODES, compile_target


@dataclass
class SpeedPlan:
    """What the step runs: the photometric function, the compiled step (or None) and whether
    CUDA graphs replay it (its outputs are then overwritten by the next replay)."""

    photometric: Callable[..., torch.Tensor]
    compiled_step: Callable[..., Any] | None
    cuda_graphs: bool


def apply_speed_options(net: torch.nn.Module, pose_net: torch.nn.Module,
                        step: Callable[..., Any], channels_last: bool = False,
                        compile: bool | str = False, compile_mode: str | None = None,
                        gradient_checkpointing: bool = False,
                        compile_loss: bool = False) -> SpeedPlan:
    """Set the networks up for the options (memory format, recomputation, compiled networks)
    and return how the step runs; `step` is the unbound function computing the networks and
    losses of one batch (`FSREModule._forward_losses`)."""
    target = compile_target(compile)
    check_choice("compile_mode", compile_mode, COMPILE_MODES, nullable=True)
    if channels_last:
        # Weights in NHWC make the convolutions of both networks produce NHWC as well.
        net.to(memory_format=torch.channels_last)
        pose_net.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        if not hasattr(net, "gradient_checkpointing"):
            raise ValueError("model.gradient_checkpointing: the network does not support it")
        net.gradient_checkpointing = True
    mode = None if compile_mode in (None, "default") else compile_mode
    if target == "networks":
        # Module.compile keeps the parameter names, so checkpoints stay interchangeable.
        net.compile(mode=mode)
        pose_net.compile(mode=mode)
    # The photometric maps (SSIM + L1 of every source at every scale) are element-wise work
    # bound by memory traffic; Inductor fuses them into a few loops.
    photometric = (torch.compile(photometric_losses) if compile_loss and target != "step"
                   else photometric_losses)
    # The whole training step (networks, warps, every loss term) as one graph: Inductor fuses
    # the loss's element-wise work with the networks' epilogues, and with static shapes (train
    # batches drop the last, partial one) CUDA graphs can replay it. The step has no host
    # synchronisation inside (tests/test_compile.py). Validation and prediction stay eager:
    # other shapes, no gradients, no recompilation. The function, not a bound method, is
    # compiled: a copy of the module (deepcopy, pickling) then runs its own networks.
    compiled = torch.compile(step, mode=mode, dynamic=False) if target == "step" else None
    return SpeedPlan(photometric, compiled,
                     cuda_graphs=target is not None and mode in ("reduce-overhead",
                                                                 "max-autotune"))
