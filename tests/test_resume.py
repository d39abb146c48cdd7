"""Interrupting and resuming: exact resume after SIGKILL, SIGTERM preemption, atomic saves,
`ckpt_path=last`, architecture mismatches and weights-only loading."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fsre_lightning import train
from fsre_lightning.callbacks import RunCheckpoint
from fsre_lightning.checkpoints import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    check_state_dict_compatible,
    find_last_checkpoint,
)
from fsre_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader
from fsre_lightning.module import FSREModule
from fsre_lightning.runtime import CONFIG_DIR, PREEMPTED_EXIT_CODE
from fsre_lightning.testing import command_env
from fsre_lightning.testing.forkserver import ForkedProcess, ForkServer
from fsre_lightning.training import resolve_ckpt_path

# The tiny synthetic world of test_train_cli, the Monodepth2 baseline with timm's tiny test
# ResNet in both networks (the cheapest model; the resume machinery does not depend on it),
# flips and colour jitter on (the data defaults), epochs of three steps so that runs cross
# epoch boundaries, no best-checkpoint saves.
TINY = [
    "data=synthetic",
    "model.network.pretrained=false",
    "logger=csv",
    "model=monodepth2",
    "model.network.encoder=test_resnet",
    "model.pose_network.encoder=test_resnet",
    "data.height=64",
    "data.width=192",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.flip_prob=0.5",
    "data.jitter_prob=0.5",
    "++data.synthetic.num_drives=3",
    "++data.synthetic.frames_per_drive=8",
    "++data.synthetic.height=64",
    "++data.synthetic.width=192",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
    "callbacks.best_checkpoint=null",
]


@pytest.fixture(scope="module")
def env(module_tmp: Callable[[str], Path]) -> dict[str, str]:
    # One data folder for the module: the synthetic scenes and frame caches are made once,
    # here, before training runs that overlap could race to build them.
    root = module_tmp("resume")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.root_dir={root}",
                                          f"paths.data_dir={root / 'data'}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # One thread each: runs overlap on small machines, and every run of a comparison must use
    # the same thread count (CPU reductions are only bit-identical for the same split).
    return {**os.environ, "FSRE_DATA_DIR": str(root / "data"),
            "FSRE_OUTPUT_DIR": str(root / "outputs"), "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _wait_for_checkpoint(proc: ForkedProcess, path: Path, min_step: int,
                         timeout: float = 400) -> int:
    """Poll until `path` holds a checkpoint of at least `min_step` (saves are atomic: a file
    that exists is complete); returns its step."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file():
            step = int(_load(path)["global_step"])
            if step >= min_step:
                return step
        time.sleep(0.1)
    output = proc.communicate()[1] if proc.poll() is not None else ""
    raise AssertionError(f"no checkpoint of step >= {min_step} at {path}: {output[-3000:]}")


