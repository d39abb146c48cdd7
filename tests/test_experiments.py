"""The paper's tables as experiments: what each sweep changes, effective batch, report tables,
a whole smoke sweep with wandb offline, and DDP on two CPU processes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from fsre_lightning import report as report_cli
from fsre_lightning import train as train_cli
from fsre_lightning.config import validate_config
from fsre_lightning.config.resolvers import run_group
from fsre_lightning.distributed import per_process_batch, world_size
from fsre_lightning.errors import ConfigError
from fsre_lightning.runtime import CONFIG_DIR
from fsre_lightning.sweeps import tables as report
from fsre_lightning.testing import (
    command_env,
    compose_config,
    experiments,
    run_main,
)
from fsre_lightning.testing.forkserver import ForkServer
from fsre_lightning.training import apply_effective_batch

EXPERIMENTS = experiments()
PAPER_EXPERIMENTS = ["table1b", "ablation_sgt_layers", "ablation_k", "ablation_margin",
                     "ablation_cma", "ablation_h", "ablation_cma_placement", "full_hr",
                     "full_r50"]

# What the members of each sweep may differ in, and nothing else.
ROW_KEYS = {"model.network.segmentation", "model.network.cma_scales",
            "loss.segmentation_weight", "loss.sgt_weight", "data.use_labels"}
CLAIMS: dict[str, set[str]] = {
    "table1b": ROW_KEYS,
    "ablation_sgt_layers": {"loss.sgt_scales"},
    "ablation_k": {"loss.sgt_kernel_size"},
    "ablation_sgt_border": {"loss.sgt_border"},
    "ablation_margin": {"loss.sgt_margin"},
    "ablation_cma": {"model.network.cma_targets"},
    "ablation_h": {"model.network.num_heads"},
    "ablation_cma_placement": {"model.network.cma_scales"},
}


def _compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    return compose_config("train", overrides, hydra=hydra)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a config (without the hydra node) as {"a.b": value}."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if path == "hydra":
            continue
        if isinstance(value, dict):
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=False)
    return _flat({k: v for k, v in container.items() if k != "hydra"})


def _members(experiment: str, selection: str | None = None) -> list[list[str]]:
    """The overrides of each member of the experiment's sweep, as the basic sweeper makes them."""
    cfg = _compose([selection or f"+experiment={experiment}"], hydra=True)
    params = cfg.hydra.sweeper.params or {}
    assert len(params) == 1, f"{experiment} should sweep one thing, sweeps {dict(params)}"
    ((key, values),) = params.items()
    (override,) = OverridesParser.create().parse_overrides([f"{key}={values}"])
    return [[f"{key}={v}"] for v in override.sweep_string_iterator()]


# ------------------------------------------------------------------------ composition
@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves_alone_and_with_smoke(experiment: str, tmp_path: Path) -> None:
    """What `--cfg job --resolve` does, in-process: compose, resolve every value, validate."""
    for selection in ([experiment], [experiment, "smoke"]):
        cfg = _compose([f"+experiment=[{','.join(selection)}]"], hydra=True)
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path)
            cfg.hydra.runtime.cwd = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):  # the job's config, as Hydra hands it to the task
            del cfg["hydra"]
        try:
            job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        finally:  # a table's MULTIRUN mode must not leak into later tests of this process
            HydraConfig.instance().cfg = None
        validate_config(job, "train")
        if "smoke" in selection:
            assert job.data.height == 64 and job.trainer.max_steps <= 5
            assert job.data.root.endswith("synthetic_smoke")
        if experiment != "smoke":
            assert job.name == experiment  # the sweep folder and the wandb group follow it


@pytest.mark.slow
@pytest.mark.parametrize("smoke", [False, True], ids=["paper", "smoke"])
@pytest.mark.parametrize("experiment", sorted(CLAIMS))
def test_sweep_members_differ_only_in_what_the_experiment_claims(experiment: str,
                                                                 smoke: bool) -> None:
    selection = f"+experiment=[{experiment},smoke]" if smoke else f"+experiment={experiment}"
    members = _members(experiment, selection)
    assert len(members) >= 2
    leaves = [_leaves(_compose([selection, *m])) for m in members]
    changed = {k for other in leaves[1:] for k in set(leaves[0]) | set(other)
               if leaves[0].get(k) != other.get(k)}
    assert changed == CLAIMS[experiment]


