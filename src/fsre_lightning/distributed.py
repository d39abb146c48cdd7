"""Several processes for one run: the per-process batch and DDP's relaunch under Hydra.

- `per_process_batch`, `effective_batch_split`: the per-process batch that keeps
  `effective_batch_size` on any number of devices and nodes.
- `hydra_ddp_command`: how Lightning's DDP launcher re-invokes this script for ranks > 0; its
  own version replays `sys.argv`, which inside a `--multirun` would start the whole sweep again
  in every child process.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from fsre_lightning.errors import ConfigError
from fsre_lightning.sweeps.context import hydra_config


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


def _own_command() -> list[str]:
    """How this process was started: `python -m <module>` or `python <script>` (what
    Lightning's DDP launcher runs again for the other ranks)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, str(Path(sys.argv[0]).resolve())]


def hydra_ddp_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank `local_rank` > 0 under Hydra.

    This job's own overrides (a sweep member's values, not the sweep) and its output folder, in
    single-run mode, so every rank trains the same member and writes into the same folder.
    """
    from hydra.utils import get_original_cwd

    hydra_cfg = hydra_config()
    if hydra_cfg is None:  # pragma: no cover - only called when Hydra is initialised
        raise RuntimeError("hydra_ddp_command needs an initialised Hydra")
    command = _own_command()
    output_dir = str(hydra_cfg.runtime.output_dir).replace("\\", "/").replace('"', '\\"')
    # hydra.mode=RUN: an experiment that is a sweep by itself (mode: MULTIRUN) must not start
    # its sweep again in every rank.
    command += [*hydra_cfg.overrides.task, f'hydra.run.dir="{output_dir}"',
                f"hydra.job.name=ddp_rank_{local_rank}", "hydra.output_subdir=null",
                "hydra.mode=RUN"]
    return command, get_original_cwd()


def install_ddp_launcher_fix() -> None:
    """Make Lightning's DDP subprocess launcher use `hydra_ddp_command` (idempotent)."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    if getattr(subprocess_script, "_hydra_subprocess_cmd", None) is not hydra_ddp_command:
        subprocess_script._hydra_subprocess_cmd = hydra_ddp_command  # type: ignore[assignment]
