"""DataLoader worker processes: batches leave them in shared memory, and the train and
validation workers are started once per fit, not once per epoch (persistent_workers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import fsre_lightning.data.dataset as dataset_module
import fsre_lightning.data.kitti as kitti_module
from fsre_lightning.data import KittiDataModule
from fsre_lightning.data.dataset import collate, stack
from fsre_lightning.data.resumable import SeededItems
from fsre_lightning.testing.kitti_tree import make_kitti


def test_stack_in_a_worker_writes_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [torch.rand(3, 3, 8, 16) for _ in range(4)]
    labels = [torch.randint(0, 19, (8, 16)) for _ in range(4)]
    assert not stack(frames).is_shared()  # the main process: a plain stack
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: object())
    for values in (frames, labels):
        out = stack(values)
        assert out.is_shared() and out.is_contiguous()
        assert out.dtype == values[0].dtype
        assert torch.equal(out, torch.stack(values))


def test_a_worker_collates_the_same_batch_as_the_main_process() -> None:
    items = [{"frames": torch.rand(3, 3, 8, 16), "labels": torch.randint(0, 19, (8, 16)),
              "index": i, "name": f"s{i}"} for i in range(3)]
    loader = torch.utils.data.DataLoader(items, batch_size=3, num_workers=1, collate_fn=collate)
    (from_worker,) = list(loader)
    here = collate(items)
    assert from_worker["name"] == here["name"]
    for key in ("frames", "labels", "index"):
        assert torch.equal(from_worker[key], here[key]), key


class _Probe(pl.LightningModule):
    """The smallest module that trains on the data module's batches; counts epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.epochs = {"train": 0, "val": 0}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.w * batch["frames"].mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert batch["frames"].shape[0] > 0

    def on_train_epoch_start(self) -> None:
        self.epochs["train"] += 1

    def on_validation_epoch_start(self) -> None:
        self.epochs["val"] += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow  # a Lightning fit of 3 epochs with worker processes: ~5 s
def test_workers_are_started_once_per_fit_not_per_epoch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = tmp_path / "worker_starts.txt"
    original = kitti_module.ignore_stop_signals

    def counting_init(worker_id: int) -> None:
        # Forked workers inherit this function: each start appends a line, tagged by loader.
        info = torch.utils.data.get_worker_info()
        kind = "train" if isinstance(info.dataset, SeededItems) else "val"
        with open(starts, "a") as f:
            f.write(f"{kind} {os.getpid()}\n")
        original(worker_id)

    monkeypatch.setattr(kitti_module, "ignore_stop_signals", counting_init)
    root = make_kitti(tmp_path, frames=6)
    dm = KittiDataModule(root, root / "splits" / "tiny", height=64, width=192, batch_size=2,
                         num_workers=1, label_format="label_ids", eval_crop="none")
    module = _Probe()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert module.epochs == {"train": 3, "val": 3}
    lines = starts.read_text().split()
    assert lines[::2].count("train") == 1, lines  # one worker, started once for 3 epochs
    assert lines[::2].count("val") == 1, lines


def test_a_sigterm_to_a_worker_being_started_does_not_kill_it() -> None:
    """A signal to the process group can reach a worker before its init function has set its
    handlers; it must wait for them (WorkerSafeDataLoader), not kill the worker."""
    import signal
    import time

    from fsre_lightning.data.resumable import WorkerSafeDataLoader, ignore_stop_signals

    items = [torch.full((2,), float(i)) for i in range(4)]
    loader = WorkerSafeDataLoader(items, batch_size=2, num_workers=1,
                                  worker_init_fn=ignore_stop_signals)
    iterator = iter(loader)
    (worker,) = iterator._workers  # just forked: its init function has most likely not run
    os.kill(worker.pid, signal.SIGTERM)
    batches = [next(iterator) for _ in range(2)]  # served in the worker's grace period
    assert torch.equal(torch.cat(batches).flatten(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3.0]))
    time.sleep(0.2)
    assert worker.exitcode is None or worker.exitcode == 0  # not killed by the signal
    # The parent's own mask is restored: it still receives the signals.
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGINT}
    del iterator
