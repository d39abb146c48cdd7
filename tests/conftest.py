"""Fixtures shared by the test modules (the helpers behind them: `fsre_lightning.testing`).

Tiers: tests marked `slow` start subprocesses or train end to end (resume after SIGKILL, DDP,
sweeps, export, the command lines); `make test-fast` (pytest -m "not slow") is the inner loop,
`make test` (what CI runs) runs everything. Both run on one pytest-xdist worker per core
(`--dist loadgroup`: a worker takes the next test when it is nearly idle; tests that share an
expensive module fixture carry one `xdist_group` mark). Commands run in-process through their
`main(argv)` wherever no real signal, crash or second process is needed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

from fsre_lightning.testing import TINY_SYNTHETIC, command_env, compose_config, run_command
from fsre_lightning.testing.forkserver import ForkServer

# Tests never download: the Hugging Face hub is offline for the suite and every command it
# starts (a download test mocks the hub).
os.environ["HF_HUB_OFFLINE"] = "1"

# The longest tests (each a minute or more of a worker's time on 2 cores), started first so
# that the workers end together: the many short tests fill the time around them.
START_FIRST = (
    "tests/test_resume.py::test_a_chain_of_interruptions_resumes_bit_identical",
    "tests/test_nonfinite.py::",
    "tests/test_sweeps.py::test_a_killed_member_is_recorded_and_a_stopped_sweep_completes",
    "tests/test_installed.py::",
    "tests/test_experiments.py::test_ablation_h_smoke_sweep",
    "tests/test_sweeps.py::test_a_diverging_member_fails_alone",
    "tests/test_sweeps.py::test_optuna_search",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """START_FIRST, then the other slow tests, then the grouped tests (one unit of work each
    under `--dist loadgroup`: a late one leaves the other workers idle), then the rest, each in
    collection order; under loadgroup, each test of an `xdist_group` named by its group."""

    def rank(item: pytest.Item) -> int:
        for i, prefix in enumerate(START_FIRST):
            if item.nodeid.startswith(prefix):
                return i
        if item.get_closest_marker("slow") is not None:
            return len(START_FIRST)
        return len(START_FIRST) + 1 + (item.get_closest_marker("xdist_group") is None)

    order = {id(item): (rank(item), i) for i, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])
    if getattr(config.option, "loadgroup", False):
        _name_xdist_groups(items)


def _name_xdist_groups(items: list[pytest.Item]) -> None:
    """What pytest-xdist's worker does for loadgroup, through the attribute pytest 9 reads: a
    grouped test's node id ends in @<group>, the scheduler's unit of work. (xdist 3.8 sets
    `_nodeid`, which pytest 9 no longer reads: its groups were split across workers, and the
    non-finite cases ran twice.) A node id that has its suffix already is left alone."""
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        if names and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in-process (Hydra) configures logging with handlers on this test's capture
    streams; later tests would log into closed streams ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _hydra_config_as_it_was() -> Iterator[None]:
    """A command run in-process leaves Hydra's global HydraConfig set (`--cfg` shows a config
    without a run folder); later compositions would resolve ${hydra:...} against it."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[Callable[[str], Path]]:
    """mktemp(name) for module-scoped fixtures; the folders go when the module's tests are done
    and none of them failed. pytest keeps such folders to the session's end, and a full run
    writes dozens of ~300 MB checkpoints: CI machines with little free disk filled up."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def compose() -> Callable[..., DictConfig]:
    """compose(entry, overrides, root=None, hydra=False): `testing.compose_config`."""
    return compose_config


@pytest.fixture
def tiny_synthetic() -> list[str]:
    """Overrides for a tiny synthetic world: seconds to generate and to train a step on."""
    return list(TINY_SYNTHETIC)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a command run in a test: data and runs under tmp_path, no wandb."""
    return command_env(tmp_path)


@pytest.fixture
def command_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path, made the data and output folder of commands run in-process
    (`fsre_lightning.<command>.main(argv)`) by the environment `cli_env` gives a subprocess."""
    for key, value in command_env(tmp_path).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    return tmp_path


@pytest.fixture
def command(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """command(name, args, env=cli_env, timeout=600): `python -m fsre_lightning.<name>`."""

    def _run(name: str, args: Sequence[str], env: dict[str, str] | None = None,
             **kwargs: object) -> subprocess.CompletedProcess:
        return run_command(name, args, env or cli_env, **kwargs)

    return _run


@pytest.fixture(scope="session")
def forked() -> Iterator[ForkServer]:
    """Starts `python -m fsre_lightning.<command>` runs (`.start`, `.run`), each a process of
    its own, forked from one that has imported the train command (`testing.forkserver`): the
    import of torch and Lightning, seconds of CPU, once per worker instead of once per run.
    Tests of a command's whole output (warnings at import included) use `command`."""
    # The training library, not only the command (which defers its heavy imports).
    server = ForkServer(["fsre_lightning.training", "fsre_lightning.train"])
    yield server
    server.close()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. a weight download) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
