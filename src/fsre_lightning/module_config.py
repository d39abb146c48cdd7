"""The `model` group (`ModelConfig`, FSREModule's options) and the rules of its options,
importable without torch: the config checks run before a command imports its work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fsre_lightning.config.checks import check_choice, check_int, check_number
from fsre_lightning.models.network_config import NetworkConfig, PoseNetworkConfig

POLICIES = ("skip", "stop")


# model.compile: what torch.compile covers. "step" is the training step's forward and loss as one
# graph (its backward is compiled with it); "networks" the depth and pose networks alone.
COMPILE_TARGETS = ("networks", "step")


# model.compile_mode: torch.compile's modes (null = "default"); "reduce-overhead" adds CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_target(value: Any) -> str | None:
    """`model.compile` as None (off), "networks" or "step"; true means "step"."""
    if value is False or value is None:
        return None
    if value is True:
        return "step"
    check_choice("compile", value, (False, True, *COMPILE_TARGETS))
    return str(value)


def check_nonfinite(policy: Any, max_consecutive: Any) -> None:
    """`model.nonfinite` and `model.nonfinite_max_consecutive` (`nonfinite.NonFinitePolicy`)."""
    check_choice("nonfinite", policy, POLICIES)
    check_int("nonfinite_max_consecutive", max_consecutive, lo=1)


@dataclass(kw_only=True)
class ModelConfig:
    """The `model` group: FSREModule's arguments and their rules. The `loss` group and what
    comes from the data (frame ids, the evaluation crop and depth caps) are passed in by the
    entry point. The optimiser and scheduler are `_partial_` targets with schemas of their own
    (`fsre_lightning.config.schemas`)."""

    _target_: str = "fsre_lightning.module.FSREModule"
    network: NetworkConfig
    pose_network: PoseNetworkConfig
    optimizer: Any = None
    scheduler: Any = None
    # The pose network's lr is model.optimizer.lr * pose_lr_scale (1 = the paper's).
    pose_lr_scale: float = 1.0
    # A linear lr ramp over the first N steps (0 = the paper's: none).
    warmup_steps: int = 0
    image_log_every_n_steps: int = 250
    num_panel_images: int = 2
    nonfinite: str = "skip"
    nonfinite_max_consecutive: int = 100
    channels_last: bool = False
    compile: Any = False
    compile_mode: Any = None
    gradient_checkpointing: bool = False
    compile_loss: bool = False

    def __post_init__(self) -> None:
        check_number("pose_lr_scale", self.pose_lr_scale, lo=0, strict=True)
        check_int("warmup_steps", self.warmup_steps, lo=0)
        check_int("image_log_every_n_steps", self.image_log_every_n_steps, lo=0)
        check_int("num_panel_images", self.num_panel_images, lo=1)
        check_nonfinite(self.nonfinite, self.nonfinite_max_consecutive)
        compile_target(self.compile)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES, nullable=True)
