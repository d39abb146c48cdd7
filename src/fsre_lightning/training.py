"""One training run as `python -m fsre_lightning.train` makes it: the networks before the data,
the data module, the Trainer with the callbacks that make a run resumable, fit, the final
checkpoint and validation, metrics.json (the command itself, `fsre_lightning.train`, checks the
config and calls `run`).

With no overrides it trains the full model on the built-in synthetic scenes (generated on first
use). Each run folder gets checkpoints/ (best and last), config.yaml (the resolved config) and
metrics.json (validation metrics before, if asked, and after training).

`init_weights=<ckpt or release folder>` starts a fine-tuning run from those weights;
`ckpt_path=<file>|last|auto` resumes exactly (see README "Interrupting and resuming"); SIGTERM
saves checkpoints/last.ckpt and exits with PREEMPTED_EXIT_CODE and the command to resume.
"""

from __future__ import annotations

import inspect
import logging
import math
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

from fsre_lightning.callbacks import (
    CheckpointOnInterrupt,
    RNGStateCheckpoint,
    StopAtStepBoundary,
    TrainingStopped,
)
from fsre_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_state_dict_compatible,
    find_last_checkpoint,
    load_checkpoint_weights_only,
)
from fsre_lightning.config import validate_config
from fsre_lightning.distributed import effective_batch_split, install_ddp_launcher_fix
from fsre_lightning.module import FSREModule, without_imagenet_init
from fsre_lightning.runtime import (
    PreemptedError,
    check_accelerator,
    instantiate,
    write_json,
)
from fsre_lightning.scoring.metrics import DISPLAY_NAMES, REPORTED_METRICS, metric_summary
from fsre_lightning.sweeps.context import is_sweep_member, member_context
from fsre_lightning.sweeps.members import RESUME_VALUES, member_checkpoint, resume_hint
from fsre_lightning.tracking.wandb import (
    close_open_wandb_run,
    continue_wandb_run,
    finish_loggers,
    print_wandb_sync_hint,
)
from fsre_lightning.trained import load_initial_weights

log = logging.getLogger(__name__)


def instantiate_group(group: Mapping[str, Any] | None) -> list[Any]:
    """Instantiate every entry of a config group that maps names to `_target_` configs."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c and "_target_" in c]


def choose_monitor(cfg: DictConfig, datamodule: Any) -> None:
    """`monitor: auto` means depth AbsRel when validation has ground truth, else the val loss."""
    for cb in (cfg.get("callbacks") or {}).values():
        if cb and cb.get("monitor") == "auto":
            has_gt = datamodule.has_val_gt
            with open_dict(cb):
                cb.monitor = "val/abs_rel" if has_gt else "val/loss"
            log.info("checkpoint monitor: %s", cb.monitor)


def print_metrics(results: Mapping[str, Mapping[str, float]], title: str) -> None:
    """A rich table with one column per result set (e.g. before / after training)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    keys = [k for k in REPORTED_METRICS if any(k in r for r in results.values())]
    for key in keys:
        table.add_row(DISPLAY_NAMES[key],
                      *(f"{r[key]:.4f}" if key in r else "-" for r in results.values()))
    Console().print(table)


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """`ckpt_path` as a file: `last` = the newest last.ckpt of this run name (error if none),
    `auto` = the same or None (a fresh start), e.g. for a SLURM job that may be requeued. In a
    sweep member, both mean the member folder's own last.ckpt (a sweep resumed in place)."""
    value = cfg.get("ckpt_path")
    if value in (None, ""):
        return None
    if str(value) in RESUME_VALUES and (member_context() is not None or is_sweep_member()):
        return member_checkpoint(cfg.paths.run_dir, str(value))
    if str(value) in RESUME_VALUES:
        try:
            return find_last_checkpoint(cfg.paths.output_dir, cfg.name, exclude=cfg.paths.run_dir)
        except FileNotFoundError:
            if str(value) == "auto":
                log.info("ckpt_path=auto: no checkpoint of name=%s yet under %s, starting fresh",
                         cfg.name, cfg.paths.output_dir)
                return None
            raise
    path = Path(str(value))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(value)!r}: no such checkpoint file (training "
                                "writes <run folder>/checkpoints/last.ckpt; ckpt_path=last "
                                "takes the newest)")
    return path


def trainer_plugins() -> list[Any]:
    """Atomic checkpoint writes. The cluster environment is Lightning's own choice: it detects a
    SLURM batch job (and its auto-requeue on SIGUSR1, `sbatch --signal=USR1@90`) and leaves an
    interactive allocation (`salloc`, `srun --pty bash`) alone."""
    return [AtomicCheckpointIO()]


