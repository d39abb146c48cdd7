"""Lightning callbacks of the package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(pl.Callback):
    """Write `<dirpath>/last.ckpt` when training is interrupted (Ctrl-C) or crashes.

    Lightning's OnExceptionCheckpoint deletes its file again at teardown; here the file stays,
    so `ckpt_path=<dirpath>/last.ckpt` resumes the interrupted run.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.warning("%s at step %d: saved %s; resume with ckpt_path=%s",
                        type(exception).__name__, trainer.global_step, self.path, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {}
