"""Everything wandb: the logger as conf/logger/wandb.yaml builds it, a resumed run continued in
its wandb run, the final table, closing a run, and how to upload offline runs.

wandb runs offline unless `WANDB_MODE` says otherwise (design section 6); a sweep's members
share one group (`config.resolvers.run_group`).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict
from rich.console import Console

from fsre_lightning.scoring.conventions import REPORTED_METRICS
from fsre_lightning.sweeps.context import HydraCallback

log = logging.getLogger(__name__)

# The checkpoint entry holding the wandb run id, which a resumed run continues.
WANDB_RUN_KEY = "wandb_run_id"


def store_run_id(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Record the trainer's wandb run id in `checkpoint` (if it logs to wandb)."""
    for logger in getattr(trainer, "loggers", []):
        if type(logger).__name__ == "WandbLogger" and logger.version:
            checkpoint[WANDB_RUN_KEY] = str(logger.version)
            return


@functools.cache
def _wandb_logger_class() -> type:
    """Lightning's WandbLogger, except that it does not hand wandb.init an `anonymous=None` it
    was never given: wandb >= 0.19 ignores the setting and printed "The anonymous setting has
    no effect" on every run. An explicit `anonymous` still goes through. Built on first use
    (`WandbLogger`, conf/logger/wandb.yaml's target): importing Lightning takes seconds, which
    a command's help and usage errors must not wait for."""
    from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger

    class WandbLogger(LightningWandbLogger):
        __doc__ = _wandb_logger_class.__doc__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self._wandb_init.get("anonymous") is None:
                self._wandb_init.pop("anonymous", None)

    WandbLogger.__module__ = __name__
    return WandbLogger


def __getattr__(name: str) -> Any:
    if name == "WandbLogger":
        return _wandb_logger_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sweep_sync_command(sweep_dir: str | Path) -> str | None:
    """`wandb sync` for every offline wandb run under a sweep folder, or None if there is none."""
    sweep_dir = Path(sweep_dir)
    runs = sorted(sweep_dir.glob("*/wandb/offline-run-*"))
    if not runs:
        return None
    # One shell glob instead of N paths: the line stays short for any sweep size.
    return f"wandb sync {sweep_dir}/*/wandb/offline-run-*"


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


def close_open_wandb_run(exit_code: int = 1) -> None:
    """Finish a wandb run left open by a failure, so the next member starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def print_wandb_sync_hint(trainer: Any) -> None:
    """Offline wandb runs are only useful once synced: say how, at the end of every run."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger.experiment, "offline",
                                                              False):
            run_path = Path(logger.experiment.dir).parent
            # soft_wrap: a path must not be broken over lines when stdout is not a terminal
            Console().print(f"wandb run saved offline; to upload it: [bold]wandb sync {run_path}",
                            soft_wrap=True)


def continue_wandb_run(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> None:
    """A resumed run logs into the wandb run of the checkpoint (same id), not a new one."""
    run_id = checkpoint.get(WANDB_RUN_KEY)
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if run_id and wandb_cfg and wandb_cfg.get("id") is None:
        with open_dict(wandb_cfg):
            wandb_cfg.id = str(run_id)
        log.info("continuing wandb run %s", run_id)


def finish_loggers(trainer: Any, results: Mapping[str, Any]) -> None:
    """The final evaluation table to wandb, then close the wandb run: the next member of a
    --multirun, in this same process, must start its own run instead of reusing this one."""
    rows = [(stage, results[stage]) for stage in ("before", "after") if stage in results]
    keys = [k for k in REPORTED_METRICS if any(k in r for _, r in rows)]
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger" or not trainer.is_global_zero:
            continue
        if rows:
            logger.log_table(key="eval/final", columns=["stage", *keys],
                             data=[[stage, *(r.get(k) for k in keys)] for stage, r in rows])
        logger.experiment.summary.update(
            {f"final/{k}": v for k, v in results.get("after", {}).items()})
        logger.experiment.finish()
