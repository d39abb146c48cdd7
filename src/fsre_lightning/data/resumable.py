"""A training DataLoader whose order and random draws survive a kill-and-resume exactly.

Lightning restarts an interrupted epoch from a fresh iterator of the train loader. With a plain
shuffled loader that replays a *new* random order (and new flip draws) for the rest of the
epoch, so a resumed run drifts away from the uninterrupted one. Here:

* the shuffle order is a pure function of (seed, epoch) (`EpochShuffleSampler`);
* each sample's own random draws (the horizontal flip of `KittiDataset`) come from a torch
  seed that is a function of (seed, epoch, sample index) (`SeededItems`), so they do not depend
  on which worker process reads the sample or on what was read before it;
* the loader counts the batches it has handed out and reports them in `state_dict`, which
  Lightning stores in the checkpoint (`loops.fit_loop.state_dict.combined_loader`) and gives
  back through `load_state_dict` on resume: the restarted epoch skips the consumed batches.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def mix_seed(seed: int, epoch: int, index: int = -1) -> int:
    """A 63-bit torch seed that depends on all of (seed, epoch, index).

    A hash, not arithmetic: nearby (epoch, index) pairs must not give related or equal seeds.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Random permutation of `range(num_samples)` seeded by (seed, epoch); yields (epoch, index).

    The epoch travels with each index so that `SeededItems` can seed per sample even inside
    persistent worker processes (which never see `set_epoch` on their copy of the dataset).
    `skip` drops the first samples of the next iteration (a resumed, half-done epoch).
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, skip: int) -> None:
        """Make the next iteration of `epoch` start after its first `skip` samples."""
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(skip))

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Resolved lazily (at the first index), after Lightning's set_epoch for this epoch.
        epoch, skip = self.epoch, 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None
        for index in self.order(epoch)[skip:]:
            yield epoch, index

    def __len__(self) -> int:
        # The full epoch: Lightning's epoch length and step counting must not change on resume.
        return self.num_samples


class SeededItems(Dataset):
    """`dataset[index]` with torch's global RNG seeded from (seed, epoch, index) for that item.

    The caller's RNG state is put back afterwards, so the main process's random stream (colour
    jitter, dropout) is the same with and without this wrapper. Plain integer indices (e.g. from
    a DistributedSampler that replaced ours) are passed through unseeded.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Code that inspects loader.dataset (entries, sizes) keeps working.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class WorkerSafeDataLoader(DataLoader):
    """A DataLoader whose worker processes are born with SIGINT and SIGTERM blocked.

    `ignore_stop_signals` installs the workers' own handlers, but only once a worker runs
    its init function; a signal sent to the process group while workers are being started
    (the validation loader's at its first use, a loader on a loaded machine) would otherwise
    kill a worker with the default action, and the run would crash instead of stopping at a
    step boundary. Blocked in the parent while it starts them (the child inherits the mask),
    the signals stay pending in a new worker until its handlers are in place; the parent
    receives its own as soon as the workers exist.
    """

    def __iter__(self) -> Any:
        starts_workers = (self.num_workers > 0 and self.worker_init_fn is ignore_stop_signals
                          and threading.current_thread() is threading.main_thread())
        if not starts_workers:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class ResumableDataLoader(WorkerSafeDataLoader):
    """Shuffled training loader with exact mid-epoch resume (see the module docstring).

    Lightning treats any loader with `state_dict` / `load_state_dict` as stateful: it saves the
    state with every checkpoint and restores it before the first batch of a resumed run.
    """

    def __init__(self, dataset: Dataset, *, seed: int, batch_size: int, drop_last: bool = True,
                 **kwargs: Any) -> None:
        self.seed = int(seed)
        # Lightning re-creates the loader (DDP) from its attributes: it then passes the wrapped
        # dataset and its own (distributed) sampler, which take precedence over ours.
        if not isinstance(dataset, SeededItems):
            dataset = SeededItems(dataset, self.seed)
        sampler = kwargs.pop("sampler", None) or EpochShuffleSampler(
            len(dataset), self.seed)
        kwargs.pop("shuffle", None)
        # Own generator: the per-iterator base seed (worker seeds) is then a function of
        # (seed, epoch) and creating an iterator does not consume the global torch RNG.
        generator = kwargs.pop("generator", None) or torch.Generator()
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                         generator=generator, **kwargs)
        self.batches_served = 0

    @property
    def epoch_sampler(self) -> EpochShuffleSampler:
        """Ours, also when Lightning wrapped it in a DistributedSamplerWrapper (DDP)."""
        sampler = self.sampler
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
        return inner if isinstance(inner, EpochShuffleSampler) else sampler  # type: ignore

    def __iter__(self) -> Iterator[Any]:
        sampler = self.epoch_sampler
        if sampler is not self.sampler:
            # Sharded by a DistributedSamplerWrapper: skipping a prefix of the global order
            # would not give each rank its own remaining samples; replay the epoch instead.
            sampler._resume = None
        skipped = sampler._resume[1] // self.batch_size if (
            sampler._resume is not None and sampler._resume[0] == sampler.epoch) else 0
        self.generator.manual_seed(mix_seed(self.seed, sampler.epoch, -2))  # type: ignore[union-attr]
        self.batches_served = skipped
        for batch in super().__iter__():
            # Counted when handed out: Lightning fetches each batch right before training on it
            # (no prefetch for a loader with a length), so this equals the consumed batches.
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "batches": self.batches_served,
                "batch_size": int(self.batch_size or 1), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state:
            # The checkpoint's seed, even if the resumed config sets another: the rest of the
            # interrupted epoch must be the same samples with the same draws.
            self.seed = int(state["seed"])
            self.epoch_sampler.seed = self.seed
            if isinstance(self.dataset, SeededItems):
                self.dataset.seed = self.seed
        if state.get("batch_size") not in (None, self.batch_size):
            # Another batch size cannot replay the same sample order: start the epoch over.
            self.epoch_sampler.set_epoch(int(state["epoch"]))
            return
        self.epoch_sampler.resume_at(int(state["epoch"]), int(state["batches"]) * int(
            self.batch_size or 1))
        self.batches_served = int(state["batches"])


# How long a DataLoader worker keeps serving after a SIGTERM to its process group: time for
# the main process to finish its step, save and shut its workers down. (A worker that ignored
# SIGTERM for good would hang the interpreter's exit, which stops workers with SIGTERM.)
WORKER_SIGTERM_GRACE_S = 30


def _sigterm_later(signum: int, frame: Any) -> None:
    remaining = signal.alarm(WORKER_SIGTERM_GRACE_S)
    if remaining:  # the first SIGTERM started the clock: keep its deadline
        signal.alarm(remaining)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGINT and SIGTERM are the main process's to handle (it
    stops at a step boundary and then shuts the workers down). A SIGTERM only starts a grace
    period (`WORKER_SIGTERM_GRACE_S`) after which the worker ends itself. Lightning's worker
    seeding still runs when `seed_everything(workers=True)` asked for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _sigterm_later)
    # Born with both blocked (WorkerSafeDataLoader): one that arrived meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop a loader's (persistent) worker processes now, the way the loader itself does."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if iterator is not None:
        loader._iterator = None
