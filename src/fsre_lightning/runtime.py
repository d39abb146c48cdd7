"""What every command shares: the config folder, the exit-code policy, preemption, devices.

The commands (`COMMANDS`) call into the library; this module is the library side of
running one: a `UserError` (or a missing file) ends a command with one line on stderr,
``fsre_lightning.<command>: error: <message>``, and exit status 2 (argparse's status for a
bad command line, so every command fails alike); a run stopped by SIGTERM exits with 143, as
a shell reports a process killed by that signal. Every command's `main()` returns its exit
status.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsre_lightning.errors import ConfigError, UserError, first_line

if TYPE_CHECKING:
    import torch

# The Hydra config groups ship inside the package, so an installed wheel finds them; users add
# their own groups with --config-dir or hydra.searchpath, or replace them all by
# FSRE_CONFIG_DIR.
CONFIG_DIR = Path(os.environ.get("FSRE_CONFIG_DIR", Path(__file__).resolve().parent / "conf"))

# The commands, each a module of the package (`python -m fsre_lightning.<command>`) with
# `main(argv=None) -> int` and a console script (`fsre-<command>`, pyproject.toml); the Hydra
# ones are built by `hydra_entry.hydra_command`. No library module imports a command.
COMMANDS = ("train", "evaluate", "evaluate_pose", "predict", "export", "export_gt",
            "import_reference", "export_reference", "pseudolabel", "report", "prepare_kitti")

EXIT_USER_ERROR = 2
# Exit status of a sweep that finished with failed members (each recorded in its folder).
EXIT_SWEEP_FAILED = 1
# Exit status of a run stopped by SIGTERM (preemption): 128 + SIGTERM, as a shell reports it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM

# Mistakes in the user's config or data: reported as one clear line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)


class PreemptedError(Exception):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume.
    `status`: the command's exit status, 128 + the signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, status: int = PREEMPTED_EXIT_CODE) -> None:
        super().__init__(message)
        self.status = status


def _is_sigterm_exception(err: BaseException) -> bool:
    """Lightning's SIGTERMException (imported only where Lightning already is: a process
    without it cannot have raised one)."""
    module = sys.modules.get("pytorch_lightning.utilities.exceptions")
    return module is not None and isinstance(err, module.SIGTERMException)


def report_error(command: str, message: object) -> None:
    """The one line a failed command prints on stderr."""
    print(f"fsre_lightning.{command}: error: {message}", file=sys.stderr)


def exit_status(command: str, err: BaseException) -> int | None:
    """The exit status of a command that stopped on `err`, after printing its message; None
    for an error that is not the user's nor a preemption (a bug: its traceback is due)."""
    if isinstance(err, USER_ERRORS):
        report_error(command, err)
        return getattr(err, "exit_status", EXIT_USER_ERROR)
    if isinstance(err, PreemptedError):
        print(f"fsre_lightning.{command}: {err}", file=sys.stderr)
        return err.status
    if _is_sigterm_exception(err):
        # Lightning raises it (a SystemExit with status 0) when SIGTERM arrives during a
        # validation outside fit: still a preemption, not a success.
        print(f"fsre_lightning.{command}: preempted (SIGTERM) outside training; the run "
              "folder's checkpoints/last.ckpt (if any) holds the trained state", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return None


def run_job(command: str, job: Callable[[Any], Any], cfg: Any) -> int:
    """Run `job(cfg)` and return the command's exit status (see the module docstring)."""
    try:
        job(cfg)
    except (*USER_ERRORS, PreemptedError) as err:
        status = exit_status(command, err)
        assert status is not None
        return status
    except SystemExit as err:  # Lightning's SIGTERMException is one
        if not _is_sigterm_exception(err):
            raise
        status = exit_status(command, err)
        assert status is not None
        return status
    return 0


def discard_unused_run_folder(run_dir: str | Path) -> bool:
    """Remove `run_dir` when it holds nothing but what Hydra writes before a command starts
    (.hydra/ and the job's log): a command stopped by a user error leaves no empty folder
    behind (an afternoon of mistyped overrides made a hundred of them). Returns whether it
    went."""
    folder = Path(run_dir)
    if not folder.is_dir() or folder.resolve() == Path.cwd().resolve():
        return False
    if any(not (entry.name == ".hydra" or (entry.suffix == ".log" and entry.is_file()))
           for entry in folder.iterdir()):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # outputs/<name>/ of a first run: nothing else in it
        folder.parent.rmdir()
    return True


def run_or_exit(command: str, job: Callable[[Any], Any], cfg: Any) -> None:
    """`run_job` inside a Hydra task, whose return value Hydra drops: a failure exits. A user
    error leaves no run folder of Hydra's bookkeeping only."""
    status = run_job(command, job, cfg)
    if status == EXIT_USER_ERROR:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            discard_unused_run_folder(HydraConfig.get().runtime.output_dir)
    if status:
        sys.exit(status)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    """Silence, each for its reason, what printed on every run and said nothing about it, so
    that a real warning is seen:
    - torch (2.14 here) deprecates `LeafSpec`, which Lightning 2.6's pytree helper still builds
      (a FutureWarning per training and per validation; nothing to act on for a user);
    - Lightning's advertisement for its cloud logger ("💡 Tip: ... litlogger") at every fit;
    - alembic's "setup plugin ..." lines (Optuna's storage layer imports it) at every sweep.
    Lightning's own messages (devices, `max_steps` reached) and every other warning stay."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    logging.getLogger("alembic").setLevel(logging.WARNING)


def plain_optuna_logs() -> None:
    """Optuna's log lines through the root logger (Hydra's format, no colour codes): its own
    handler writes ANSI colours even where the output is a file or a cluster's log."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def call_hydra(task: Callable[[], Any], argv: Sequence[str] | None = None,
               before: Callable[[Sequence[str]], None] | None = None) -> int:
    """Run a `@hydra.main` task on the command line `argv` (default: sys.argv[1:]) and return
    its exit status (Hydra reports its own errors, e.g. an unknown override, with status 1).
    `before(argv)` runs first and may exit too (`preflight.check_before_hydra`)."""
    quiet_known_noise()
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0], *argv]
    try:
        if before is not None:
            before(sys.argv[1:])
        task()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that a user's mistake raised inside a target (missing
    ImageNet weights, a missing optional package) comes out as a one-line UserError instead of
    Hydra's nested InstantiationException."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as err:
        cause: BaseException = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        if isinstance(cause, ModuleNotFoundError | ImportError):
            target = config.get("_target_") if hasattr(config, "get") else None
            raise UserError(f"{target or 'a config target'} needs a package that is not "
                            f"installed ({first_line(cause)}); install the optional extra that "
                            "provides it (pyproject.toml [project.optional-dependencies], e.g. "
                            "pip install 'fsre-lightning[tensorboard]')") from None
        raise


def check_accelerator(name: str) -> None:
    """A trainer accelerator this machine has: checked before any data work, not when the
    Trainer is built after an hour of cache building."""
    import torch

    if str(name) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", name, "no CUDA device is visible on this "
                          "machine (check CUDA_VISIBLE_DEVICES and the driver): use trainer=cpu, "
                          "or run on a GPU node")


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as torch reads it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def strict_json(data: Any) -> str:
    """`data` as strict JSON (indented): NaN and infinities, which Python's json writes as the
    non-standard NaN/Infinity that strict parsers reject, become null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False)


def write_json(path: str | Path, data: Any) -> Path:
    """Write `strict_json(data)` to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json(data) + "\n")
    return path
