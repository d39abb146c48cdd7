"""Before a sweep starts: every member's config checked with the entry point's rules.

`SweepPreflight` (a Hydra callback of `train`) composes each member of a basic-sweeper sweep as
Hydra will, runs `validate_config` on it, and stops the command (exit 2, one line per invalid
member) before the first member starts, so a bad value in the last member does not surface
after the others trained. A sweeper that chooses values as it goes (Optuna) has every value of
its search space checked instead, one parameter at a time: each choice, each end of a range
or interval.

`check_before_hydra` runs before Hydra does: a missing optional plugin is one line naming its
extra, and `--cfg job|all|hydra`, which prints the config without running the command, first
checks it as above: the printed config is one that would start.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import deferring_probes
from fsre_lightning.errors import UserError, first_line
from fsre_lightning.runtime import CONFIG_DIR, EXIT_USER_ERROR, plain_optuna_logs, report_error
from fsre_lightning.sweeps.context import HydraCallback

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _is_basic(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.sweeper._target_") == _BASIC_SWEEPER


def _sweep_arguments(config: DictConfig) -> list[Any]:
    """The sweeper's params, then the command line's overrides, parsed as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    return OverridesParser.create().parse_overrides(arguments)


def sweep_members(config: DictConfig) -> list[list[str]]:
    """The overrides of every member Hydra's basic sweeper will launch (its sweeper params,
    then the command line, crossed); for another sweeper, which picks values as it goes (e.g.
    Optuna), `search_space_members`."""
    if not _is_basic(config):
        return search_space_members(config)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    overrides = _sweep_arguments(config)
    return [list(member) for batch in BasicSweeper.split_arguments(overrides, None)
            for member in batch]


def _candidates(override: Any) -> list[str]:
    """The values of one parsed override a search may try, as override strings: a fixed value,
    every choice, every value of a range, both ends of an interval."""
    from hydra.core.override_parser.types import IntervalSweep

    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    value = override.value()
    if isinstance(value, IntervalSweep):
        ends = [value.start, value.end]
        # Hydra reads interval(3, 7) as floats; the searcher draws integers from it.
        if "int" in (value.tags or set()) or all(float(v).is_integer() for v in ends):
            ends = [int(v) for v in ends]
        return [f"{key}={v}" for v in ends]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def search_space_members(config: DictConfig) -> list[list[str]]:
    """Members that cover every value a searching sweeper (Optuna) may try, one parameter at a
    time: the first candidate of each parameter, then each other candidate of each parameter
    with the others at their first. The rules are per key or between a few keys, so a value
    that breaks one shows up here before the search starts."""
    options = [_candidates(override) for override in _sweep_arguments(config)]
    base = [values[0] for values in options]
    members = [base]
    for i, values in enumerate(options):
        members += [[*base[:i], value, *base[i + 1:]] for value in values[1:]]
    return members


def member_problems(config: DictConfig, entry: str) -> tuple[int, list[str]]:
    """(members, one line per invalid member): each member's config composed as Hydra will
    compose it and checked with the entry point's rules."""
    from hydra import compose

    members = sweep_members(config)
    what = "sweep member" if _is_basic(config) else "search space point"
    problems = []
    for number, overrides in enumerate(members):
        member = compose(config_name=config.hydra.job.config_name, overrides=overrides)
        with open_dict(member):
            member.paths.run_dir = str(Path(str(config.hydra.sweep.dir)) / str(number))
        try:
            validate_config(member, entry)
        except UserError as err:
            problems.append(f"{what} {number} ({' '.join(overrides)}): {err}")
    return len(members), problems


class SweepPreflight(HydraCallback):
    """Before the first member of a sweep starts, check every member's config (of a search:
    every value of its space): a bad value in the last member must not surface hours into the
    sweep. All invalid members are listed, one line each, and nothing starts (exit status 2)."""

    def __init__(self, entry: str = "train") -> None:
        self.entry = entry

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
            plain_optuna_logs()
        count, problems = member_problems(config, self.entry)
        for line in problems:
            report_error(self.entry, line)
        if problems:
            what = "sweep members" if _is_basic(config) else "points of the search space"
            print(f"fsre_lightning.{self.entry}: {len(problems)} of {count} {what} are "
                  "invalid; nothing was started", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)


# Configs of optional Hydra plugins (the package's extras) -> the extra that installs them.
PLUGIN_EXTRAS = {"hydra/launcher/submitit_slurm": "slurm", "hydra/sweeper/optuna": "optuna"}
_MISSING_CONFIG = re.compile(r"In '([^']+)': Could not load '([^']+)'")


def missing_plugin(err: BaseException) -> str | None:
    """The one-line message for a composition error caused by an optional Hydra plugin that is
    not installed, else None."""
    found = _MISSING_CONFIG.search(str(err))
    if not found or found.group(2) not in PLUGIN_EXTRAS:
        return None
    group, _, name = found.group(1).rpartition("/")
    extra = PLUGIN_EXTRAS[found.group(2)]
    return (f"{group}={name} needs the Hydra plugin of the optional extra '{extra}', which is "
            f"not installed: pip install 'fsre-lightning[{extra}]'")


