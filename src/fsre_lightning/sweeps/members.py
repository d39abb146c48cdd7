"""Sweep members: each in a process of its own, failures recorded, a stopped sweep resumed in
place.

- `launch_member`: one member of a sweep of Hydra's basic (local) launcher, run in a child
  process so that its death by any cause (a segfault, the OOM killer, SIGKILL) is observed,
  recorded and survived; `run_member` runs one in this process (the child itself, or a
  launcher that starts a process per member of its own, e.g. SLURM). A failure is written
  into the member's folder (`failed.json`) and the sweep goes on. `SweepOutcome`, a Hydra
  callback, lists the failed members at the end with the command that reruns each, and the
  command then exits non-zero.
- A stopped sweep resumes in its own folder (`sweep_resume_command`, `ckpt_path=auto`):
  finished members are kept, the stopped one resumes exactly (docs/design.md section 6).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fsre_lightning.errors import ConfigError, first_line
from fsre_lightning.sweeps.context import (
    MEMBER_ENV,
    HydraCallback,
    hydra_config,
    member_context,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ members that fail
# Written into a member's folder when it fails: what went wrong and how to rerun it.
FAILURE_FILE = "failed.json"


# The failed members of the last sweep of this process (SweepOutcome fills it at the end).
failed_members: list[dict[str, Any]] = []


def rerun_command(command: str, overrides: list[str]) -> str:
    """The shell line that runs one member again (a one-member sweep, so an experiment in
    MULTIRUN mode does not start all its rows again)."""
    return shlex.join([f"fsre-{command.replace('_', '-')}", "--multirun", *overrides])


def member_overrides() -> list[str]:
    """The overrides that make this member: the user's launcher and sweeper choices
    (hydra/launcher=slurm ...) and the member's own values; Hydra's internal keys are not part
    of a command line."""
    member = member_context()
    if member is not None:
        return list(member["overrides"])
    hydra_cfg = hydra_config()
    if hydra_cfg is None:
        return []
    overrides = [o for o in hydra_cfg.overrides.hydra if not str(o).startswith("hydra.mode")]
    return [str(o) for o in [*overrides, *hydra_cfg.overrides.task]]


def write_failure(run_dir: str | Path, command: str, error: str, kind: str, details: str = ""
                  ) -> dict[str, Any]:
    """Write `failed.json` into a member's folder (error, its type, overrides, the command that
    reruns it, a traceback or other details) and return what was written."""
    overrides = member_overrides()
    record = {"command": command, "error": error, "type": kind, "overrides": overrides,
              "rerun": rerun_command(command, overrides), "traceback": details}
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILURE_FILE).write_text(json.dumps(record, indent=2))
    return record


def record_failure(run_dir: str | Path, command: str, err: BaseException) -> dict[str, Any]:
    """`write_failure` for an exception."""
    return write_failure(run_dir, command, first_line(err), type(err).__name__,
                         "".join(traceback.format_exception(err)))


# What usually sends a signal that kills a member outright: said in its failure record.
_SIGNAL_CAUSES = {
    "SIGKILL": "the kernel's out-of-memory killer, or kill -9",
    "SIGSEGV": "a crash in native code (PyTorch, a driver, an extension)",
    "SIGBUS": "a crash in native code, or a memory-mapped file that shrank",
    "SIGABRT": "an abort in native code (a failed C++ or CUDA assertion)",
}


def record_death(run_dir: str | Path, command: str, returncode: int) -> dict[str, Any]:
    """`failed.json` of a member process that ended without writing its own: killed by a
    signal (negative return code, as subprocess reports it) or exited with `returncode`."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        cause = _SIGNAL_CAUSES.get(name)
        error = f"killed by {name} (signal {-returncode})" + (f": {cause}" if cause else "")
        return write_failure(run_dir, command, error, "killed")
    return write_failure(run_dir, command, f"exited with status {returncode} without a "
                         "failure record", "exited")


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
        from fsre_lightning.tracking.wandb import close_open_wandb_run  # Lightning's, slow

        close_open_wandb_run()
        if member_context() is not None:
            # A member in its own process (launch_member): the parent reads the record.
            sys.exit(status or 1)
        log.error("sweep member %s failed (%s: %s); recorded in %s, the sweep goes on",
                  Path(run_dir).name, record["type"], record["error"],
                  Path(run_dir) / FAILURE_FILE)
        return math.nan