def build_module(cfg: DictConfig, initialised: bool) -> FSREModule:
    """The LightningModule of `cfg.model`. `initialised`: its weights come from a checkpoint
    (resume, init_weights), so ImageNet weights are neither looked for nor downloaded."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    if initialised:
        model = without_imagenet_init(model)
    return instantiate(
        model, loss=cfg.loss, frame_ids=cfg.data.frame_ids, eval_crop=cfg.data.eval_crop,
        min_depth_eval=cfg.data.min_depth_eval, max_depth_eval=cfg.data.max_depth_eval,
        _recursive_=False)


def apply_effective_batch(cfg: DictConfig) -> None:
    """`effective_batch_size` set: data.batch_size becomes its share per process."""
    effective = cfg.get("effective_batch_size")
    if effective is None:
        return
    batch, processes, accumulate = effective_batch_split(effective, cfg.trainer)
    with open_dict(cfg):
        cfg.data.batch_size = batch
    log.info("effective batch %d = %d process(es) x %d x %d accumulated", effective, processes,
             batch, accumulate)


def log_run_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """Every logger gets the whole resolved config (data, trainer, seed ...), not only the
    model's hyper-parameters, so runs of a sweep can be filtered by any key."""
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (and evaluate) as the config says; returns what metrics.json holds."""
    validate_config(cfg, "train")
    # DDP's other ranks must re-run this job, not the whole --multirun (distributed.py).
    install_ddp_launcher_fix()
    check_accelerator(cfg.trainer.accelerator)
    apply_effective_batch(cfg)
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path = resolve_ckpt_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    # The networks before the data: an unknown encoder or missing ImageNet weights stop the run
    # before a cache build that can take an hour on KITTI.
    module = build_module(cfg, initialised=ckpt_path is not None or bool(cfg.get("init_weights")))
    if cfg.get("init_weights") and ckpt_path is None:
        log.info(load_initial_weights(module, cfg.init_weights))
    if ckpt_path is not None:
        # Another architecture fails here, naming the keys, not deep inside Lightning's restore.
        checkpoint = load_checkpoint_weights_only(ckpt_path)
        check_state_dict_compatible(module, checkpoint["state_dict"], source=str(ckpt_path))
        continue_wandb_run(cfg, checkpoint)
        del checkpoint
        log.info("resuming from %s", ckpt_path)
        with open_dict(cfg):
            cfg.ckpt_path = str(ckpt_path)  # config.yaml records the file actually resumed

    # Loggers too: one whose package is missing stops the run here.
    loggers = instantiate_group(cfg.get("logger"))
    datamodule = instantiate(cfg.data)
    # Find missing files and bad splits now, not an hour into the first epoch.
    datamodule.prepare_data()
    datamodule.setup("fit")
    choose_monitor(cfg, datamodule)
    if rank_zero_only.rank == 0:  # DDP ranks > 0 re-run this entry point into the same folder
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        # Not optional like the config's callbacks: without them a resumed run is not exact.
        callbacks=[*instantiate_group(cfg.get("callbacks")), RNGStateCheckpoint(),
                   StopAtStepBoundary(run_dir / "checkpoints")],
        plugins=trainer_plugins(),
    )
    try:
        results = fit_and_validate(cfg, trainer, module, datamodule, ckpt_path)
        if trainer.is_global_zero:  # DDP: the metrics are synced; rank 0 writes and prints
            write_results(cfg, trainer, results)
    except BaseException:
        # The wandb run ends here whatever happened, so the next run of this process (a sweep's
        # next member) starts its own instead of logging into this one.
        close_open_wandb_run(exit_code=1)
        raise
    return results


def fit_and_validate(cfg: DictConfig, trainer: pl.Trainer, module: FSREModule,
                     datamodule: Any, ckpt_path: Path | None) -> dict[str, Any]:
    """Validate before (if asked), train, save last.ckpt, validate after; what metrics.json
    holds."""
    run_dir = Path(cfg.paths.run_dir)
    log_run_config(trainer, cfg)
    results: dict[str, Any] = {}
    if cfg.get("eval_before"):
        # verbose=False: the run prints one table of its own at the end (print_metrics).
        before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        results["before"] = metric_summary(before)
    fit_kwargs: dict[str, Any] = {}
    if "weights_only" in inspect.signature(trainer.fit).parameters:
        # Checkpoints hold tensors and plain types only: no pickled code runs on resume.
        fit_kwargs["weights_only"] = True
    try:
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(ckpt_path) if ckpt_path else None, **fit_kwargs)
    except TrainingStopped as err:
        how = "preempted (SIGTERM)" if err.signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        raise PreemptedError(f"{how} at step {err.step}, after its step or validation ended; "
                             f"{resume_hint(err.path, cfg.name)}",
                             status=128 + err.signum) from err
    except SIGTERMException as err:  # before training started: Lightning's own handler
        saved = [cb.path for cb in trainer.callbacks
                 if isinstance(cb, CheckpointOnInterrupt) and cb.path.is_file()]
        hint = resume_hint(saved[0] if saved else None, cfg.name)
        raise PreemptedError(f"preempted (SIGTERM) at step {trainer.global_step}; {hint}") from err
    # A run that stops mid-epoch (max_steps) has not hit a checkpoint trigger: keep its end state
    # (final_checkpoint: full, resumable; weights, a third of the size; none).
    last: Path | None = run_dir / "checkpoints" / "last.ckpt"
    if cfg.final_checkpoint == "none":
        last = None
    else:
        trainer.save_checkpoint(last, weights_only=cfg.final_checkpoint == "weights")
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    results["after"] = metric_summary(after)
    monitor = "val/abs_rel" if datamodule.has_val_gt else "val/loss"
    results["monitor"] = {"name": monitor, "value": float(after.get(monitor, math.nan))}

    best = [cb.best_model_path for cb in trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) and getattr(cb, "best_model_path", "")]
    results["checkpoints"] = {"last": str(last) if last else None,
                              "best": best[0] if best else None}
    results["global_step"] = trainer.global_step
    results["resumed_from"] = str(ckpt_path) if ckpt_path else None
    return results


def write_results(cfg: DictConfig, trainer: pl.Trainer, results: dict[str, Any]) -> None:
    """metrics.json, the summary file, the printed table and hints; closes the loggers."""
    run_dir = Path(cfg.paths.run_dir)
    write_json(run_dir / "metrics.json", results)

    summary = {k: results[k] for k in ("before", "after") if k in results}
    summary_path = cfg.get("summary_path")
    if summary_path:
        write_json(summary_path, summary)
    print_metrics(summary, "validation metrics")
    Console().print(f"run folder: {run_dir}", soft_wrap=True)
    print_wandb_sync_hint(trainer)
    finish_loggers(trainer, results)
