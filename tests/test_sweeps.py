"""Sweeps as clusters run them: tables that are sweeps by themselves, members that fail without
ending the sweep (recorded, reported, rerun by one command), each member's wandb run closed,
run folders that never collide, and the Optuna search."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fsre_lightning import report as report_cli
from fsre_lightning import train
from fsre_lightning.config.preflight import missing_plugin, search_space_members
from fsre_lightning.errors import ConfigError
from fsre_lightning.runtime import (
    CONFIG_DIR,
    EXIT_SWEEP_FAILED,
    PREEMPTED_EXIT_CODE,
    PreemptedError,
)
from fsre_lightning.sweeps import members as sweep
from fsre_lightning.sweeps import tables as reporting
from fsre_lightning.testing import (
    EXPERIMENT_PLUGINS,
    TINY_SYNTHETIC,
    command_env,
    compose_config,
    installed,
    run_main,
)
from fsre_lightning.testing.forkserver import ForkedProcess, ForkServer

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
    out = capsys.readouterr().out
    assert "cma_targets:" in out
    assert "sgt_kernel_size: 5" in out and "cma_scales:" in out
    assert not (tmp_path / "outputs").exists()


# The smallest model that trains end to end: Monodepth2 with timm's 0.4 M-parameter test
# ResNet in both networks.
SMALLEST = [*TINY_SYNTHETIC, "+experiment=smoke", "model=monodepth2", "logger=csv",
            "model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet"]


@pytest.mark.slow
def test_a_diverging_member_fails_alone_and_the_sweep_trains_the_others(
        tmp_path: Path, forked: ForkServer) -> None:
    """The issue's command: lr=1e30 in the middle member used to segfault the whole sweep (a
    NaN pose in grid_sample's backward); now it stops under model.nonfinite=stop, recorded,
    reported, and members 0 and 2 train."""
    env = command_env(tmp_path)
    result = forked.run("fsre_lightning.train", [
        *SMALLEST, "name=diverge", "model.nonfinite=stop", "model.optimizer.lr=1e-4,1e30,1e-4",
        "trainer.max_steps=3", "--multirun"], env, timeout=1200)
    assert result.returncode == EXIT_SWEEP_FAILED, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "multirun" / "diverge").iterdir()
    assert (folder / "0" / "metrics.json").is_file() and (folder / "2" / "metrics.json").is_file()
    record = sweep.read_failure(folder / "1")
    assert record["type"] == "NonFiniteLossError" and "non-finite loss" in record["error"]
    assert "fsre_lightning.train: error: non-finite loss (" in result.stderr
    summary = [line for line in result.stderr.splitlines() if "sweep member(s) failed" in line]
    assert summary == ["1 of 3 sweep member(s) failed (1); rerun only those:"]
    assert "fsre-train --multirun" in result.stderr
    assert "model.optimizer.lr=1e+30" in record["rerun"]
    report = run_main(report_cli.main, [str(folder)])
    assert report.returncode == 0, report.stderr
    assert "- member 1 (" in report.stdout and "NonFiniteLossError" in report.stdout


def assert_same(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists of tensors and numbers equal exactly (torch.equal for tensors)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _await_step(proc: ForkedProcess, path: Path, step: int, timeout: float = 600) -> None:
    """Until `path` (saved atomically) holds a checkpoint of at least `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and torch.load(path, map_location="cpu",
                                         weights_only=True)["global_step"] >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of step >= {step} at {path} (exit {proc.poll()})")


@pytest.mark.slow
def test_a_killed_member_is_recorded_and_a_stopped_sweep_completes_in_place(
        tmp_path: Path, forked: ForkServer) -> None:
    """Four identical members (seed=0 each, so every one is an uninterrupted run of the
    others). Member 1 is SIGKILLed (the OOM killer's way): recorded naming the signal, and the
    sweep goes on. SIGTERM to the sweep's process group during member 2 stops it at a step
    boundary with the command that resumes it in place. That command keeps member 0 (not
    retrained), reruns member 1 from its last checkpoint, resumes member 2 exactly and starts
    member 3: all four end bit-identical, in one sweep folder that `report` reads whole."""
    env = {**command_env(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # final_checkpoint=full: the members' whole end states are compared, optimiser included.
    args = [*SMALLEST, "name=chain", "seed=0,0,0,0", "trainer.max_steps=6",
            "final_checkpoint=full", "trainer.max_epochs=2",
            "callbacks.last_checkpoint.every_n_train_steps=1", "--multirun"]
    # In a session of its own (a SIGTERM to its group below), forked (conftest's `forked`).
    proc = forked.start("fsre_lightning.train", args, env)
    sweep_root = tmp_path / "outputs" / "multirun" / "chain"
    try:
        while proc.poll() is None and not list(sweep_root.glob("*/1")):
            time.sleep(0.2)
        (folder,) = sweep_root.iterdir()
        _await_step(proc, folder / "1" / "checkpoints" / "last.ckpt", 1)
        (member,) = _children(proc.pid)
        os.kill(member, signal.SIGKILL)
        _await_step(proc, folder / "2" / "checkpoints" / "last.ckpt", 2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    killed = sweep.read_failure(folder / "1")
    assert killed["type"] == "killed"
    assert killed["error"].startswith("killed by SIGKILL (signal 9)")
    assert (folder / "0" / "metrics.json").is_file() and not (folder / "3").exists()
    stopped_at = int(torch.load(folder / "2" / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=True)["global_step"])
    assert 2 <= stopped_at < 6
    (line,) = [x for x in stderr.splitlines() if "resume the sweep in place with: " in x]
    resume = shlex.split(line.split("resume the sweep in place with: ", 1)[1])
    assert resume[0] == "fsre-train"
    assert resume[-3:] == [f"hydra.sweep.dir={folder}", "ckpt_path=auto", "--multirun"]
    member0 = folder / "0" / "checkpoints" / "last.ckpt"
    before = member0.stat().st_mtime_ns

    result = forked.run("fsre_lightning.train", resume[1:], env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert member0.stat().st_mtime_ns == before  # kept, not retrained
    assert [p.name for p in sweep_root.iterdir()] == [folder.name]
    reference = torch.load(member0, map_location="cpu", weights_only=True)
    for number in (1, 2, 3):
        got = torch.load(folder / str(number) / "checkpoints" / "last.ckpt",
                         map_location="cpu", weights_only=True)
        assert got["global_step"] == reference["global_step"] == 6
        for key in ("state_dict", "optimizer_states"):
            assert_same(reference[key], got[key], f"member {number} {key}")
    assert sweep.read_failure(folder / "1") is None
    resumed = json.loads((folder / "2" / "metrics.json").read_text())
    assert resumed["resumed_from"] == str(folder / "2" / "checkpoints" / "last.ckpt")
    report = reporting.report(folder, png=False)
    assert not report["failed"] and not report["missing"]
    # A seed sweep is one more swept key; on CPU a seed fixes the whole run, and the report
    # merges the seeds into one row: four runs, zero spread.
    afters = [json.loads((folder / str(n) / "metrics.json").read_text())["after"]
              for n in range(4)]
    assert all(after == afters[0] for after in afters)
    rows = report["rows"]
    assert len(rows) == 1 and len(rows[0].members) == 4
    assert rows[0].stats("abs_rel") == (pytest.approx(afters[0]["abs_rel"]), 0.0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_OPTUNA, reason="the optional optuna extra is not installed")
def test_optuna_search_minimises_the_returned_validation_abs_rel(tmp_path: Path,
                                                                forked: ForkServer) -> None:
    env = command_env(tmp_path)
    result = forked.run("fsre_lightning.train", [
        "+experiment=[search_sgt,smoke]", "model.network.num_heads=1",
        "model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet",
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