# A member's overrides as first launched, so that a resume in place finds the same member.
MEMBER_FILE = "member.json"


# Return values of the member process that mean "stopped on a signal, state saved".
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# Hydra's command-line flags that take the next argument as their value.
_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                     "--cfg", "-c", "--package", "-p", "--experimental-rerun")


# What ckpt_path means inside a sweep: this member's own last checkpoint.
RESUME_VALUES = ("last", "auto")


def sweep_resume_command(command: str, sweep_dir: str | Path,
                         argv: Sequence[str] | None = None) -> str:
    """The command line that completes a stopped sweep in its own folder: the one that started
    it (`argv`, default this process's), with `hydra.sweep.dir` and `ckpt_path=auto`."""
    args = [a for a in (sys.argv[1:] if argv is None else argv)
            if not a.startswith(("hydra.sweep.dir=", "ckpt_path="))]
    # Right after the last override: Hydra's parser takes its overrides as one positional run,
    # so nothing may follow a flag (--multirun) that comes after them.
    end, skip = 0, False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
        else:
            end = i + 1
    added = [f"hydra.sweep.dir={sweep_dir}", "ckpt_path=auto"]
    return shlex.join([f"fsre-{command.replace('_', '-')}", *args[:end], *added, *args[end:]])


def resume_hint(path: str | Path | None, name: str) -> str:
    """How to resume a run stopped with its state in `path`: the sweep's resume command for a
    member, `ckpt_path=...` for a single run."""
    member = member_context()
    if member is not None:
        return f"resume the sweep in place with: {member['resume']}"
    if path is None:
        return ("no checkpoint was written (nothing trained yet, or "
                "callbacks.checkpoint_on_interrupt is off)")
    return f"resume exactly with ckpt_path={path} (or ckpt_path=last name={name})"


def member_checkpoint(run_dir: str | Path, value: str) -> Path | None:
    """`ckpt_path=last|auto` in a sweep member: the member folder's own last.ckpt (a SLURM
    requeue checkpoint too); None for `auto` without one, FileNotFoundError for `last`."""
    folder = Path(run_dir)
    found = [p for p in (folder / "checkpoints" / "last.ckpt", *folder.glob("hpc_ckpt_*.ckpt"))
             if p.is_file()]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    if value == "auto":
        log.info("ckpt_path=auto: member %s has no checkpoint yet, starting fresh", folder.name)
        return None
    raise FileNotFoundError(f"ckpt_path=last: sweep member folder {folder} holds no "
                            "checkpoints/last.ckpt; use ckpt_path=auto to start it fresh")


def member_value(run_dir: str | Path) -> float | None:
    """The monitored value of a finished member (its metrics.json), None if it has none."""
    try:
        results = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    value = (results.get("monitor") or {}).get("value") if isinstance(results, dict) else None
    return math.nan if value is None else float(value)


def kept_member_value(cfg: Any, run_dir: str | Path) -> float | None:
    """In a sweep resumed in place (`ckpt_path=auto|last`): the value of this member if it
    finished before (it is kept, not run again), else None. A folder of another member (other
    overrides) is a ConfigError."""
    if str(cfg.get("ckpt_path")) not in RESUME_VALUES:
        return None
    hydra_cfg = hydra_config()
    folder = Path(run_dir)
    _check_same_member(folder, [str(o) for o in hydra_cfg.overrides.task])
    done = member_value(folder)
    if done is not None:
        log.info("sweep member %s finished before (%s): kept", folder.name,
                 folder / "metrics.json")
    return done


def _hydra_flags(argv: Sequence[str]) -> list[str]:
    """The command line's config-location flags (--config-dir X, -cn=Y, ...), which a member's
    own process needs to compose the same config."""
    names = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")
    flags: list[str] = []
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
        elif arg.startswith(tuple(f"{n}=" for n in names)):
            flags.append(arg)
    return flags