@pytest.mark.slow
def test_ablations_sweep_the_papers_values_on_the_papers_base_rows() -> None:
    def values(experiment: str, key: str) -> list[Any]:
        return [OmegaConf.select(_compose([f"+experiment={experiment}", *m]), key)
                for m in _members(experiment)]

    # paper l 0-3 / 1-3 / 1-4 with s = 4 - l
    assert [list(v) for v in values("ablation_sgt_layers", "loss.sgt_scales")] == [
        [4, 3, 2, 1], [3, 2, 1], [3, 2, 1, 0]]
    assert values("ablation_k", "loss.sgt_kernel_size") == [3, 5, 7]
    assert values("ablation_h", "model.network.num_heads") == [1, 2, 4]
    assert [list(v) for v in values("ablation_cma", "model.network.cma_targets")] == [
        ["depth"], ["seg"], ["depth", "seg"]]
    assert values("ablation_margin", "loss.sgt_margin") == [0.1, 0.2, 0.3, 0.4, 0.5]
    for experiment in ("ablation_sgt_layers", "ablation_k", "ablation_margin"):
        cfg = _compose([f"+experiment={experiment}"])  # "+ L_CE + L_SGT": no CMA
        assert list(cfg.model.network.cma_scales) == [] and cfg.loss.sgt_weight == 0.1
    for experiment in ("ablation_cma", "ablation_h", "ablation_cma_placement"):
        cfg = _compose([f"+experiment={experiment}"])  # "+ L_CE + CMA": no SGT
        assert list(cfg.model.network.cma_scales) == [4, 3, 2] and cfg.loss.sgt_weight == 0


def test_table1b_rows_are_the_papers_rows() -> None:
    rows = {m[0].split("=")[1]: _compose(["+experiment=table1b", *m])
            for m in _members("table1b")}
    assert list(rows) == ["baseline", "ce", "ce_sgt", "ce_cma", "full"]
    base = rows["baseline"]
    assert base.model.network.segmentation is False and not base.data.use_labels
    assert base.loss.segmentation_weight == 0 and base.loss.sgt_weight == 0
    expected = {"ce": ([], 0.0), "ce_sgt": ([], 0.1), "ce_cma": ([4, 3, 2], 0.0),
                "full": ([4, 3, 2], 0.1)}
    for name, (cma, sgt) in expected.items():
        cfg = rows[name]
        assert (list(cfg.model.network.cma_scales), cfg.loss.sgt_weight) == (cma, sgt), name
        assert cfg.model.network.segmentation and cfg.loss.segmentation_weight == 0.3
    # The full row is the package's defaults: the paper's values.
    defaults = _leaves(_compose([]))
    full = _leaves(rows["full"])
    assert {k for k in defaults if defaults[k] != full.get(k)} == {"name",
                                                                   "effective_batch_size"}


@pytest.mark.parametrize(("experiment", "changed"), [
    ("full_hr", {"data.height", "data.width"}), ("full_r50", {"model.network.encoder"})])
def test_single_run_experiments_change_one_thing_of_the_full_model(
        experiment: str, changed: set[str]) -> None:
    full = _leaves(_compose(["+experiment=table1b", "variant=full"]))
    cfg = _leaves(_compose([f"+experiment={experiment}"]))
    assert {k for k in cfg if cfg[k] != full.get(k)} == changed | {"name"}


# --------------------------------------------------------------------------- batch, group
def test_effective_batch_of_12_on_any_device_count() -> None:
    assert [per_process_batch(12, n) for n in (1, 2, 3, 4, 6, 12)] == [12, 6, 4, 3, 2, 1]
    assert per_process_batch(12, 2, accumulate=2) == 3
    with pytest.raises(ValueError, match="multiple of 8"):
        per_process_batch(12, 8)
    assert world_size(4, 2) == 8 and world_size([0, 1]) == 2 and world_size("0,1,2") == 3
    assert world_size("auto") is None and world_size(-1) is None

    for trainer, devices, expected in (("cpu", 1, 12), ("ddp_cpu", 2, 6), ("ddp", 4, 3)):
        cfg = _compose(["+experiment=ablation_k", f"trainer={trainer}",
                        f"trainer.devices={devices}"])
        apply_effective_batch(cfg)
        assert cfg.data.batch_size == expected
    cfg = _compose(["+experiment=ablation_k", "trainer=ddp", "trainer.devices=5"])
    with pytest.raises(ConfigError, match="effective_batch_size=12"):
        apply_effective_batch(cfg)
    cfg = _compose(["+experiment=[ablation_k,smoke]", "trainer=ddp_cpu"])
    apply_effective_batch(cfg)  # smoke: per-process batch as given
    assert cfg.data.batch_size == 2


