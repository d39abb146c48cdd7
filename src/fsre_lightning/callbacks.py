"""Lightning callbacks of the package."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from fsre_lightning.config.checks import check_int
from fsre_lightning.nonfinite import NonFiniteLossError

log = logging.getLogger(__name__)


class ProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's rich progress bar, showing the logged values named in `show` (callback
    metrics, e.g. train/total) every `metrics_every_n_steps` training steps.

    A value logged with `prog_bar=True` is copied to the host after every step by Lightning's
    loop, which waits for the GPU to finish the step: one more synchronisation per step than
    the non-finite check's (design 7.1), and the CPU cannot queue the next step's kernels
    meanwhile. So the training step logs nothing to the bar and the bar reads these values
    itself, every n steps. The bar itself advances every step.
    """

    def __init__(self, metrics_every_n_steps: int = 10,
                 show: tuple[str, ...] | list[str] = ("train/total",), **kwargs: Any) -> None:
        check_int("metrics_every_n_steps", metrics_every_n_steps, lo=1)
        super().__init__(**kwargs)
        self.metrics_every_n_steps = int(metrics_every_n_steps)
        self.show = list(show)
        self._shown: dict[str, float] = {}
        self._shown_at: int | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule
                    ) -> dict[str, int | str | float | dict[str, float]]:
        items = super().get_metrics(trainer, pl_module)
        if trainer.training:
            step = trainer.global_step
            if self._shown_at is None or step - self._shown_at >= self.metrics_every_n_steps:
                values = trainer.callback_metrics
                self._shown = {k: float(values[k]) for k in self.show if k in values}
                self._shown_at = step
            items.update(self._shown)
        return items


class TrainingStopped(Exception):  # noqa: N818 - a stop on request, not an error
    """Training stopped at a step boundary on a signal; `path` holds the state of that step."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.path = signum, step, path


class StopAtStepBoundary(pl.Callback):
    """SIGTERM (preemption, `timeout`, `docker stop`) or a first Ctrl-C during training: the
    step or validation in progress finishes, `<dirpath>/last.ckpt` is written at that boundary
    and training ends with TrainingStopped. A second Ctrl-C stops at once, without a save.

    A checkpoint taken where the signal lands would hold a half-done step (BatchNorm statistics
    of a batch the optimiser never stepped on, a data position past it), so a resumed run would
    differ from an uninterrupted one. DataLoader workers ignore these signals
    (`data.resumable.ignore_stop_signals`), so that a signal sent to the whole process group
    does not kill them mid-batch.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning's own SIGTERM handler (registered when fit starts), which would stop
        # in the middle of a validation.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        if self.signum is None:
            self.signum = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        # After an epoch's last batch Lightning has not closed the epoch yet (its validation,
        # the epoch counters): a checkpoint here does not resume exactly. The stop waits for
        # the validation's or the epoch's end.
        if batch_idx + 1 < trainer.num_training_batches:
            self._stop_if_asked(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer: pl.Trainer) -> None:
        # Under DDP the ranks stop together if any got the signal (a scheduler may signal one
        # process, or the signal lands between two ranks' boundaries): a rank that went on
        # alone would wait forever in its next all-reduce. One boolean all-reduce per
        # boundary; nothing on a single process.
        if trainer.world_size > 1:
            if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
                return
            self.signum = self.signum or signal.SIGTERM
        elif self.signum is None:
            return
        trainer.save_checkpoint(self.path)
        raise TrainingStopped(self.signum, trainer.global_step, self.path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class RunCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint whose best checkpoints survive a resume into a new folder.

    Lightning restores the best score and the top-k files only when the checkpoint folder is
    the one the state was saved from; a run resumed with `ckpt_path=<file>` writes into a new
    run folder, so its first validation became the best whatever its score, and the best
    entry of metrics.json could point into the previous run folder. Here the previous run's
    top-k files are linked (copied across file systems) into the new folder and the state is
    restored with them; a top-k file that is gone (a checkpoint copied away from its run) is
    dropped with a warning, and a better validation writes a new one.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict.get("dirpath")
        if previous is None or self.dirpath is None or Path(previous) == Path(self.dirpath):
            super().load_state_dict(state_dict)
            return
        moved: dict[str, str] = {}
        for old in state_dict.get("best_k_models") or {}:
            new = Path(self.dirpath) / Path(old).name
            if _carry_file(Path(old), new):
                moved[str(old)] = str(new)
            else:
                log.warning("the best checkpoint %s of the resumed run is gone: its score is "
                            "not kept, the next validation ranks afresh", old)
        best_k = {moved[k]: v for k, v in state_dict["best_k_models"].items() if k in moved} \
            if state_dict.get("best_k_models") else {}
        best = moved.get(str(state_dict.get("best_model_path")), "")
        super().load_state_dict({
            **state_dict, "dirpath": self.dirpath, "best_k_models": best_k,
            "best_model_path": best,
            "best_model_score": state_dict.get("best_model_score") if best else None,
            "kth_best_model_path": moved.get(str(state_dict.get("kth_best_model_path")), ""),
            "kth_value": state_dict.get("kth_value") if best_k else self.kth_value,
            "last_model_path": ""})


def _carry_file(source: Path, target: Path) -> bool:
    """`source` present at `target` (a hard link, else a copy; global rank 0 writes, the other
    DDP ranks only look); False when the source is gone."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if target.is_file():
        return True
    if not source.is_file():
        return False
    if rank_zero_only.rank != 0:
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return True


class CheckpointOnInterrupt(pl.Callback):
    """Write `<dirpath>/last.ckpt` when training crashes, or when Lightning's own SIGTERM
    handler stopped it (a signal before `StopAtStepBoundary` took over, at a step's end).

    The state of a crash is the crash's, mid-step: resuming from it continues, not exactly.
    Lightning's OnExceptionCheckpoint deletes its file again at teardown; here the file stays,
    so `ckpt_path=<dirpath>/last.ckpt` resumes the run.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        # model.nonfinite=stop: the state at hand produced NaN/inf; the last good checkpoint
        # on disk must not be overwritten by it. A stop at a step boundary has saved already;
        # an immediate Ctrl-C lands mid-step, whose state a resumed run could not continue
        # exactly: the last boundary's checkpoint stays.
        if isinstance(exception, NonFiniteLossError | TrainingStopped | KeyboardInterrupt):
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s; resume with ckpt_path=%s",
                        type(exception).__name__, trainer.global_step, self.path, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {}


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python `random` states as tensors and plain types.

    Plain types keep the checkpoint loadable with `torch.load(weights_only=True)` (numpy's own
    state holds an ndarray, which the weights-only unpickler refuses).
    """
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `capture_rng_state`: every generator continues where the captured run was."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()),
                     py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCheckpoint(pl.Callback):
    """Store the random generators' states in every checkpoint; a resumed run restores them.

    Lightning restores model, optimiser, schedulers and loop counters but not the RNGs, so the
    colour-jitter draws (global torch RNG, main process) of a resumed run would differ from an
    uninterrupted one's. The states are restored at `on_train_start`, after everything Lightning
    does while restoring (which may draw random numbers) and right before the first batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is not None:
            restore_rng_state(self._to_restore)
            self._to_restore = None
