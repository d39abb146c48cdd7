"""Outputs are never destroyed and bad files are named: a report of a stage nobody measured,
stale temporary checkpoints, corrupt checkpoints and weight files, Monodepth2's ground-truth
archive, and the messages a cluster user reads."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest

from fsre_lightning.checkpoints import AtomicCheckpointIO, CheckpointMismatchError
from fsre_lightning.data.kitti_layout import load_gt_depths
from fsre_lightning.errors import DataError
from fsre_lightning.models.encoder import build_encoder
from fsre_lightning.sweeps import tables as reporting
from fsre_lightning.testing import compose_config
from fsre_lightning.tracking.wandb import print_wandb_sync_hint
from fsre_lightning.trained import training_intrinsics, training_resolution
from fsre_lightning.training import resolve_ckpt_path


def _sweep_with_after_metrics_only(root: Path) -> Path:
    folder = root / "multirun" / "ablation_k" / "2026-01-01_00-00-00_abcdef"
    for i in range(2):
        member = folder / str(i)
        member.mkdir(parents=True)
        (member / "metrics.json").write_text(json.dumps({"after": {"abs_rel": 0.1 + i}}))
        (member / ".hydra").mkdir()
        (member / ".hydra" / "overrides.yaml").write_text(f"- loss.sgt_kernel_size={3 + 2 * i}\n")
    return folder


def test_a_report_of_an_unmeasured_stage_keeps_the_good_one(tmp_path: Path) -> None:
    folder = _sweep_with_after_metrics_only(tmp_path)
    written = reporting.report(folder, png=False)["files"]["markdown"]
    good = written.read_text()
    with pytest.raises(reporting.ReportError, match=r"no member has 'before' metrics.*"
                                                    r"eval_before=true.*nothing written"):
        reporting.report(folder, stage="before", png=False)
    assert written.read_text() == good


def test_a_save_removes_what_a_killed_save_left(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    stale = target.parent / ".last.ckpt.k1ll3d.tmp"  # what kill -9 during a save leaves
    stale.write_bytes(b"\0" * 1024)
    other = target.parent / ".best.ckpt.x.tmp"  # another target's: not this save's business
    other.write_bytes(b"\0")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert target.is_file() and not stale.exists() and other.exists()


def test_a_corrupt_checkpoint_is_named_as_corrupt(tmp_path: Path) -> None:
    corrupt = tmp_path / "model.ckpt"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    for read in (lambda: training_resolution(corrupt), lambda: training_intrinsics(corrupt, None)):
        with pytest.raises(CheckpointMismatchError, match=r"model\.ckpt cannot be read"):
            read()


def test_a_garbage_weights_file_is_named(tmp_path: Path) -> None:
    garbage = tmp_path / "resnet18_imagenet.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"resnet18_imagenet\.pth cannot be loaded as ImageNet "
                                        r"weights of encoder 'resnet18'"):
        build_encoder("resnet18", pretrained=True, weights_path=garbage)


def test_monodepth2_ground_truth_archive_is_read_or_explained(tmp_path: Path) -> None:
    maps = np.random.default_rng(0).random((3, 8, 20)).astype(np.float32)
    plain = tmp_path / "plain" / "gt_depths.npz"
    plain.parent.mkdir()
    np.savez_compressed(plain, data=maps)  # Monodepth2's layout, maps of one size
    assert [m.tolist() for m in load_gt_depths(plain)] == [m.tolist() for m in maps]
    ragged = tmp_path / "ragged" / "gt_depths.npz"
    ragged.parent.mkdir()
    objects = np.empty(2, dtype=object)
    objects[:] = [np.zeros((8, 20), np.float32), np.zeros((9, 20), np.float32)]
    np.savez_compressed(ragged, data=objects)  # Monodepth2's, sizes differ: pickled objects
    with pytest.raises(DataError, match=r"Monodepth2's gt_depths\.npz .*fsre_lightning\.export_gt"):
        load_gt_depths(ragged)


class WandbLogger:  # the type name is what the hint looks for
    def __init__(self, run_dir: Path) -> None:
        self.experiment = types.SimpleNamespace(offline=True, dir=str(run_dir / "files"))


def test_the_wandb_sync_hint_keeps_its_path_on_one_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / ("a_rather_long_folder_name_" * 4) / "wandb" / "offline-run-20260101-abc"
    print_wandb_sync_hint(types.SimpleNamespace(loggers=[WandbLogger(run)]))
    out = capsys.readouterr().out
    assert f"wandb sync {run}" in out.replace("\n", "") and f"wandb sync {run}" in out


def test_ckpt_path_auto_says_when_it_starts_fresh(tmp_path: Path, caplog) -> None:
    cfg = compose_config("train", ["ckpt_path=auto", "name=requeued",
                                   f"paths.run_dir={tmp_path / 'run'}"], root=tmp_path)
    with caplog.at_level(logging.INFO):
        assert resolve_ckpt_path(cfg) is None
    assert "ckpt_path=auto: no checkpoint of name=requeued yet" in caplog.text


def test_unwritable_outputs_stop_before_the_work(tmp_path: Path, capsys, monkeypatch) -> None:
    """An export, an evaluation or a report whose output cannot be written used to run to the
    end and then fail with a traceback (a file where a folder should be: the case that also
    holds for root, who may write anywhere else)."""
    from fsre_lightning import evaluate, export, report
    from fsre_lightning.testing import command_env
    from fsre_lightning.testing.tiny_checkpoints import make_run

    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ckpt = make_run(tmp_path / "run")
    cases = [
        (export.main, [f"ckpt_path={ckpt}", "format=torchscript", f"output={blocker}/m.pt"],
         "output="),
        (evaluate.main, [f"ckpt_path={ckpt}", f"metrics_path={blocker}/m.json"], "metrics_path="),
        (evaluate.main, [f"ckpt_path={ckpt}", f"semantics_dir={tmp_path / 'nowhere'}"],
         "semantics_dir="),
        (report.main, [str(_sweep_with_after_metrics_only(tmp_path)), "--out", str(blocker)],
         "--out="),
    ]
    for main, args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and fragment in lines[0], err
        assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("report.md"))


def test_one_line_of_a_library_error() -> None:
    from fsre_lightning.errors import first_line

    advice = RuntimeError("\n  Weights only load failed.\nRetry with weights_only=False ...")
    assert first_line(advice) == "Weights only load failed."
    assert first_line(EOFError()) == "EOFError"  # no message: its type says what happened