def test_wandb_group_is_the_name_outside_a_sweep() -> None:
    assert run_group("ablation_h") == "ablation_h"
    cfg = _compose(["+experiment=ablation_h"])
    assert cfg.logger.wandb.group == "ablation_h"


# --------------------------------------------------------------------------------- report
def _fake_sweep(root: Path, metrics_of: dict[tuple[int, int], float]) -> Path:
    sweep = root / "multirun" / "ablation_h" / "2026-01-01_00-00-00"
    for num, ((heads, seed), abs_rel) in enumerate(metrics_of.items()):
        member = sweep / str(num)
        (member / ".hydra").mkdir(parents=True)
        overrides = [f"model.network.num_heads={heads}", f"seed={seed}",
                     "+experiment=[ablation_h,smoke]"]
        (member / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (member / "config.yaml").write_text(yaml.safe_dump(
            {"name": "ablation_h", "seed": seed,
             "logger": {"wandb": {"group": "ablation_h-2026-01-01_00-00-00"}}}))
        after = {"abs_rel": abs_rel, "sq_rel": 1.0, "rmse": 5.0, "rmse_log": 0.2, "a1": 0.8,
                 "a2": 0.9, "a3": 0.95, "miou": 0.5}
        (member / "metrics.json").write_text(json.dumps({"after": after, "global_step": 3}))
    (sweep / "9" / ".hydra").mkdir(parents=True)  # a member that never finished
    (sweep / "9" / ".hydra" / "overrides.yaml").write_text("[]")
    return sweep


def test_report_rows_are_swept_values_with_mean_and_spread_over_seeds(tmp_path: Path,
                                                                       capsys) -> None:
    values = {(1, 0): 0.20, (1, 1): 0.30, (2, 0): 0.10, (2, 1): 0.14, (4, 0): 0.5,
              (4, 1): 0.5}
    sweep = _fake_sweep(tmp_path, values)
    assert report_cli.main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    ours = [line for line in text.splitlines() if line.startswith("| H = ")]
    assert len(ours) == 3
    assert "| H = 1 (num_heads=1) | ? | 2 | 0.2500 ± 0.0707 |" in ours[0]
    assert "| H = 4 (num_heads=4) | ? | 2 | 0.5000 ± 0.0000 |" in ours[2]
    # the paper's row, beside ours, naming its data
    assert "| paper: H = 2 | KITTI Eigen test | | 0.107 | 0.749 |" in text
    assert "Not finished (no metrics.json): 9" in text
    assert (sweep / "abs_rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(__import__("csv").DictReader((sweep / "report.csv").open()))
    assert [r["source"] for r in rows] == ["ours", "paper"] * 3
    assert float(rows[2]["abs_rel"]) == pytest.approx(0.12)
    assert rows[2]["seeds"] == "0 1"
    assert "| H = 1" in capsys.readouterr().out

    # The same sweep found by its wandb group and by its experiment folder.
    out = tmp_path / "elsewhere"
    assert report_cli.main(["ablation_h-2026-01-01_00-00-00", "--outputs", str(tmp_path),
                        "--out", str(out), "--no-png"]) == 0
    assert (out / "report.md").read_text().splitlines()[4:] == text.splitlines()[4:]
    assert report.find_sweep(str(sweep.parent)) == sweep
    assert report_cli.main(["no-such-group", "--outputs", str(tmp_path)]) == 2


# ------------------------------------------------------------------- end to end (slower)
# The experiments' models on timm's tiny test ResNet: what runs end to end is the plumbing.
SMALL_ENCODERS = ["model.network.encoder=test_resnet", "model.pose_network.encoder=test_resnet"]


def _train(forked: ForkServer, args: list[str], env: dict[str, str]
           ) -> subprocess.CompletedProcess:
    """`python -m fsre_lightning.train`, forked (conftest's `forked`)."""
    return forked.run("fsre_lightning.train", [*SMALL_ENCODERS, *args], env, timeout=1200)


@pytest.mark.slow
def test_ablation_h_smoke_sweep_runs_three_members_logs_wandb_and_reports(
        tmp_path: Path, forked: ForkServer) -> None:
    env = command_env(tmp_path, WANDB_MODE="offline")
    start = time.time()
    # No --multirun: a table is a sweep by itself.
    result = _train(forked, ["+experiment=[ablation_h,smoke]"], env)
    assert result.returncode == 0, result.stderr[-4000:]
    elapsed = time.time() - start
    (sweep,) = (tmp_path / "outputs" / "multirun" / "ablation_h").iterdir()
    members = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in members] == ["0", "1", "2"], f"{elapsed:.0f} s"
    groups = set()
    for member, heads in zip(members, (1, 2, 4), strict=True):
        assert json.loads((member / "metrics.json").read_text())["global_step"] == 2
        overrides = yaml.safe_load((member / ".hydra" / "overrides.yaml").read_text())
        assert f"model.network.num_heads={heads}" in overrides
        config = yaml.safe_load((member / "config.yaml").read_text())
        assert config["model"]["network"]["num_heads"] == heads
        groups.add(config["logger"]["wandb"]["group"])
        # The offline wandb run holds the metrics, learning rate, panels and final table.
        (run,) = (member / "wandb").glob("offline-run-*")
        records = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
        # (No train/sgt: the CMA ablations run without SGT.) num_heads: from the config.
        for key in (b"train/total", b"train/photometric", b"train/segmentation",
                    b"val/abs_rel", b"val/miou", b"lr-Adam", b"eval/final", b"num_heads"):
            assert key in records, key
        assert list((run / "files" / "media" / "images").rglob("*.png"))
        assert list((run / "files" / "media" / "table").rglob("*.json"))
    assert groups == {f"ablation_h-{sweep.name}"}  # one group per sweep
    assert f"wandb sync {sweep}/*/wandb/offline-run-*" in result.stdout

    rep = run_main(report_cli.main, [str(sweep)])
    assert rep.returncode == 0, rep.stderr
    lines = (sweep / "report.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| H = ")] == [
        "H = 1 (num_heads=1)", "H = 2 (num_heads=2)", "H = 4 (num_heads=4)"]
    assert (sweep / "abs_rel.png").stat().st_size > 1000
    print(f"ablation_h smoke sweep: {elapsed:.0f} s")