def _check_same_member(run_dir: Path, overrides: list[str]) -> None:
    """A resume in place must find the member it resumes: same overrides as first launched."""
    recorded_file = run_dir / MEMBER_FILE
    if not recorded_file.is_file():
        return
    recorded = json.loads(recorded_file.read_text()).get("overrides", [])

    def key(items: Sequence[str]) -> list[str]:
        return sorted(o for o in items if not o.startswith("ckpt_path="))

    if key(recorded) != key(overrides):
        raise ConfigError(f"hydra.sweep.dir: member {run_dir.name} of {run_dir.parent} ran "
                          f"with {' '.join(key(recorded))}, this sweep's member "
                          f"{run_dir.name} is {' '.join(key(overrides))}; resume a sweep with "
                          "the command that started it (its printed resume line)")


def _set_up_member_process() -> None:
    """In the member's process before it runs: its own process group (a signal to the sweep's
    group reaches the sweep, which forwards it once), and SIGTERM when the sweep dies (it then
    stops at a step boundary and saves, Linux only)."""
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _forwarding_stop_signals(proc: subprocess.Popen) -> Iterator[list[int]]:
    """While the member runs, SIGTERM and SIGINT to this process are passed on, each once, to
    the member's process group (its DataLoader workers too); yields the signals received."""
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def launch_member(command: str, cfg: Any, run_dir: str | Path) -> float:
    """Run this sweep member in a child process and return its monitored value (NaN when it
    failed, what Optuna counts as a failed trial).

    The child is this command in single-run mode, writing into the member's folder. Whatever
    ends it (an error, a segfault, the OOM killer's SIGKILL) is recorded in `failed.json` and
    the sweep goes on; SIGTERM/SIGINT stop the whole sweep (the member stops at a step boundary
    and saves, and the command that resumes the sweep in place is printed). With
    `ckpt_path=auto` (or `last`) a finished member is kept and not run again, a stopped or
    failed one resumes from its own last.ckpt.
    """
    from hydra.utils import get_original_cwd

    from fsre_lightning.runtime import report_error

    hydra_cfg = hydra_config()
    folder = Path(run_dir)
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    task = [str(o) for o in hydra_cfg.overrides.task]
    resume = sweep_resume_command(command, sweep_dir)
    done = kept_member_value(cfg, folder)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILURE_FILE).unlink(missing_ok=True)  # a failed member runs again
    (folder / MEMBER_FILE).write_text(json.dumps({"overrides": task}, indent=2))
    context = {"sweep_dir": str(sweep_dir), "overrides": member_overrides(), "resume": resume}
    argv = [sys.executable, "-m", f"fsre_lightning.{command}", *_hydra_flags(sys.argv[1:]), *task,
            f'hydra.run.dir="{str(folder).replace(chr(92), "/")}"', "hydra.output_subdir=null",
            "hydra.mode=RUN"]
    proc = subprocess.Popen(argv, cwd=get_original_cwd(),
                            env={**os.environ, MEMBER_ENV: json.dumps(context)},
                            preexec_fn=_set_up_member_process)
    with _forwarding_stop_signals(proc) as received:
        returncode = proc.wait()
    stopped = [s for s in received if -returncode == s or returncode == 128 + s]
    if returncode in (128 + s for s in _STOP_SIGNALS) or stopped:
        # The member saved its state at a step boundary and said how to resume (or was
        # signalled before it started training): the sweep stops here.
        status = returncode if returncode > 0 else 128 + -returncode
        if returncode < 0:
            report_error(command, f"sweep stopped by {signal.Signals(-returncode).name} "
                         f"before member {folder.name} started training; resume it in place "
                         f"with: {resume}")
        sys.exit(status)
    if returncode == 0:
        value = member_value(folder)
        return math.nan if value is None else value
    record = read_failure(folder) or record_death(folder, command, returncode)
    log.error("sweep member %s failed (%s: %s); recorded in %s, the sweep goes on",
              folder.name, record["type"], record["error"], folder / FAILURE_FILE)
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
