"""The OmegaConf resolvers of the package's configs, registered once, when `fsre_lightning.config`
is imported (every command and `testing.compose_config` compose through it).

- `${fsre_run_id:}`: a random tag after the start time in run and sweep folder names, so two
  runs started in the same second (a job array, two terminals) never share a folder. Cached per
  config, and Hydra copies that cache to every member of a sweep: one config, one tag.
- `${fsre_run_group:<name>}`: the wandb group of a run: its name alone, or name and sweep
  folder for every member of one `--multirun`, so a sweep is one group.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from omegaconf import OmegaConf

from fsre_lightning.sweeps.context import hydra_config, is_multirun, member_context


def run_group(name: str) -> str:
    """`name` for a single run; `<name>-<sweep folder>` (the sweep's start time) in a sweep."""
    member = member_context()
    if member is not None:  # a member in its own process (launch_member)
        return f"{name}-{Path(member['sweep_dir']).name}"
    hydra_cfg = hydra_config()
    if not is_multirun(hydra_cfg):
        return str(name)
    try:
        sweep_dir = Path(str(hydra_cfg.sweep.dir))
    except Exception:  # an unresolvable sweep dir: the member folder's parent is the same
        sweep_dir = Path(str(hydra_cfg.runtime.output_dir)).parent
    return f"{name}-{sweep_dir.name}"


def register_resolvers() -> None:
    """Make the package's resolvers known to OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("fsre_run_id", lambda: secrets.token_hex(3),
                                    use_cache=True, replace=True)
    OmegaConf.register_new_resolver("fsre_run_group", run_group, replace=True)