def _discard(*run_dirs: Path) -> None:
    """Remove run folders no longer needed: their checkpoints add up (a chain link's is ~50
    MB), and the module's folder lives to its end (a failed check raises first and keeps
    them)."""
    for run_dir in run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists of tensors and numbers equal exactly (torch.equal for tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ------------------------------------------------------------------ a chain of interruptions
# Six epochs of three steps, two DataLoader workers (the cluster case). The uninterrupted
# reference and one chain of runs, each resuming where the previous one stopped: every stop
# asserts its exit status, its one-line message and a complete last.ckpt at the step where
# the run had to stop; the chain's end is compared with the reference once. Stopping and
# resuming again from a resumed run is the harder case: a state that a stop or a resume got
# wrong is carried to the end.
WORKERS = ["data.num_workers=2", "trainer.max_steps=18", "trainer.max_epochs=6"]
FAULT = "+callbacks.fault._target_=fsre_lightning.testing.signals.SignalAt"


def _fault(step: int, signame: str = "SIGTERM", during: str = "train",
           alone: bool = False) -> list[str]:
    """SignalAt: `signame` to the run's process group (to the training process alone when
    `alone`) as training step `step` starts, or during the first validation after it."""
    return [FAULT, f"+callbacks.fault.step={step}", f"+callbacks.fault.signum={signame}",
            f"+callbacks.fault.during={during}", *(["+callbacks.fault.rank=0"] if alone else [])]


def _start_group(runs: ForkServer, args: list[str], env: dict[str, str]) -> ForkedProcess:
    """A run in its own session: a signal to its process group reaches it and its workers
    only. Forked (conftest's `forked`): the chain's thirteen runs would spend more CPU on
    importing torch and Lightning than on training."""
    return runs.start("fsre_lightning.train", [*TINY, *args], env)


def _group_run(runs: ForkServer, args: list[str], env: dict[str, str]
               ) -> subprocess.CompletedProcess:
    proc = _start_group(runs, args, env)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_stopped(link: str, returncode: int, stderr: str, signum: int, last: Path,
                    step: int) -> None:
    """A run stopped by `signum`: 128 + signum, the one-line message naming the file to resume
    from, no traceback, and a complete last.ckpt (no temporary file left) of `step`."""
    word = "preempted (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert returncode == 128 + signum, (link, stderr[-3000:])
    assert word in stderr and f"ckpt_path={last}" in stderr, (link, stderr[-3000:])
    assert "Traceback" not in stderr, (link, stderr[-3000:])
    assert int(_load(last)["global_step"]) == step, link
    assert not list(last.parent.glob("*.tmp")) and not list(last.parent.glob(".*.tmp")), link


@pytest.mark.slow
def test_a_chain_of_interruptions_resumes_bit_identical(env: dict[str, str],
                                                        forked: ForkServer) -> None:
    """Each stop the way a cluster, a terminal or the OOM killer makes it, and each resumed:
    SIGTERM to the process group as each of the first five steps starts (the first step,
    mid-epoch, an epoch's last step, whose stop waits for its validation, an epoch's first
    step); Ctrl-C to the group at an epoch's last step (it used to save the half-done step:
    BatchNorm statistics of a batch never stepped on); SIGTERM and Ctrl-C during an
    end-of-epoch validation (it stopped midway); SIGTERM to the training process alone, not
    its workers; SIGKILL (nothing saved after the step-14 checkpoint, two of the epoch's three
    batches consumed), resumed with `ckpt_path=last`; `kill -TERM -- -<pgid>` from outside at
    a random moment (no hook picks it). The chain's end equals the uninterrupted run."""
    outputs = Path(env["FSRE_OUTPUT_DIR"])
    straight = outputs / "straight" / "run"
    # Beside the chain, in a process of its own.
    reference = _start_group(forked, [*WORKERS, "name=straight", f"hydra.run.dir={straight}"],
                             env)
    chain = outputs / "chain"
    links: list[tuple[str, list[str], int, int]] = [
        # name, fault, signal, the step the run stops at (last.ckpt's step)
        ("term0", _fault(0), signal.SIGTERM, 1),
        ("term1", _fault(1), signal.SIGTERM, 2),
        ("term2", _fault(2), signal.SIGTERM, 3),  # after the epoch's validation
        ("term3", _fault(3), signal.SIGTERM, 4),
        ("term4", _fault(4), signal.SIGTERM, 5),
        ("int5", _fault(5, "SIGINT"), signal.SIGINT, 6),
        ("term_validation", _fault(6, during="validation"), signal.SIGTERM, 9),
        ("int_validation", _fault(9, "SIGINT", during="validation"), signal.SIGINT, 12),
        ("term_alone", _fault(12, alone=True), signal.SIGTERM, 13),
    ]
    try:
        previous: Path | None = None
        for name, fault, signum, step in links:
            run_dir = chain / name
            resume = [f"ckpt_path={previous}"] if previous else []
            result = _group_run(forked, [*WORKERS, "name=chain", f"hydra.run.dir={run_dir}",
                                       *resume, *fault], env)
            last = run_dir / "checkpoints" / "last.ckpt"
            _assert_stopped(name, result.returncode, result.stderr, signum, last, step)
            if previous is not None:  # resumed from: its checkpoint is not needed any more
                _discard(previous.parent.parent)
            previous = last

        # SIGKILL as step 14 starts, right after the step-14 save: the run ends with no
        # chance to save anything.
        killed = chain / "kill"
        result = _group_run(forked, [*WORKERS, "name=chain", f"hydra.run.dir={killed}",
                                   f"ckpt_path={previous}",
                                   "callbacks.last_checkpoint.every_n_train_steps=2",
                                   *_fault(14, "SIGKILL")], env)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert int(_load(killed / "checkpoints" / "last.ckpt")["global_step"]) == 14
        _discard(previous.parent.parent)

        # ckpt_path=last: the newest last.ckpt of the run's name, the killed run's. A SIGTERM
        # to the group from outside, a moment after the step-15 save.
        external = chain / "external"
        proc = _start_group(forked, [*WORKERS, "name=chain", f"hydra.run.dir={external}",
                                   "ckpt_path=last",
                                   "callbacks.last_checkpoint.every_n_train_steps=1"], env)
        try:
            _wait_for_checkpoint(proc, external / "checkpoints" / "last.ckpt", 15)
            time.sleep(random.Random(7).uniform(0.0, 0.5))
            assert proc.poll() is None, "the run finished before the signal"
            os.killpg(proc.pid, signal.SIGTERM)
            _, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()
        resumed_cfg = OmegaConf.load(external / "config.yaml")
        assert resumed_cfg.ckpt_path == str(killed / "checkpoints" / "last.ckpt")
        _discard(killed)
        last = external / "checkpoints" / "last.ckpt"
        stopped = int(_load(last)["global_step"])
        assert 15 <= stopped <= 18
        _assert_stopped("external", proc.returncode, stderr, signal.SIGTERM, last, stopped)

        final = chain / "final"
        result = _group_run(forked, [*WORKERS, "name=chain", f"hydra.run.dir={final}",
                                   f"ckpt_path={last}"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert reference.wait(timeout=600) == 0, reference.communicate()[1][-3000:]
    finally:
        reference.kill()
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["global_step"] == 18 and metrics["resumed_from"] == str(last)
    expected = _load(straight / "checkpoints" / "last.ckpt")
    got = _load(final / "checkpoints" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == 18
    assert got["epoch"] == expected["epoch"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        _assert_same(expected[key], got[key], key)

    # Weights-only loading of our checkpoints, as evaluate.py and fine-tuning do.
    module = FSREModule.load_from_checkpoint(final / "checkpoints" / "last.ckpt",
                                             map_location="cpu", weights_only=True)
    assert not module.has_segmentation
    _discard(straight.parent, chain)


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_of_them_is_signalled(env: dict[str, str],
                                                              forked: ForkServer) -> None:
    """SIGTERM to rank 1 of two DDP processes: both stop at the same boundary (a rank that
    stopped alone left the other waiting in its next all-reduce forever)."""
    run_dir = Path(env["FSRE_OUTPUT_DIR"]) / "ddp" / "run"
    result = _group_run(forked, ["trainer=ddp_cpu", "trainer.max_steps=6", "trainer.max_epochs=6",
                               "name=ddp", f"hydra.run.dir={run_dir}", FAULT,
                               "+callbacks.fault.step=1", "+callbacks.fault.rank=1"], env)
    assert result.returncode == PREEMPTED_EXIT_CODE, result.stderr[-3000:]
    assert "preempted (SIGTERM)" in result.stderr and "Traceback" not in result.stderr
    last = _load(run_dir / "checkpoints" / "last.ckpt")
    assert 1 < int(last["global_step"]) < 6
    _discard(run_dir.parent)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, path)

    def save_half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    loaded = _load(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_ckpt_path_last_takes_the_newest_run_and_fails_clearly_without_one(
        tmp_path: Path) -> None:
    cfg = OmegaConf.create({"name": "exp", "ckpt_path": "last", "paths": {
        "output_dir": str(tmp_path), "run_dir": str(tmp_path / "exp" / "now")}})
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoint matches .*exp"):
        resolve_ckpt_path(cfg)
    assert resolve_ckpt_path(OmegaConf.merge(cfg, {"ckpt_path": "auto"})) is None

    paths = []
    for i, run in enumerate(["2026-01-02_00-00-00", "2026-01-01_00-00-00", "now"]):
        p = tmp_path / "exp" / run / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    os.utime(paths[1], (5000, 5000))  # the older-named run was written last
    os.utime(paths[2], (9000, 9000))
    # The run being started ("now") is never its own resume source.
    assert resolve_ckpt_path(cfg) == paths[1]
    assert find_last_checkpoint(tmp_path, "exp") == paths[2]
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resolve_ckpt_path(OmegaConf.merge(cfg, {"ckpt_path": str(tmp_path / "nope.ckpt")}))


@pytest.mark.slow  # the command line end to end (in-process)
def test_resuming_another_architecture_fails_before_training_naming_the_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    full = FSREModule(
        network={"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
                 "pretrained": False, "cma_scales": [4, 3, 2]},
        pose_network={"_target_": "fsre_lightning.models.PoseNetwork",
                      "encoder": "test_resnet", "pretrained": False})
    ckpt = tmp_path / "full.ckpt"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": full.state_dict(), "global_step": 7, "epoch": 0}, ckpt)
    run_dir = tmp_path / "run"
    status = train.main([*TINY, "trainer.max_steps=1", f"ckpt_path={ckpt}",
                         f"hydra.run.dir={run_dir}"])
    stderr = capsys.readouterr().err
    assert status == 2, stderr[-3000:]
    assert "another architecture" in stderr and str(ckpt) in stderr
    assert "unexpected in the checkpoint: " in stderr
    assert "net.seg_decoder.* (" in stderr and "net.cma_depth.* (" in stderr
    assert "Traceback" not in stderr
    assert not (run_dir / "checkpoints").exists()

    # load_from_checkpoint (fine-tuning, evaluation) with weights that do not fit the
    # checkpoint's own hyper-parameters: the same named error, not a copy error.
    baseline = {**full.hparams, "network": {**full.hparams["network"], "segmentation": False,
                                            "cma_scales": []}}
    torch.save({"state_dict": full.state_dict(), "hyper_parameters": baseline,
                "pytorch-lightning_version": "2.6.0"}, ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"net\.seg_decoder\.\* \("):
        FSREModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)


def test_state_dict_check_lists_missing_unexpected_and_both_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(5), "2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as err:
        check_state_dict_compatible(model, state, source="x.ckpt")
    message = str(err.value)
    assert "x.ckpt" in message
    assert "2 missing from the checkpoint: 1.bias, 1.weight" in message
    assert "1 unexpected in the checkpoint: 2.weight" in message
    assert "0.bias (checkpoint (5,), model (4,))" in message
    check_state_dict_compatible(model, model.state_dict())


def test_train_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch() -> None:
    sampler = EpochShuffleSampler(10, seed=3)
    epoch0, epoch1 = sampler.order(0), sampler.order(1)
    assert sorted(epoch0) == list(range(10)) and epoch0 != epoch1
    assert EpochShuffleSampler(10, seed=3).order(1) == epoch1

    data = [torch.tensor(float(i)) for i in range(10)]
    loader = ResumableDataLoader(data, seed=3, batch_size=2)
    loader.epoch_sampler.set_epoch(1)
    batches = list(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 2

    fresh = ResumableDataLoader(data, seed=3, batch_size=2)
    fresh.load_state_dict(state)
    fresh.epoch_sampler.set_epoch(1)  # what Lightning does before the restarted epoch
    rest = list(fresh)
    assert all(torch.equal(a, b) for a, b in zip(batches[2:], rest, strict=True))
    assert len(fresh) == 5  # the epoch keeps its full length for Lightning's counters
    fresh.epoch_sampler.set_epoch(2)
    assert len(list(fresh)) == 5  # the skip applied to the restarted epoch only


class _RandomItems(torch.utils.data.Dataset):
    """Each item draws from the global torch RNG, like KittiDataset's flip."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), float(torch.rand(()))])


def test_per_sample_draws_are_distinct_and_independent_of_workers() -> None:
    epochs_by_workers = []
    for workers in (0, 2):
        loader = ResumableDataLoader(_RandomItems(), seed=5, batch_size=2, num_workers=workers,
                                     persistent_workers=workers > 0)
        epochs = []
        for epoch in range(2):
            loader.epoch_sampler.set_epoch(epoch)
            epochs.append(torch.cat(list(loader)))
        epochs_by_workers.append(torch.stack(epochs))
    assert torch.equal(epochs_by_workers[0], epochs_by_workers[1])
    draws = epochs_by_workers[0][..., 1].flatten()
    assert len(set(draws.tolist())) == draws.numel()


def test_slurm_is_left_to_lightnings_own_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """No forced SLURMEnvironment: Lightning picks it for batch jobs (auto-requeue on SIGUSR1
    included) and leaves interactive allocations alone, where a forced one breaks."""
    from fsre_lightning.training import trainer_plugins

    for job_id in (None, "123"):
        if job_id is None:
            monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        else:
            monkeypatch.setenv("SLURM_JOB_ID", job_id)
        assert [type(p) for p in trainer_plugins()] == [AtomicCheckpointIO]


# ------------------------------------------------------------ the best across resumes
class _ScriptedScores(pl.LightningModule):
    """A one-weight model whose validation 'AbsRel' is scripted by the step it runs at."""

    def __init__(self, scores: Mapping[int, float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.scores = dict(scores)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.w - 1.0).pow(2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/abs_rel", self.scores[self.global_step])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_scripted(folder: Path, scores: Mapping[int, float], max_steps: int,
                  ckpt_path: Path | None = None) -> RunCheckpoint:
    best = RunCheckpoint(dirpath=folder, filename="best-{step}", monitor="val/abs_rel",
                         mode="min", save_top_k=1, save_weights_only=True)
    data = torch.utils.data.DataLoader([torch.zeros(1)] * 8, batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False,
                         callbacks=[best], enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=1,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(_ScriptedScores(scores), data, data,
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    trainer.save_checkpoint(folder / "last.ckpt")
    return best


def test_the_best_checkpoint_and_score_survive_a_resume_into_a_new_folder(
        tmp_path: Path, recwarn: pytest.WarningsRecorder,
        caplog: pytest.LogCaptureFixture) -> None:
    first = _fit_scripted(tmp_path / "first", {1: 0.3, 2: 0.1}, max_steps=2)
    assert first.best_model_score == pytest.approx(0.1)
    # Resumed into another run folder; both later validations are worse than 0.1.
    second = _fit_scripted(tmp_path / "second", {3: 0.5, 4: 0.4}, max_steps=4,
                           ckpt_path=tmp_path / "first" / "last.ckpt")
    assert second.best_model_score == pytest.approx(0.1)
    assert second.best_model_path == str(tmp_path / "second" / "best-step=2.ckpt")
    assert Path(second.best_model_path).is_file()
    assert (tmp_path / "first" / "best-step=2.ckpt").is_file()  # the old run keeps its own
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    # A best checkpoint that is gone (the checkpoint was copied away from its run): the next
    # validations rank afresh, with a warning naming the file.
    (tmp_path / "second" / "best-step=2.ckpt").unlink()
    (tmp_path / "first" / "best-step=2.ckpt").unlink()
    third = _fit_scripted(tmp_path / "third", {5: 0.6, 6: 0.45}, max_steps=6,
                          ckpt_path=tmp_path / "second" / "last.ckpt")
    assert third.best_model_score == pytest.approx(0.45)
    assert "best-step=2.ckpt of the resumed run is gone" in caplog.text
