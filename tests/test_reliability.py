"""Issue 7: a long run survives bad files and non-finite losses as configured, and stops clearly.

Tiny CPU runs (ResNet-10t encoders, 64 x 128 frames, batch 2, a few steps each).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

import fsre_lightning.module as module_mod
from fsre_lightning.callbacks import CheckpointOnInterrupt
from fsre_lightning.data import KittiDataModule
from fsre_lightning.data.dataset import SkippedSample, collate
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.errors import DataError
from fsre_lightning.geometry import intrinsics_matrix
from fsre_lightning.module import FSREModule
from fsre_lightning.nonfinite import NonFiniteLossError, NonFinitePolicy
from fsre_lightning.testing import optimiser_configs
from fsre_lightning.testing.kitti_tree import DRIVE, make_kitti

H, W = 64, 128
NET = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "resnet10t",
       "pretrained": False, "segmentation": False, "cma_scales": []}
POSE = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "resnet10t",
        "pretrained": False}


def make_module(warmup_steps: int = 0, **kwargs: Any) -> FSREModule:
    torch.manual_seed(0)
    return FSREModule(network=NET, pose_network=POSE,
                      loss={"segmentation_weight": 0.0, "sgt_weight": 0.0},
                      image_log_every_n_steps=0, **kwargs, **optimiser_configs(
                          scheduler_args={"warmup_steps": warmup_steps}))


def make_trainer(max_steps: int, callbacks: list[pl.Callback] | None = None,
                 root: Path | None = None) -> pl.Trainer:
    callbacks = callbacks or []
    saves = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                      enable_checkpointing=saves, callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0,
                      default_root_dir=root, inference_mode=False)


# ------------------------------------------------------------------------------ bad data
def damaged_kitti(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Frames 0..7, train lines 1..6; frame 0 truncated, frame 6's label of the wrong size.

    Frame 0 is only used by line 1 (as its frame -1), label 6 only by line 6: two bad files,
    two skipped samples. The val split (lines 2..5) touches neither.
    """
    root = make_kitti(tmp_path, frames=8)
    image = root / DRIVE / "image_02" / "data" / "0000000000.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])  # a copy interrupted mid-file
    label = root / "segmentation" / DRIVE / "image_02" / "0000000006.png"
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(label)
    (root / "splits" / "tiny" / "val_files.txt").write_text(
        "".join(f"{DRIVE} {f} l\n" for f in range(2, 6)))
    return root, image, label


def make_dm(root: Path, tmp_path: Path, **kwargs: Any) -> KittiDataModule:
    args = {"root": root, "split_dir": root / "splits" / "tiny", "height": H, "width": W,
            "batch_size": 2, "num_workers": 0, "eval_crop": "none", "label_format":
            "label_ids", "cache_dir": tmp_path / "cache", "flip_prob": 0.0}
    return KittiDataModule(**{**args, **kwargs})


@pytest.mark.slow
@pytest.mark.parametrize("frame_cache", [False, True])
def test_bad_files_are_skipped_counted_and_logged_once(
        tmp_path: Path, frame_cache: bool, caplog: pytest.LogCaptureFixture) -> None:
    root, image, label = damaged_kitti(tmp_path)
    dm = make_dm(root, tmp_path, frame_cache=frame_cache, on_error="skip")
    trainer = make_trainer(max_steps=4)  # two epochs either way: files met twice
    with caplog.at_level(logging.WARNING, logger="fsre_lightning"):
        trainer.fit(make_module(), datamodule=dm)
    assert trainer.global_step == 4
    assert dm.skipped_samples == {f"{DRIVE} 1 l", f"{DRIVE} 6 l"}
    assert len(dm.bad_files) == 2
    assert float(trainer.callback_metrics["train/skipped_samples"]) == 2
    for path in (image, label):
        mentions = [r for r in caplog.records if str(path) in r.getMessage()]
        assert len(mentions) == 1, (path, [r.getMessage() for r in mentions])


@pytest.mark.parametrize("frame_cache", [False, True])
def test_bad_files_raise_naming_the_file(tmp_path: Path, frame_cache: bool) -> None:
    root, image, label = damaged_kitti(tmp_path)
    dm = make_dm(root, tmp_path, frame_cache=frame_cache, on_error="raise")
    with pytest.raises(DataError) as err:
        make_trainer(max_steps=4).fit(make_module(), datamodule=dm)
    assert str(image) in str(err.value) or str(label) in str(err.value)


def test_a_cache_built_under_skip_refuses_raise_and_validation_raises(tmp_path: Path) -> None:
    root, image, _ = damaged_kitti(tmp_path)
    make_dm(root, tmp_path, frame_cache=True, use_labels=False).setup("fit")
    # The finished cache remembers the unreadable frame: raise names it without re-decoding.
    with pytest.raises(DataError, match=str(image)):
        make_dm(root, tmp_path, frame_cache=True, use_labels=False,
                on_error="raise").setup("fit")
    # Validation defaults to raise: metrics must not silently cover fewer frames.
    (root / "splits" / "tiny" / "val_files.txt").write_text(f"{DRIVE} 1 l\n{DRIVE} 2 l\n")
    dm = make_dm(root, tmp_path, use_labels=False)
    dm.setup("validate")
    with pytest.raises(DataError, match=str(image)):
        list(dm.val_dataloader())
    dm = make_dm(root, tmp_path, use_labels=False, eval_on_error="skip")
    dm.setup("validate")
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert [len(b["name"]) for b in batches] == [1]
    assert dm.skipped_samples == {f"{DRIVE} 1 l"}


