"""What sweeps, clusters and multi-process runs need from the training entry point.

- `run_group`: the wandb group of a run (resolver `fsre_run_group`): the run's name alone, or
  name and sweep time for every member of one `--multirun`, so a sweep is one group.
- `run_member`: one member of a sweep; a failure is written into its folder (`failed.json`)
  and the sweep goes on. `SweepOutcome`, a Hydra callback, lists the failed members at the end
  with the command that reruns each, and the command then exits non-zero.
- `WandbSyncHint`: a Hydra callback printing the one `wandb sync` command of a whole sweep.
- `per_process_batch`, `effective_batch_split`: the per-process batch that keeps
  `effective_batch_size` on any number of devices and nodes.
- `hydra_ddp_command`: how Lightning's DDP launcher re-invokes this script for ranks > 0; its
  own version replays `sys.argv`, which inside a `--multirun` would start the whole sweep again
  in every child process.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fsre_lightning.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def _hydra_config() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_multirun(hydra_cfg: Any) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def is_sweep_member() -> bool:
    """Whether the running Hydra job is one member of a multirun."""
    return _is_multirun(_hydra_config())


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
    from hydra.experimental.callback import Callback as HydraCallback
except ImportError:  # pragma: no cover - Hydra < 1.3 moved it
    from hydra.experimental.callbacks import Callback as HydraCallback  # type: ignore


class WandbSyncHint(HydraCallback):
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


# ------------------------------------------------------------------ members that fail
# Written into a member's folder when it fails: what went wrong and how to rerun it.
FAILURE_FILE = "failed.json"

# The failed members of the last sweep of this process (SweepOutcome fills it at the end).
failed_members: list[dict[str, Any]] = []


def rerun_command(command: str, overrides: list[str]) -> str:
    """The shell line that runs one member again (a one-member sweep, so an experiment in
    MULTIRUN mode does not start all its rows again)."""
    return shlex.join([f"fsre-{command.replace('_', '-')}", "--multirun", *overrides])


def record_failure(run_dir: str | Path, command: str, err: BaseException) -> dict[str, Any]:
    """Write `failed.json` into a member's folder (error, its type, overrides, traceback, the
    command that reruns it) and return what was written."""
    hydra_cfg = _hydra_config()
    overrides: list[str] = []
    if hydra_cfg is not None:
        # The user's launcher and sweeper choices (hydra/launcher=slurm ...) and the member's
        # own values; Hydra's internal keys are not part of a command line.
        overrides = [o for o in hydra_cfg.overrides.hydra if not str(o).startswith("hydra.mode")]
        overrides += list(hydra_cfg.overrides.task)
    record = {
        "command": command,
        "error": first_line(err),
        "type": type(err).__name__,
        "overrides": [str(o) for o in overrides],
        "rerun": rerun_command(command, [str(o) for o in overrides]),
        "traceback": "".join(traceback.format_exception(err)),
    }
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILURE_FILE).write_text(json.dumps(record, indent=2))
    return record


def member_folders(sweep_dir: str | Path) -> list[Path]:
    """The member folders of a sweep (finished, failed or started), in sweep order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []

    def is_member(path: Path) -> bool:
        return path.is_dir() and any((path / name).is_file() for name in (
            "metrics.json", FAILURE_FILE, ".hydra/overrides.yaml"))

    def order(path: Path) -> tuple[int, str]:
        return (int(path.name), "") if path.name.isdigit() else (sys.maxsize, path.name)

    return sorted((p for p in sweep_dir.iterdir() if is_member(p)), key=order)


def read_failure(member_dir: str | Path) -> dict[str, Any] | None:
    """A member's failure record, or None when it did not fail."""
    path = Path(member_dir) / FAILURE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"error": f"unreadable {path}", "type": "unknown", "rerun": ""}
    return record if isinstance(record, dict) else None


def close_open_wandb_run(exit_code: int = 1) -> None:
    """Finish a wandb run left open by a failure, so the next member starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def run_member(command: str, job: Callable[[Any], Any], cfg: Any, run_dir: str | Path
               ) -> Any:
    """Run one sweep member; a failure of any kind is recorded and gives NaN (what Optuna
    counts as a failed trial), so the other members still run.

    Ctrl-C and preemption are not failures of a member: they stop the whole sweep, with the
    exit status a single run has.
    """
    from fsre_lightning.runtime import PREEMPTED_EXIT_CODE, PreemptedError, exit_status

    try:
        return job(cfg)
    except (Exception, SystemExit) as err:
        status = exit_status(command, err)  # prints the one line of a user error
        if isinstance(err, PreemptedError) or status == PREEMPTED_EXIT_CODE:
            sys.exit(status)
        if status is None:
            log.exception("sweep member %s crashed", Path(run_dir).name)
        record = record_failure(run_dir, command, err)
        log.error("sweep member %s failed (%s: %s); recorded in %s, the sweep goes on",
                  Path(run_dir).name, record["type"], record["error"],
                  Path(run_dir) / FAILURE_FILE)
        close_open_wandb_run()
        return math.nan


class SweepOutcome(HydraCallback):
    """At the end of a multirun, list the failed members and how to rerun each of them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        failed_members.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        members = member_folders(str(config.hydra.sweep.dir))
        failed_members[:] = [{"member": str(p), **record} for p in members
                             if (record := read_failure(p)) is not None]
        if not failed_members:
            return
        print(f"{len(failed_members)} of {len(members)} sweep member(s) failed "
              f"({', '.join(Path(r['member']).name for r in failed_members)}); rerun only those:",
              file=sys.stderr)
        for record in failed_members:
            print(f"  member {Path(record['member']).name}: {record['type']}: "
                  f"{record['error']}\n    {record['rerun']}", file=sys.stderr)


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
