"""What sweeps, clusters and multi-process runs need from the training entry point.

- `run_group`: the wandb group of a run (resolver `fsre_run_group`): the run's name alone, or
  name and sweep time for every member of one `--multirun`, so a sweep is one group.
- `WandbSyncHint`: a Hydra callback printing the one `wandb sync` command of a whole sweep.
- `per_process_batch`, `effective_batch_split`: the per-process batch that keeps
  `effective_batch_size` on any number of devices and nodes.
- `hydra_ddp_command`: how Lightning's DDP launcher re-invokes this script for ranks > 0; its
  own version replays `sys.argv`, which inside a `--multirun` would start the whole sweep again
  in every child process.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fsre_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def _hydra_config() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg: Any) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def run_group(name: str) -> str:
    """`name` for a single run; `<name>-<sweep folder>` (the sweep's start time) in a sweep."""
    hydra_cfg = _hydra_config()
    if not _is_multirun(hydra_cfg):
        return str(name)
    try:
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
    except Exception:  # an unresolvable sweep dir: the member folder's parent is the same
        sweep_dir = Path(str(hydra_cfg.runtime.output_dir)).parent
    return f"{name}-{sweep_dir.name}"


OmegaConf.register_new_resolver("fsre_run_group", run_group, replace=True)


def sweep_sync_command(sweep_dir: str | Path) -> str | None:
    """`wandb sync` for every offline wandb run under a sweep folder, or None if there is none."""
    sweep_dir = Path(sweep_dir)
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*"))
    if not runs:
        return None
    # One shell glob instead of N paths: the line stays short for any sweep size.
    return f"wandb sync {sweep_dir}/*/wandb/offline-run-*"


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.3 moved it
    from hydra.experimental.callbacks import Callback as _HydraCallback  # type: ignore


class WandbSyncHint(_HydraCallback):
    """At the end of a `--multirun`, print how to upload all of its offline wandb runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:  # a hint must never fail a finished sweep
            return
        command = sweep_sync_command(sweep_dir)
        if command:
            print(f"wandb runs of this sweep saved offline; to upload them all:\n  {command}")
        print(f"result table: python -m fsre_lightning.report {sweep_dir}")


def world_size(devices: Any, num_nodes: Any = 1) -> int | None:
    """Processes a Trainer with these `devices` and `num_nodes` starts; None when only the
    machine knows (devices='auto' or -1 on an accelerator)."""
    if isinstance(devices, ListConfig | list | tuple):
        per_node = len(devices)
    elif isinstance(devices, str) and devices not in ("auto", "-1"):
        # "0,1" or "2": Lightning's string forms
        per_node = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(
            devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        per_node = devices
    else:
        return None
    return per_node * int(num_nodes or 1)


def per_process_batch(effective: int, processes: int, accumulate: int = 1) -> int:
    """The per-process batch giving `effective` samples per optimiser step."""
    divisor = processes * accumulate
    if effective % divisor:
        raise ValueError(
            f"it does not split over {processes} process(es) x {accumulate} accumulated "
            f"batch(es): use a multiple of {divisor}, or set effective_batch_size=null and "
            "data.batch_size per process")
    return effective // divisor


def effective_batch_split(effective: int, trainer: Mapping[str, Any]) -> tuple[int, int, int]:
    """(per-process batch, processes, accumulated batches) that make `effective_batch_size`
    with this trainer config; ConfigError when the device count is unknown or does not split."""
    processes = world_size(trainer.get("devices", 1), trainer.get("num_nodes", 1))
    if processes is None:
        raise ConfigError("effective_batch_size", effective, "it needs a device count: set "
                          f"trainer.devices to a number (it is {trainer.get('devices')!r})")
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    try:
        return per_process_batch(effective, processes, accumulate), processes, accumulate
    except ValueError as err:
        raise ConfigError("effective_batch_size", effective, str(err)) from err


def hydra_ddp_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank `local_rank` > 0 under Hydra.

    This job's own overrides (a sweep member's values, not the sweep) and its output folder, in
    single-run mode, so every rank trains the same member and writes into the same folder.
    """
    from hydra.utils import get_original_cwd

    import __main__

    hydra_cfg = _hydra_config()
    if hydra_cfg is None:  # pragma: no cover - only called when Hydra is initialised
        raise RuntimeError("hydra_ddp_command needs an initialised Hydra")
    spec = getattr(__main__, "__spec__", None)
    command = [sys.executable, "-m", spec.name] if spec is not None else [
        sys.executable, str(Path(sys.argv[0]).resolve())]
    output_dir = str(hydra_cfg.runtime.output_dir).replace("\\", "/").replace('"', '\\"')
    command += [*hydra_cfg.overrides.task, f'hydra.run.dir="{output_dir}"',
                f"hydra.job.name=ddp_rank_{local_rank}", "hydra.output_subdir=null"]
    return command, get_original_cwd()


def install_ddp_launcher_fix() -> None:
    """Make Lightning's DDP subprocess launcher use `hydra_ddp_command` (idempotent)."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    if getattr(subprocess_script, "_hydra_subprocess_cmd", None) is not hydra_ddp_command:
        subprocess_script._hydra_subprocess_cmd = hydra_ddp_command  # type: ignore[assignment]
