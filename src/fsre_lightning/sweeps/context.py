"""Where the running job stands in a sweep, read from Hydra and from the environment.

A sweep member runs either in the sweep's own process (a launcher that starts a process per
member itself, e.g. SLURM) or, with Hydra's basic launcher, in a child process that
`sweeps.members.launch_member` starts with `MEMBER_ENV` set; everything that behaves
differently in a sweep (the wandb group, `ckpt_path=auto`, the resume hint, failure records)
asks here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from omegaconf import OmegaConf

try:
    from hydra.experimental.callback import Callback as HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.3 moved it
    from hydra.experimental.callbacks import Callback as HydraCallback  # type: ignore

__all__ = ["MEMBER_ENV", "HydraCallback", "hydra_config", "is_multirun", "is_sweep_member",
           "launches_members_here", "member_context"]



def hydra_config() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun(hydra_cfg: Any) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def is_sweep_member() -> bool:
    """Whether the running Hydra job is one member of a multirun."""
    return is_multirun(hydra_config())


# ----------------------------------------------------------- members in child processes
# Set in a member's process by `launch_member`: JSON with the sweep folder, the member's
# overrides, the command that reruns it and the one that resumes the whole sweep in place.
MEMBER_ENV = "FSRE_SWEEP_MEMBER"


_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def member_context() -> dict[str, Any] | None:
    """What `launch_member` told this process about the member it runs, or None."""
    raw = os.environ.get(MEMBER_ENV)
    return json.loads(raw) if raw else None


def launches_members_here() -> bool:
    """Whether this job is a member of a sweep whose launcher runs members in this very
    process (Hydra's basic launcher), where `launch_member` gives each its own process."""
    hydra_cfg = hydra_config()
    return is_multirun(hydra_cfg) and OmegaConf.select(
        hydra_cfg, "launcher._target_") == _BASIC_LAUNCHER
