"""The one Hydra entry point every Hydra command is made of (`hydra_command`).

A command module (`fsre_lightning.train`, `.evaluate`, ...) writes `main = hydra_command(
"evaluate", run)`: its config is `conf/<command>.yaml`, composed by Hydra from the command line;
the config checks that Hydra cannot do run first (`config.preflight.check_before_hydra`: a
missing plugin, `--cfg` of a config that would not start); `run(cfg)` then does the work, and a
user error ends the command with one line (`runtime.run_or_exit`). `main(argv)` returns the
exit status, so tests call commands in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from fsre_lightning.runtime import CONFIG_DIR, call_hydra, run_or_exit


def hydra_command(command: str, run: Callable[[Any], Any] | None = None, *,
                  task: Callable[[Any], Any] | None = None
                  ) -> Callable[[Sequence[str] | None], int]:
    """`main(argv=None) -> int` of command `command`: `run(cfg)` under `run_or_exit`, or
    `task(cfg)` as Hydra's task function itself (its return value goes to the sweeper)."""
    import hydra

    from fsre_lightning.config.preflight import check_before_hydra

    if (run is None) == (task is None):
        raise TypeError("hydra_command takes run or task")

    def task_function(cfg: Any) -> Any:
        if task is not None:
            return task(cfg)
        run_or_exit(command, run, cfg)
        return None

    # Hydra names the job (its log file, ${hydra:job.name}) after the task's module.
    task_function.__module__ = f"fsre_lightning.{command}"
    entry = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR),
                       config_name=command)(task_function)

    def main(argv: Sequence[str] | None = None) -> int:
        return call_hydra(entry, argv, partial(check_before_hydra, command))

    main.__doc__ = (f"`python -m fsre_lightning.{command} [overrides]` (`fsre-"
                    f"{command.replace('_', '-')}`); returns the exit status.")
    return main
