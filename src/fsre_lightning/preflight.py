"""Before a sweep starts: every member's config checked with the entry point's rules.

`SweepPreflight` (a Hydra callback of `train`) composes each member of a basic-sweeper sweep as
Hydra will, runs `validate_config` on it, and stops the command (exit 2, one line per invalid
member) before the first member starts, so a bad value in the last member does not surface
after the others trained. Sweepers that choose values as they go (Optuna) are not checked here;
each of their members checks itself when it starts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from fsre_lightning.config import validate_config
from fsre_lightning.errors import UserError
from fsre_lightning.runtime import EXIT_USER_ERROR, report_error
from fsre_lightning.sweep import HydraCallback

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_members(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every member Hydra's basic sweeper will launch (its sweeper params,
    then the command line, crossed), or None for another sweeper (e.g. Optuna samples values
    as it goes)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != _BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(member) for batch in BasicSweeper.split_arguments(overrides, None)
            for member in batch]


def member_problems(config: DictConfig, entry: str) -> tuple[int, list[str]]:
    """(members, one line per invalid member): each member's config composed as Hydra will
    compose it and checked with the entry point's rules."""
    from hydra import compose

    members = sweep_members(config) or []
    problems = []
    for number, overrides in enumerate(members):
        member = compose(config_name=config.hydra.job.config_name, overrides=overrides)
        with open_dict(member):
            member.paths.run_dir = str(Path(str(config.hydra.sweep.dir)) / str(number))
        try:
            validate_config(member, entry)
        except UserError as err:
            problems.append(f"sweep member {number} ({' '.join(overrides)}): {err}")
    return len(members), problems


class SweepPreflight(HydraCallback):
    """Before the first member of a basic sweep starts, check every member's config: a bad
    value in the last member must not surface hours into the sweep. All invalid members are
    listed, one line each, and nothing starts (exit status 2)."""

    def __init__(self, entry: str = "train") -> None:
        self.entry = entry

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        count, problems = member_problems(config, self.entry)
        for line in problems:
            report_error(self.entry, line)
        if problems:
            print(f"fsre_lightning.{self.entry}: {len(problems)} of {count} sweep members are "
                  "invalid; nothing was started", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
