"""Train FSRE-Depth: `python -m fsre_lightning.train [overrides]`.

With no overrides it trains the full model on the built-in synthetic scenes (generated on first
use). Each run folder gets checkpoints/ (best and last), config.yaml (the resolved config) and
metrics.json (validation metrics before, if asked, and after training).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from fsre_lightning.config import ConfigError, validate_config
from fsre_lightning.data import DataError
from fsre_lightning.metrics import DEPTH_METRIC_KEYS
from fsre_lightning.models import PretrainedWeightsNotFound
from fsre_lightning.module import metric_summary

log = logging.getLogger(__name__)

CONFIG_DIR = Path(os.environ.get("FSRE_CONFIG_DIR", Path(__file__).resolve().parents[2] / "conf"))


def instantiate_group(group: Mapping[str, Any] | None) -> list[Any]:
    """Instantiate every entry of a config group that maps names to `_target_` configs."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and "_target_" in c]


def choose_monitor(cfg: DictConfig, datamodule: Any) -> None:
    """`monitor: auto` means depth AbsRel when validation has ground truth, else the val loss."""
    for cb in (cfg.get("callbacks") or {}).values():
        if cb and cb.get("monitor") == "auto":
            has_gt = bool(getattr(datamodule, "has_val_gt", False))
            with open_dict(cb):
                cb.monitor = "val/abs_rel" if has_gt else "val/loss"
            log.info("checkpoint monitor: %s", cb.monitor)


def print_metrics(results: Mapping[str, Mapping[str, float]], title: str) -> None:
    """A rich table with one column per result set (e.g. before / after training)."""
    table = Table(title=title)
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    keys = [k for k in (*DEPTH_METRIC_KEYS, "miou") if any(k in r for r in results.values())]
    for key in keys:
        table.add_row(key, *(f"{r[key]:.4f}" if key in r else "-" for r in results.values()))
    Console().print(table)


def print_wandb_sync_hint(trainer: pl.Trainer) -> None:
    """Offline wandb runs are only useful once synced: say how, at the end of every run."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_offline", False):
            run_path = Path(logger.experiment.dir).parent
            Console().print(f"wandb run saved offline; to upload it: [bold]wandb sync {run_path}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (and evaluate) as the config says; returns what metrics.json holds."""
    validate_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    # Find missing files and bad splits now, not an hour into the first epoch.
    datamodule.prepare_data()
    datamodule.setup("fit")
    choose_monitor(cfg, datamodule)

    module = hydra.utils.instantiate(cfg.model, loss=cfg.loss, _recursive_=False)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=instantiate_group(cfg.get("logger")) or False,
        callbacks=instantiate_group(cfg.get("callbacks")),
    )

    results: dict[str, Any] = {}
    if cfg.get("eval_before"):
        results["before"] = metric_summary(trainer.validate(module, datamodule=datamodule)[0])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    # A run that stops mid-epoch (max_steps) has not hit a checkpoint trigger: keep its end state.
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    results["after"] = metric_summary(trainer.validate(module, datamodule=datamodule)[0])

    best = [cb.best_model_path for cb in trainer.checkpoint_callbacks
            if getattr(cb, "monitor", None) and getattr(cb, "best_model_path", "")]
    results["checkpoints"] = {"last": str(last), "best": best[0] if best else None}
    results["global_step"] = trainer.global_step
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))

    summary = {k: results[k] for k in ("before", "after") if k in results}
    summary_path = cfg.get("summary_path")
    if summary_path:
        Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_path).write_text(json.dumps(summary, indent=2))
    print_metrics(summary, "validation metrics")
    Console().print(f"run folder: {run_dir}", soft_wrap=True)
    print_wandb_sync_hint(trainer)
    return results


# Mistakes in the user's config or data: reported as one clear line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, FileNotFoundError, NotADirectoryError, PretrainedWeightsNotFound,
)


def run_or_exit(command: str, job: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """Run an entry point's job; a user mistake ends it with one line on stderr and exit 2."""
    try:
        job(cfg)
    except USER_ERRORS as err:
        print(f"fsre_lightning.{command}: error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
    run_or_exit("train", run, cfg)


if __name__ == "__main__":
    main()
