"""Sweeps as clusters run them: tables that are sweeps by themselves, members that fail without
ending the sweep (recorded, reported, rerun by one command), each member's wandb run closed,
run folders that never collide, and the Optuna search."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fsre_lightning import reporting, sweep
from fsre_lightning.cli import train
from fsre_lightning.errors import ConfigError
from fsre_lightning.preflight import missing_plugin, search_space_members
from fsre_lightning.runtime import (
    CONFIG_DIR,
    EXIT_SWEEP_FAILED,
    PREEMPTED_EXIT_CODE,
    PreemptedError,
)
from fsre_lightning.testing import (
    EXPERIMENT_PLUGINS,
    TINY_SYNTHETIC,
    command_env,
    compose_config,
    installed,
    run_command,
)

TABLES = ["table1b", "ablation_sgt_layers", "ablation_k", "ablation_margin", "ablation_cma",
          "ablation_h", "ablation_cma_placement", "ablation_sgt_border"]
SINGLE_RUNS = ["demo", "full_hr", "full_r50", "smoke"]
HAS_OPTUNA = installed(EXPERIMENT_PLUGINS["search_sgt"])


@pytest.mark.parametrize("experiment", TABLES + SINGLE_RUNS)
def test_tables_are_sweeps_by_themselves_and_single_models_are_not(experiment: str) -> None:
    for selection in (f"+experiment={experiment}", f"+experiment=[{experiment},smoke]"):
        cfg = compose_config("train", [selection], hydra=True)
        assert (str(cfg.hydra.mode) == "RunMode.MULTIRUN") == (experiment in TABLES), selection


def test_run_folders_of_one_second_differ(tmp_path: Path) -> None:
    dirs = []
    for _ in range(3):
        cfg = compose_config("train", [], root=tmp_path, hydra=True)
        dirs.append((str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)))
        # One config, one folder however often it is resolved (Hydra copies this cache to
        # every member of a sweep).
        assert dirs[-1] == (str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir))
    runs, sweeps = zip(*dirs, strict=True)
    assert len(set(runs)) == 3 and len(set(sweeps)) == 3


# -------------------------------------------------------------------- failing members
def test_a_crashing_member_is_recorded_and_gives_nan(tmp_path: Path) -> None:
    def crash(cfg: Any) -> float:
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    value = sweep.run_member("train", crash, None, tmp_path / "3")
    assert math.isnan(value)
    record = json.loads((tmp_path / "3" / sweep.FAILURE_FILE).read_text())
    assert record["type"] == "RuntimeError"
    assert record["error"] == "CUDA error: an illegal memory access"
    assert "second line" in record["traceback"] and "crash" in record["traceback"]
    assert record["rerun"].startswith("fsre-train --multirun")


def test_a_user_error_in_a_member_is_one_line_and_recorded(tmp_path: Path, capsys) -> None:
    def bad(cfg: Any) -> float:
        raise ConfigError("loss.sgt_kernel_size", 4, "K must be odd")

    assert math.isnan(sweep.run_member("train", bad, None, tmp_path))
    err = capsys.readouterr().err
    assert "fsre_lightning.train: error: loss.sgt_kernel_size=4" in err
    assert "Traceback" not in err
    assert sweep.read_failure(tmp_path)["type"] == "ConfigError"


def test_success_returns_the_value_and_records_nothing(tmp_path: Path) -> None:
    assert sweep.run_member("train", lambda cfg: 0.25, None, tmp_path) == 0.25
    assert sweep.read_failure(tmp_path) is None


@pytest.mark.parametrize("stop", [PreemptedError("preempted (SIGTERM) at step 3"),
                                  KeyboardInterrupt()])
def test_preemption_and_ctrl_c_stop_the_whole_sweep(tmp_path: Path, stop: BaseException) -> None:
    def job(cfg: Any) -> float:
        raise stop

    expected = SystemExit if isinstance(stop, PreemptedError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        sweep.run_member("train", job, None, tmp_path)
    if expected is SystemExit:
        assert info.value.code == PREEMPTED_EXIT_CODE
    assert sweep.read_failure(tmp_path) is None


def test_a_failed_member_closes_its_wandb_run(tmp_path: Path, monkeypatch) -> None:
    finished: list[int] = []
    fake = types.SimpleNamespace(run=object())

    def finish(exit_code: int = 0) -> None:
        finished.append(exit_code)
        fake.run = None

    fake.finish = finish
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def crash(cfg: Any) -> float:
        raise ValueError("boom")

    sweep.run_member("train", crash, None, tmp_path)
    assert finished == [1] and fake.run is None


def _fake_sweep(root: Path) -> Path:
    """Members 0 and 2 finished, member 1 failed, as a three-member ablation leaves them."""
    folder = root / "multirun" / "ablation_k" / "2026-01-01_00-00-00_abcdef"
    for i, k in enumerate((3, 5, 7)):
        member = folder / str(i)
        (member / ".hydra").mkdir(parents=True)
        (member / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"loss.sgt_kernel_size={k}", "+experiment=ablation_k"]))
        (member / "config.yaml").write_text(yaml.safe_dump({"name": "ablation_k", "seed": 0}))
        if i == 1:
            (member / sweep.FAILURE_FILE).write_text(json.dumps({
                "type": "NonFiniteLossError", "error": "NaN loss for 100 steps",
                "overrides": ["loss.sgt_kernel_size=5", "+experiment=ablation_k"],
                "rerun": "fsre-train --multirun loss.sgt_kernel_size=5 +experiment=ablation_k"}))
        else:
            (member / "metrics.json").write_text(json.dumps({"after": {"abs_rel": 0.1 + i}}))
    return folder


def test_the_end_of_a_sweep_lists_failed_members_and_their_rerun(tmp_path: Path,
                                                                  capsys) -> None:
    folder = _fake_sweep(tmp_path)
    outcome = sweep.SweepOutcome()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}})
    outcome.on_multirun_start(config)
    outcome.on_multirun_end(config)
    assert [Path(r["member"]).name for r in sweep.failed_members] == ["1"]
    err = capsys.readouterr().err
    assert "1 of 3 sweep member(s) failed (1)" in err
    assert "NonFiniteLossError: NaN loss for 100 steps" in err
    assert "fsre-train --multirun loss.sgt_kernel_size=5 +experiment=ablation_k" in err
    sweep.failed_members.clear()


def test_the_report_marks_failed_members(tmp_path: Path) -> None:
    folder = _fake_sweep(tmp_path)
    result = reporting.report(folder, png=False)
    assert [p.name for p in result["failed"]] == ["1"] and not result["missing"]
    assert "Failed (1):" in result["text"]
    assert ("- member 1 (loss.sgt_kernel_size=5 +experiment=ablation_k): NonFiniteLossError: "
            "NaN loss for 100 steps") in result["text"]
    assert len([r for r in result["rows"]]) == 2


# ------------------------------------------------------------------------- end to end
def test_every_member_is_checked_before_the_first_starts(tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    """A bad value in a later member used to surface only after the earlier ones trained."""
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    status = train.main(["--multirun", *TINY_SYNTHETIC, "logger=csv", "name=bad",
                         "loss.sgt_kernel_size=3,4,5", "model.network.num_heads=1,0"])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("fsre_lightning.train")]
    assert len(lines) == 5 and lines[-1].endswith("4 of 6 sweep members are invalid; nothing "
                                                  "was started")
    assert "sweep member 2 (" in lines[1] and "loss.sgt_kernel_size=4 is not allowed" in lines[1]
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


def test_a_search_space_is_checked_value_by_value() -> None:
    """Optuna picks values as it goes: every choice and both ends of every interval are what
    the preflight checks, one parameter at a time."""
    cfg = compose_config("train", ["+experiment=search_sgt", "seed=3"], hydra=True)
    members = search_space_members(cfg)
    assert members[0] == ["loss.sgt_margin=0.05", "loss.sgt_kernel_size=3",
                          "+experiment=search_sgt", "seed=3"]
    varied = sorted(m[i] for m in members[1:] for i in (0, 1) if m[i] != members[0][i])
    assert varied == ["loss.sgt_kernel_size=5", "loss.sgt_kernel_size=7", "loss.sgt_margin=0.5"]
    assert len(members) == 4


@pytest.mark.skipif(not HAS_OPTUNA, reason="the optional optuna extra is not installed")
def test_an_optuna_search_with_a_bad_range_starts_nothing(tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    status = train.main([*TINY_SYNTHETIC, "+experiment=search_sgt", "logger=csv",
                         "hydra.sweeper.params={loss.sgt_margin: 'interval(-0.1, 0.5)'}"])
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fsre_lightning.train")]
    assert "loss.sgt_margin=-0.1 is not allowed" in lines[0]
    assert lines[-1].endswith("3 of 4 points of the search space are invalid; nothing was "
                              "started")
    assert not (tmp_path / "data").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.skipif(installed("hydra_plugins.hydra_submitit_launcher"),
                    reason="the slurm extra is installed")
def test_a_missing_hydra_plugin_is_one_line_naming_its_extra(tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert train.main(["--multirun", "hydra/launcher=slurm", "seed=1,2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "fsre_lightning.train: error: hydra/launcher=slurm needs the Hydra plugin of the "
        "optional extra 'slurm', which is not installed: pip install 'fsre-lightning[slurm]'"]
    # The Optuna sweeper (installed here): Hydra's composition error, mapped the same way.
    err = ConfigCompositionException("In 'hydra/sweeper/fsre_optuna': Could not load "
                                     "'hydra/sweeper/optuna'.")
    assert "hydra/sweeper=fsre_optuna needs the Hydra plugin of the optional extra 'optuna'" in (
        missing_plugin(err) or "")
    assert missing_plugin(ConfigCompositionException("Could not override 'x'")) is None


def test_cfg_job_shows_only_a_config_that_would_start(tmp_path: Path, capsys,
                                                      monkeypatch) -> None:
    """`--cfg job` runs no command: it used to print a config that fails when it runs."""
    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert train.main(["loss.sgt_kernel_size=4", "--cfg", "job"]) == 2
    out, err = capsys.readouterr()
    assert "loss.sgt_kernel_size=4 is not allowed" in err and not out
    # A table prints one config but runs its members: each is checked.
    assert train.main(["+experiment=ablation_cma", "model.network.num_heads=0", "--cfg",
                       "job"]) == 2
    out, err = capsys.readouterr()
    assert err.count("model.network.num_heads=0 is not allowed") == 3 and not out
    assert train.main(["+experiment=ablation_cma", "--cfg", "job"]) == 0
    assert "cma_targets:" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_sweep_whose_middle_member_fails_at_run_time_trains_the_others(tmp_path: Path) -> None:
    """A missing init_weights file passes the config checks and fails when that member starts:
    recorded, reported, the other two trained."""
    env = command_env(tmp_path)
    missing = tmp_path / "missing.ckpt"
    result = run_command("train", [*TINY_SYNTHETIC, "+experiment=smoke", "model=monodepth2",
                                   "name=init", f"init_weights=null,{missing},null",
                                   "--multirun"], env, timeout=1200)
    assert result.returncode == EXIT_SWEEP_FAILED, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "multirun" / "init").iterdir()
    assert (folder / "0" / "metrics.json").is_file() and (folder / "2" / "metrics.json").is_file()
    record = sweep.read_failure(folder / "1")
    assert record["type"] == "FileNotFoundError" and "missing.ckpt" in record["error"]
    summary = [line for line in result.stderr.splitlines() if "sweep member(s) failed" in line]
    assert summary == ["1 of 3 sweep member(s) failed (1); rerun only those:"]
    assert "fsre-train --multirun" in result.stderr and f"init_weights={missing}" in result.stderr
    report = run_command("report", [str(folder)], env, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "- member 1 (" in report.stdout and "FileNotFoundError" in report.stdout


@pytest.mark.slow
def test_a_member_crashing_mid_training_closes_its_wandb_run(tmp_path: Path,
                                                             monkeypatch) -> None:
    """In one process (Hydra's basic launcher): the crashed member's wandb run is finished, so
    the next member logs into a run of its own."""
    for key, value in command_env(tmp_path, WANDB_MODE="offline").items():
        monkeypatch.setenv(key, value)
    original = train.fit_and_validate

    def crash_second(cfg, trainer, *args: Any) -> dict[str, Any]:
        if cfg.seed == 1:
            _ = trainer.logger.experiment  # the wandb run exists, then training breaks
            raise RuntimeError("loss exploded at step 1")
        return original(cfg, trainer, *args)

    monkeypatch.setattr(train, "fit_and_validate", crash_second)
    status = train.main([*TINY_SYNTHETIC, "+experiment=smoke", "model=monodepth2", "name=crash",
                         "logger=wandb", "seed=0,1,2", "--multirun"])
    assert status == EXIT_SWEEP_FAILED
    (folder,) = (tmp_path / "outputs" / "multirun" / "crash").iterdir()
    run_ids = [[p.name.rsplit("-", 1)[1] for p in (folder / str(i) / "wandb").glob(
        "offline-run-*")] for i in range(3)]
    assert all(len(ids) == 1 for ids in run_ids), run_ids
    assert len({ids[0] for ids in run_ids}) == 3
    assert sweep.read_failure(folder / "1")["error"] == "loss exploded at step 1"
    assert (folder / "2" / "metrics.json").is_file()
    assert sys.modules["wandb"].run is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="the optional optuna extra is not installed")
def test_optuna_search_minimises_the_returned_validation_abs_rel(tmp_path: Path) -> None:
    env = command_env(tmp_path)
    result = run_command("train", ["+experiment=[search_sgt,smoke]", "model.network.num_heads=1",
                                   "hydra.sweeper.n_trials=2"], env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "multirun" / "search_sgt").iterdir()
    values = [json.loads((folder / str(i) / "metrics.json").read_text())["monitor"]
              for i in range(2)]
    assert {v["name"] for v in values} == {"val/abs_rel"}
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(v["value"] for v in values))


def test_the_optuna_config_ships_with_the_package() -> None:
    text = (CONFIG_DIR / "hydra" / "sweeper" / "fsre_optuna.yaml").read_text()
    assert "- optuna" in text and "direction: minimize" in text
    if HAS_OPTUNA:
        cfg = compose_config("train", ["+experiment=search_sgt"], hydra=True)
        assert cfg.hydra.sweeper.params == {"loss.sgt_margin": "interval(0.05, 0.5)",
                                            "loss.sgt_kernel_size": "choice(3, 5, 7)"}
        assert cfg.hydra.sweeper.max_failure_rate == 0.5
