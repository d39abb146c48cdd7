"""A cluster's faults at reproducible moments: a callback that signals its own process group.

`SignalAt` sends SIGTERM or SIGINT to the whole process group (the training process and its
DataLoader workers, as SLURM, `timeout` and a terminal's Ctrl-C do) at the start of a chosen
training step, or during the first validation after it. Only for runs started in their own
session (`subprocess.Popen(..., start_new_session=True)`): in any other process it would
signal the caller too. Add it with
`+callbacks.fault._target_=fsre_lightning.testing.signals.SignalAt +callbacks.fault.step=2`.
`rank=N` signals the DDP process of that rank alone instead (what a scheduler that signals
one task does).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Signal the process group once: at the start of training step `step` (`during=train`),
    or at the first batch of the first validation once `step` steps are done
    (`during=validation`)."""

    def __init__(self, step: int = 1, signum: str = "SIGTERM", during: str = "train",
                 rank: int | None = None) -> None:
        if during not in ("train", "validation"):
            raise ValueError(f"during={during!r}: train or validation")
        self.step, self.signum, self.during = int(step), signal.Signals[signum], during
        self.rank = rank
        self.sent = False

    def _send(self, trainer: pl.Trainer) -> None:
        if self.sent:
            return
        self.sent = True
        if self.rank is None:
            os.killpg(os.getpgrp(), self.signum)
        elif trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             *args: Any) -> None:
        if self.during == "train" and trainer.global_step == self.step:
            self._send(trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                  *args: Any) -> None:
        if (self.during == "validation" and not trainer.sanity_checking
                and trainer.global_step >= self.step):
            self._send(trainer)
