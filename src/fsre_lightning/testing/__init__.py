"""Helpers for tests and benchmarks, importable without path tricks (like `torch.testing`).

- `kitti`: a tiny KITTI-raw folder with label PNGs, built in a temporary folder;
- `checkpoints`: randomly initialised checkpoints in run folders;
- `objective`: the total loss as a plain, unoptimised composition of the loss functions (the
  equivalence tests and the step benchmark compare the optimised objective with it);
- `optimiser_configs`: the package's own optimiser and scheduler configs, for modules built in
  Python rather than by Hydra;
- `compose_config`, `command_env`, `run_command`, `TINY_SYNTHETIC`: composed configs and
  command runs in a temporary folder (tests/conftest.py offers them as fixtures);
- `run_main`: a command's `main(argv)` in this process, with its exit status and output as
  `run_command` gives them (no interpreter start: seconds less per call);
- `closed_port`: a local port nothing listens on, as a URL's port for "no network".
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fsre_lightning.runtime import CONFIG_DIR


def optimiser_configs(optimizer: str = "adam", scheduler: str = "multistep", *,
                      optimizer_args: Mapping[str, Any] | None = None,
                      scheduler_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"optimizer": ..., "scheduler": ...} from conf/model/{optimizer,scheduler}/<name>.yaml,
    updated with the given arguments (FSREModule's `optimizer` and `scheduler` arguments)."""
    out: dict[str, Any] = {}
    for group, name, args in (("optimizer", optimizer, optimizer_args),
                              ("scheduler", scheduler, scheduler_args)):
        node = OmegaConf.load(CONFIG_DIR / "model" / group / f"{name}.yaml")
        out[group] = {**OmegaConf.to_container(node, resolve=False), **(args or {})}
    return out


# A tiny synthetic world (3 drives of 8 frames at 64 x 192): generation and a training step
# take seconds.
TINY_SYNTHETIC = (
    "data=synthetic",
    "model.network.pretrained=false",
    "data.height=64",
    "data.width=192",
    "data.batch_size=2",
    "data.num_workers=0",
    "++data.synthetic.num_drives=3",
    "++data.synthetic.frames_per_drive=8",
    "++data.synthetic.height=64",
    "++data.synthetic.width=192",
)


# Experiments that need an optional Hydra plugin (an extra of the package): name -> plugin module.
EXPERIMENT_PLUGINS = {"search_sgt": "hydra_plugins.hydra_optuna_sweeper"}


def installed(module: str) -> bool:
    """Whether `module` can be imported (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def experiments() -> list[Any]:
    """Every experiment config as a pytest parameter; those whose plugin is not installed are
    skipped, saying which extra to install."""
    import pytest

    names = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    return [pytest.param(name, marks=pytest.mark.skipif(
        name in EXPERIMENT_PLUGINS and not installed(EXPERIMENT_PLUGINS[name]),
        reason=f"{name} needs {EXPERIMENT_PLUGINS.get(name)} (an optional extra)"))
        for name in names]


def compose_config(entry: str, overrides: str | Sequence[str] = (), *,
                   root: Path | None = None, hydra: bool = False) -> DictConfig:
    """The composed config of `conf/<entry>.yaml` (overrides: a list or one space-separated
    string), with data and outputs under `root` when given; `hydra=True` keeps the hydra
    node."""
    items = overrides.split() if isinstance(overrides, str) else list(overrides)
    if root is not None:
        items = [f"paths.root_dir={root}", f"paths.data_dir={root / 'data'}",
                 f"paths.output_dir={root / 'outputs'}", *items]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(entry, overrides=items, return_hydra_config=hydra)


def command_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a command run by a test: data and runs under `root`, no wandb."""
    return {**os.environ, "FSRE_DATA_DIR": str(root / "data"),
            "FSRE_OUTPUT_DIR": str(root / "outputs"), "WANDB_MODE": "disabled", **extra}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(command: str, args: Sequence[str], env: Mapping[str, str],
                timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m fsre_lightning.<command> args...`, output captured as text."""
    return subprocess.run([sys.executable, "-m", f"fsre_lightning.{command}", *args],
                          env=dict(env), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


# Python's warning filters when no -W option or PYTHONWARNINGS is given (what a command line
# user sees), first to last; anything else is shown once per location.
_DEFAULT_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"),
                            ("ignore", DeprecationWarning, ""),
                            ("ignore", PendingDeprecationWarning, ""),
                            ("ignore", ImportWarning, ""),
                            ("ignore", ResourceWarning, ""))


def run_main(main: Callable[[Sequence[str]], int], args: Sequence[str]
             ) -> subprocess.CompletedProcess:
    """`main(args)` of a command module (`fsre_lightning.<command>.main`) in this process, as
    `run_command` runs the command in a child: the exit status and what it wrote to stdout and
    stderr, warnings included, written to stderr where they occur as Python's default filters
    show them (so that "one line, no traceback" checks mean what they mean for a child). The
    environment is this process's (tests set it with monkeypatch)."""
    out, err = io.StringIO(), io.StringIO()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = show
        status = main(list(args))
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())
