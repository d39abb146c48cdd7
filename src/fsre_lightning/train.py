"""Train FSRE-Depth: `python -m fsre_lightning.train [overrides]` (`fsre-train`).

The command: its config is checked before anything heavy is imported (a mistake answers in a
second), then `fsre_lightning.training.run` trains; in a sweep each member runs in a process of
its own (`sweeps.members`). See `fsre_lightning.training` for what a run writes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import deferring_probes
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import EXIT_SWEEP_FAILED, run_or_exit
from fsre_lightning.sweeps.context import is_sweep_member, launches_members_here, member_context
from fsre_lightning.sweeps.members import (
    failed_members,
    kept_member_value,
    launch_member,
    run_member,
)


def monitored_value(results: Mapping[str, Any]) -> float:
    """The value the checkpoint callback monitors (validation AbsRel, or the validation loss
    without ground truth) after training: what a sweeper such as Optuna minimises."""
    return float((results.get("monitor") or {}).get("value", math.nan))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the config (the quick checks first, before torch and Lightning are imported), then
    train; returns what metrics.json holds."""
    with deferring_probes():
        validate_config(cfg, "train")
    from fsre_lightning.training import run as train_run

    return train_run(cfg)


def task(cfg: DictConfig) -> float | None:
    """Hydra's task: one run, or one member of a sweep (its value is for the sweeper)."""
    run_dir = HydraConfig.get().runtime.output_dir
    with open_dict(cfg):
        cfg.paths.run_dir = run_dir
    if launches_members_here():
        # Each member in a process of its own, whose death the sweep survives.
        return launch_member("train", cfg, run_dir)
    if is_sweep_member() or member_context() is not None:
        # A failed member is recorded and the sweep goes on; the value is for the sweeper.
        kept = kept_member_value(cfg, run_dir) if member_context() is None else None
        if kept is not None:
            return kept
        return run_member("train", lambda c: monitored_value(run(c)), cfg, run_dir)
    run_or_exit("train", run, cfg)
    return None


_main = hydra_command("train", task=task)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fsre_lightning.train [overrides]` (`fsre-train`); returns the exit status (1
    when members of a sweep failed, each listed at the end)."""
    failed_members.clear()
    status = _main(argv)
    return EXIT_SWEEP_FAILED if status == 0 and failed_members else status


if __name__ == "__main__":
    sys.exit(main())