def check_before_hydra(entry: str, argv: Sequence[str]) -> None:
    """What Hydra would report in its own words, or not at all, checked before it runs: a
    missing optional plugin (exit 2, naming the extra), and, with `--cfg`/`-c` (Hydra prints
    the config and never runs the command), the config's rules, for every member of its sweep,
    so a config that prints is one that starts. Every other composition error (a mistyped key
    or group choice, a bad override) is one line too, with the closest known names."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun),
                                   ("--cfg", args.cfg)) if on]
    if len(modes) > 1:
        report_error(entry, f"{' and '.join(modes)} together: use one of them (--cfg prints the "
                     "config and runs nothing; a sweep's members are checked when it starts)")
        sys.exit(EXIT_USER_ERROR)
    overrides = list(args.overrides)
    experiment = next((o for o in overrides if o.lstrip("+~").startswith("experiment=")), None)
    if experiment is not None and entry != "train":
        report_error(entry, f"{experiment} configures training runs (fsre-train), not {entry}: "
                     + ("it takes the data config the checkpoint was trained with; set data.* "
                        "or data=<group> to score other data"
                        if entry in ("evaluate", "evaluate_pose") else
                        "give this command's own keys (--help lists them)"))
        sys.exit(EXIT_USER_ERROR)
    if args.config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    problems: list[str] = []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            # As Hydra first composes a command line: sweeps allowed, every group loaded.
            GlobalHydra.instance().hydra.compose_config(
                args.config_name or entry, overrides, run_mode=RunMode.MULTIRUN,
                with_log_configuration=False, validate_sweep_overrides=False)
            if args.cfg:  # as --cfg shows it
                config = compose(args.config_name or entry, overrides=overrides,
                                 return_hydra_config=True)
                previous = HydraConfig.instance().cfg
                HydraConfig.instance().set_config(config)  # for ${hydra:...} in the config
                shown = HydraConfig.instance().cfg
                with read_write(shown.hydra), open_dict(shown.hydra):
                    # What Hydra sets when it runs the job (${hydra:runtime.output_dir}).
                    shown.hydra.runtime.output_dir = str(
                        shown.hydra.sweep.dir if args.multirun else shown.hydra.run.dir)
                try:
                    problems = _shown_config_problems(config, entry, args.multirun)
                finally:  # the command that runs next (or a caller's process) sets its own
                    HydraConfig.instance().cfg = previous
    except HydraException as err:
        problems = [missing_plugin(err) or composition_error(err, entry, args, overrides)]
    for line in problems:
        report_error(entry, line)
    if problems:
        sys.exit(EXIT_USER_ERROR)


_NOT_IN_STRUCT = re.compile(r"Could not override '([^']+)'")
_NO_OPTION = re.compile(r"Could not find '([^']+)'")


def composition_error(err: Exception, entry: str, args: Any, overrides: list[str]) -> str:
    """Hydra's composition error as one line: a key that is not in the config, with the
    closest known keys; a config choice that does not exist, with the group's options; any
    other, its first line."""
    import difflib

    from hydra import compose, initialize_config_dir

    message = str(err)
    key = _NOT_IN_STRUCT.search(message)
    if key:
        bad = key.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != bad]
        known: list[str] = []
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                known = _dotted_keys(OmegaConf.to_container(
                    compose(args.config_name or entry, overrides=rest), resolve=False))
        except Exception:  # a second mistake: the first one is reported, without suggestions
            known = []
        close = difflib.get_close_matches(bad, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"{bad} is not a known key: {hint}(a new key on purpose is added with "
                f"+{bad}=...)")
    option = _NO_OPTION.search(message)
    options = [str(o) for o in getattr(err, "options", None) or []]
    if option and options:
        group, _, choice = option.group(1).rpartition("/")
        close = difflib.get_close_matches(choice, options, n=1, cutoff=0.5)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"{group}={choice} is not a config of group {group}: {hint}one of {options}"
    override = getattr(err, "override", None)
    if override:  # the grammar's message alone does not say which argument it is about
        return (f"cannot parse the override {override!r} ({first_line(err)}); see "
                "https://hydra.cc/docs/advanced/override_grammar/basic")
    return first_line(err)


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a config as a dotted path (nested mappings walked, lists kept whole)."""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        keys.append(path)
        keys += _dotted_keys(value, path)
    return keys


def _shown_config_problems(config: DictConfig, entry: str, multirun: bool) -> list[str]:
    multirun = multirun or config.hydra.mode == RunMode.MULTIRUN
    run_dir = str(config.hydra.sweep.dir if multirun else config.hydra.run.dir)
    with open_dict(config):  # what Hydra sets when it runs the job
        config.paths.run_dir = run_dir
    if multirun:  # the members run, not the config they are made from
        return member_problems(config, entry)[1]
    try:
        # The quick checks: what needs torch (the encoder's maps) is checked when the command
        # runs; --cfg answers in a second.
        with deferring_probes():
            validate_config(config, entry)
    except UserError as err:
        return [str(err)]
    return []
