"""wandb as its users expect: WANDB_MODE from the environment wins over the offline default, and
a run resumed from its checkpoint continues the same wandb run."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fsre_lightning import train
from fsre_lightning.checkpoints import load_checkpoint_weights_only
from fsre_lightning.testing import (
    TINY_SYNTHETIC,
    command_env,
    compose_config,
    run_command,
    run_main,
)
from fsre_lightning.tracking.wandb import WANDB_RUN_KEY, continue_wandb_run


@pytest.mark.parametrize("env", [None, "disabled", "online", "offline"])
def test_wandb_mode_comes_from_the_environment_else_offline(env: str | None, monkeypatch,
                                                            tmp_path: Path) -> None:
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    cfg = compose_config("train", ["logger=wandb"], root=tmp_path)
    assert OmegaConf.select(cfg, "logger.wandb.mode") == (env or "offline")
    assert "offline" not in cfg.logger.wandb  # Lightning's flag would overwrite WANDB_MODE
    override = compose_config("train", ["logger=wandb", "logger.wandb.mode=online"], root=tmp_path)
    assert override.logger.wandb.mode == "online"


def test_a_resumed_run_continues_the_checkpoints_wandb_run(tmp_path: Path) -> None:
    cfg = compose_config("train", ["logger=wandb"], root=tmp_path)
    continue_wandb_run(cfg, {WANDB_RUN_KEY: "3xk2q9ab"})
    assert cfg.logger.wandb.id == "3xk2q9ab"
    chosen = compose_config("train", ["logger=wandb", "logger.wandb.id=mine"], root=tmp_path)
    continue_wandb_run(chosen, {WANDB_RUN_KEY: "3xk2q9ab"})
    assert chosen.logger.wandb.id == "mine"  # an id the user set wins
    csv = compose_config("train", ["logger=csv"], root=tmp_path)
    continue_wandb_run(csv, {WANDB_RUN_KEY: "3xk2q9ab"})  # no wandb logger: nothing to do
    assert "wandb" not in csv.logger


def _offline_runs(run_dir: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_offline_run_resumed_logs_into_the_same_run_and_disabled_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = [*TINY_SYNTHETIC, "+experiment=smoke", "model=monodepth2", "logger=wandb",
              "model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet"]
    offline = command_env(tmp_path, WANDB_MODE="offline")
    # A full last.ckpt (smoke writes the weights only): this run is resumed.
    # Interpreters of their own, not forked (conftest's `forked`): each wandb run of a process
    # writes its images to a folder made when wandb is imported, and removed when it ends.
    first = run_command("train", [*common, "name=first", "final_checkpoint=full"], offline)
    assert first.returncode == 0, first.stderr[-3000:]
    (run1,) = (tmp_path / "outputs" / "first").iterdir()
    ckpt = run1 / "checkpoints" / "last.ckpt"
    (run_id,) = _offline_runs(run1)
    assert load_checkpoint_weights_only(ckpt)[WANDB_RUN_KEY] == run_id

    resumed = run_command("train", [*common, "name=first", f"ckpt_path={ckpt}",
                                    "trainer.max_epochs=2", "trainer.max_steps=4"], offline)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run2,) = [p for p in (tmp_path / "outputs" / "first").iterdir() if p != run1]
    assert _offline_runs(run2) == [run_id]  # `wandb sync` merges both into one run

    # In this process: a disabled wandb starts no service process.
    for key, value in command_env(tmp_path, WANDB_MODE="disabled").items():
        monkeypatch.setenv(key, value)
    disabled = run_main(train.main, [*common, "name=quiet"])
    assert disabled.returncode == 0, disabled.stderr[-3000:]
    (run3,) = (tmp_path / "outputs" / "quiet").iterdir()
    assert not (run3 / "wandb").exists() or not list((run3 / "wandb").glob("*run-*"))


def test_the_logger_passes_wandb_no_setting_it_warns_about(tmp_path: Path) -> None:
    """Lightning's WandbLogger always hands wandb.init `anonymous`, which wandb >= 0.19
    ignores with a warning on every run; ours leaves it out unless it is asked for."""
    import hydra

    cfg = compose_config("train", ["logger=wandb"], root=tmp_path)
    logger = hydra.utils.instantiate(cfg.logger.wandb, save_dir=str(tmp_path))
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["mode"] in ("offline", "online", "disabled")
    asked = hydra.utils.instantiate(cfg.logger.wandb, save_dir=str(tmp_path), anonymous=True)
    assert asked._wandb_init["anonymous"] == "allow"
