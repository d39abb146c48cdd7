"""Runs of a command in processes of their own, without an interpreter start each.

A test that starts many runs of a command (the chain of interruptions in
tests/test_resume.py) pays the import of torch, Lightning and Hydra for each: seconds of CPU
a run, more than a tiny run itself. `ForkServer` starts one process that imports the command
modules once, then forks a child per run. Each child is what `python -m fsre_lightning.<name>`
starts, minus the imports:

- a process of its own, in a session of its own unless asked otherwise
  (`start_new_session=True`): a signal to its process group reaches it, its DataLoader
  workers and the processes it starts only;
- its environment, working directory and `sys.argv` as given; the module run as `__main__`
  (`runpy`, as `python -m` does: Lightning's DDP launcher starts the other ranks with
  `python -m <module>` from it);
- stdout and stderr to files, stdin from /dev/null; the exit status of `sys.exit`, 1 with a
  traceback on an uncaught exception, death by SIGINT on an uncaught KeyboardInterrupt, as
  the interpreter ends; non-daemon threads joined and atexit handlers run first.

What the imports did is shared, which a fresh interpreter would do for itself: a warning at
import time is not printed again (tests of a command's complete output start it with
`subprocess`), and a resource made at import and removed at exit is the server's, removed by
the first child that ends (wandb's folder for the images of its runs: runs that log to wandb
need an interpreter of their own). The server forks from its only thread and has computed
nothing (no OpenMP pool to lose in a child).

    with ForkServer(["fsre_lightning.train"], env) as server:
        proc = server.start("fsre_lightning.train", ["trainer.max_steps=2"], env)
        stdout, stderr = proc.communicate(timeout=600)

`start` returns a `ForkedProcess`: the part of `subprocess.Popen` the tests use (`pid`,
`returncode`, `poll`, `wait`, `communicate`, `send_signal`, `kill`); `run` is
`subprocess.run(..., capture_output=True, text=True)`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any


class ForkedProcess:
    """A child of the fork server, as far as the tests use `subprocess.Popen`."""

    def __init__(self, server: ForkServer, pid: int, args: list[str], stdout: Path,
                 stderr: Path) -> None:
        self.server, self.pid, self.args = server, pid, args
        self.stdout_path, self.stderr_path = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (self.stdout_path.read_text(errors="replace"),
                self.stderr_path.read_text(errors="replace"))

    def send_signal(self, signum: int) -> None:
        # Until the server has reaped it, the child's pid is its own (a zombie at worst).
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """A process that has imported `modules` and forks one child per `start`."""

    def __init__(self, modules: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fsre_lightning.testing.forkserver", *modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=None if env is None else dict(env))
        self._lock = threading.Lock()
        self._outputs = Path(tempfile.mkdtemp(prefix="fsre_forkserver_"))
        self._count = 0
        self._ask({"op": "ready"})  # the imports are done

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (exit {self._proc.wait()})")
        return json.loads(line)

    def start(self, module: str, args: Sequence[str], env: Mapping[str, str],
              cwd: str | os.PathLike[str] | None = None,
              new_session: bool = True) -> ForkedProcess:
        """`python -m <module> args...` with this environment, in a new session unless
        `new_session=False` (then in the fork server's process group)."""
        self._count += 1
        stdout = self._outputs / f"{self._count}.out"
        stderr = self._outputs / f"{self._count}.err"
        pid = self._ask({"op": "start", "module": module, "args": list(args),
                         "env": dict(env), "cwd": str(cwd or os.getcwd()),
                         "stdout": str(stdout), "stderr": str(stderr),
                         "new_session": new_session})["pid"]
        return ForkedProcess(self, pid, [sys.executable, "-m", module, *args], stdout, stderr)

    def run(self, module: str, args: Sequence[str], env: Mapping[str, str],
            timeout: float = 600, new_session: bool = False) -> subprocess.CompletedProcess:
        """`subprocess.run([python, -m, module, *args], capture_output=True, text=True)`."""
        proc = self.start(module, args, env, new_session=new_session)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        shutil.rmtree(self._outputs, ignore_errors=True)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


# ----------------------------------------------------------------------------- the server
def _exit_status(code: object) -> int:
    """The process's exit status for `sys.exit(code)`, as the interpreter makes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the run `request` describes; never returns."""
    import atexit
    import runpy
    import traceback

    status = 1
    try:
        if request["new_session"]:
            os.setsid()
        stdin = os.open(os.devnull, os.O_RDONLY)
        stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        os.closerange(3, 65536)  # the server's pipes and anything else: close_fds=True
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if "OMP_NUM_THREADS" in os.environ and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        sys.argv = [request["module"], *request["args"]]
        # Run fresh as __main__, as `python -m` does (the server may have imported it).
        sys.modules.pop(request["module"], None)
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            status = 0
        except SystemExit as exc:
            status = _exit_status(exc.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            status = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
            status = 1
        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter ends
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if status == -signal.SIGINT:  # the interpreter ends by SIGINT on KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status if status >= 0 else 1)


def serve(modules: Sequence[str]) -> None:
    """Import `modules` (one that does not exist is passed over: a warm-up, not a need), then
    answer one JSON request per line on stdin."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
    protocol_in, protocol_out = sys.stdin, sys.stdout
    for line in protocol_in:
        request = json.loads(line)
        reply: dict[str, Any] = {}
        if request["op"] == "start":
            protocol_out.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply["pid"] = pid
        elif request["op"] == "poll":
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            reply["returncode"] = os.waitstatus_to_exitcode(status) if done else None
        protocol_out.write(json.dumps(reply) + "\n")
        protocol_out.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