@pytest.mark.slow
def test_ddp_cpu_two_processes_validate_like_one(command_root: Path,
                                                  forked: ForkServer) -> None:
    tmp_path = command_root
    env = command_env(tmp_path)
    # 6 training frames: 3 steps an epoch on one process, 1 on each of two (batch 2 each).
    common = ["+experiment=smoke", "logger=csv", "eval_before=true", "trainer.max_steps=2",
              "trainer.max_epochs=2"]
    # Inside --multirun: the other rank must re-run this member, not the sweep.
    ddp = _train(forked, [*common, "trainer=ddp_cpu", "name=ddp", "--multirun"], env)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    # The single process in this one.
    single = run_main(train_cli.main, [*common, *SMALL_ENCODERS, "name=single"])
    assert single.returncode == 0, single.stderr[-4000:]
    output = ddp.stdout + ddp.stderr
    assert "MEMBER: 2/2" in output  # Lightning's line for the second of two processes
    (ddp_run,) = (tmp_path / "outputs" / "multirun" / "ddp").glob("*/0")
    (single_run,) = (tmp_path / "outputs" / "single").iterdir()
    ddp_metrics = json.loads((ddp_run / "metrics.json").read_text())
    single_metrics = json.loads((single_run / "metrics.json").read_text())
    assert ddp_metrics["global_step"] == 2
    # Same weights (same seed), same 6 validation frames split 3 + 3: the metrics synced by
    # torchmetrics over the two processes equal the single process's.
    before, expected = ddp_metrics["before"], single_metrics["before"]
    assert set(before) == set(expected) and "miou" in before
    for key, value in expected.items():
        assert before[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # Only the first process writes the run folder's files.
    assert not list((tmp_path / "outputs" / "multirun" / "ddp").glob("*/[1-9]"))


def test_slurm_launcher_config_follows_the_trainer() -> None:
    """conf/hydra/launcher/slurm.yaml without the optional plugin: one task and GPU per device."""
    cfg = OmegaConf.load(CONFIG_DIR / "hydra" / "launcher" / "slurm.yaml")
    assert cfg.defaults == ["submitit_slurm"]
    for key, source in (("gpus_per_node", "devices"), ("tasks_per_node", "devices"),
                        ("nodes", "num_nodes")):
        assert cfg._get_node(key)._value() == f"${{trainer.{source}}}"
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = _compose(["+experiment=ablation_h", "trainer=ddp", "trainer.devices=4",
                         "hydra/launcher=slurm"], hydra=True).hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 1)