def test_collate_drops_skipped_samples() -> None:
    item = {"frames": torch.zeros(3, 3, 2, 2), "index": 0, "name": "a"}
    batch = collate([item, SkippedSample(1, "b", "cannot decode image x.png")])
    assert batch["frames"].shape[0] == 1 and batch["skipped"] == [("b", "cannot decode "
                                                                         "image x.png")]
    empty = collate([SkippedSample(1, "b", "why")])
    assert "frames" not in empty and empty["name"] == []


# ------------------------------------------------------------------------ non-finite losses
def test_skip_warns_once_a_step_naming_only_terms_not_warned_of_before(
        caplog: pytest.LogCaptureFixture) -> None:
    """A diverged step has every term non-finite: one line for it (it was eight), and later
    steps only name a term that had not gone non-finite before."""
    policy = NonFinitePolicy("skip", max_consecutive=10)
    with caplog.at_level(logging.WARNING, logger="fsre_lightning.nonfinite"):
        for step, terms in enumerate([["photometric", "smoothness", "total"],
                                      ["photometric", "total"], ["sgt", "total"]]):
            policy.start_step()
            policy.handle("loss", terms, step, ["d 1 l"])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and policy.skipped == 3
    assert lines[0].startswith("non-finite loss (photometric, smoothness, total) at step 0")
    assert lines[1].startswith("non-finite loss (sgt) at step 2 on frames [d 1 l]: step skipped")


def batches(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    K = intrinsics_matrix(H, W, KITTI_INTRINSICS)
    items = [{"frames": torch.rand(3, 3, H, W, generator=g), "K": K,
              "inv_K": torch.linalg.inv(K), "index": i, "name": f"{DRIVE} {i} l"}
             for i in range(2 * n)]
    return DataLoader(items, batch_size=2, shuffle=False, collate_fn=collate)


def poison(monkeypatch: pytest.MonkeyPatch, call: int, kind: str) -> None:
    """Make the `call`-th loss computation non-finite: a NaN smoothness, or NaN gradients."""
    real = module_mod.compute_losses
    calls = {"n": 0}

    def compute_losses(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            if kind == "loss":
                losses["smoothness"] = losses["smoothness"] * float("nan")
                losses["total"] = losses["total"] + losses["smoothness"]
            else:  # finite forward, but d sqrt(u)/du at u = 0 is inf: NaN gradients
                losses["total"] = losses["total"] + 0.0 * torch.sqrt(losses["total"] * 0.0)
        return losses

    monkeypatch.setattr(module_mod, "compute_losses", compute_losses)


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.weights.append(torch.cat([p.detach().flatten().clone()
                                       for p in pl_module.parameters()]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loss", "gradients"])
def test_nonfinite_step_is_skipped_without_touching_optimiser_or_schedule(
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    poison(monkeypatch, call=2, kind=kind)
    module = make_module(nonfinite="skip", warmup_steps=10)
    snapshots = Snapshots()
    trainer = make_trainer(max_steps=3, callbacks=[snapshots])
    trainer.fit(module, train_dataloaders=batches(3))
    assert module.nonfinite.skipped == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1
    w0, w1, w2 = snapshots.weights
    assert torch.equal(w0, w1) and not torch.equal(w1, w2)  # batch 2 changed nothing
    assert torch.isfinite(w2).all()
    optimizer = trainer.optimizers[0]
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {2}  # Adam took two steps out of three batches
    warmup = next(c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step")
    assert warmup.last_epoch == 2  # the warm-up did not advance on the skipped batch


@pytest.mark.slow
def test_nonfinite_stop_names_term_and_frames_and_keeps_last_good_checkpoint(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    poison(monkeypatch, call=2, kind="loss")
    ckpt_dir = tmp_path / "checkpoints"
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{step}",
                                              every_n_train_steps=1, save_top_k=-1),
                 CheckpointOnInterrupt(ckpt_dir)]
    trainer = make_trainer(max_steps=3, callbacks=callbacks, root=tmp_path)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit(make_module(nonfinite="stop"), train_dataloaders=batches(3))
    message = str(err.value)
    assert "smoothness" in message and "total" in message
    assert f"{DRIVE} 2 l" in message and f"{DRIVE} 3 l" in message  # the second batch
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step=1.ckpt"]  # no last.ckpt
    state = torch.load(ckpt_dir / "step=1.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1


def test_cache_bad_rows_survive_an_interrupted_build(tmp_path: Path) -> None:
    from fsre_lightning.data.array_store import ArrayCache

    keys = [f"k{i}" for i in range(6)]
    calls: list[list[int]] = []

    def fill(rows: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        calls.append(rows.tolist())
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first chunk
        bad = {int(r): f"cannot decode image f{r}.png" for r in rows if r in (1, 4)}
        return np.full((len(rows), 2), 7, np.uint8), bad

    store = ArrayCache(tmp_path, "c")
    with pytest.raises(KeyboardInterrupt):
        store.ensure(keys, (2,), {"v": 1}, fill, chunk_size=3, progress=False)
    cache = store.ensure(keys, (2,), {"v": 1}, fill, chunk_size=3, progress=False)
    assert calls[-1] == [3, 4, 5]  # resumed: rows 0..2 were not decoded again
    assert cache.bad == {"k1": "cannot decode image f1.png", "k4": "cannot decode image f4.png"}
    assert store.open().bad == cache.bad  # kept in the index
