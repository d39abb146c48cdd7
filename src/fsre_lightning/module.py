"""FSREModule: the LightningModule that wires networks, losses, metrics and logging together.

The maths lives elsewhere (models/, geometry, losses/, objective, metrics); this class only
orchestrates one step and what is logged. The batch layout is the one documented in
`fsre_lightning.data.kitti`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fsre_lightning.geometry import disp_to_depth
from fsre_lightning.losses import photometric_losses
from fsre_lightning.metrics import DEPTH_METRIC_KEYS, DepthMetrics, SegmentationIoU
from fsre_lightning.objective import LossConfig, compute_losses
from fsre_lightning.visualize import (
    colorize_disparity,
    colorize_error,
    colorize_segmentation,
    log_image,
    make_panel,
)

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteLossError(RuntimeError):
    """A loss term or gradient was NaN/inf under `model.nonfinite=stop`.

    Raised before the optimiser step, so the weights are those of the last good step; the
    interrupt checkpoint callback does not save on this error (the last good checkpoint stays).
    """


def _plain(cfg: Any) -> Any:
    """Config nodes as plain containers, so hyper-parameters pickle and print cleanly."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


class FSREModule(pl.LightningModule):
    """Self-supervised depth with semantics: FSRENetwork + PoseNetwork trained with SPEC's loss.

    `network` and `pose_network` are Hydra configs (with `_target_`) so that a checkpoint alone
    rebuilds the model: `FSREModule.load_from_checkpoint(path)`.
    """

    def __init__(
        self,
        network: Mapping[str, Any],
        pose_network: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        frame_ids: Sequence[int] = (0, -1, 1),
        image_log_every_n_steps: int = 250,
        num_panel_images: int = 2,
        nonfinite: str = "skip",
        nonfinite_max_consecutive: int = 100,
        channels_last: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        compile_loss: bool = False,
    ) -> None:
        super().__init__()
        network, pose_network = _plain(network), _plain(pose_network)
        loss, optimizer, scheduler = _plain(loss) or {}, _plain(optimizer), _plain(scheduler)
        self.save_hyperparameters(
            {
                "network": network,
                "pose_network": pose_network,
                "loss": loss,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "frame_ids": list(frame_ids),
                "image_log_every_n_steps": image_log_every_n_steps,
                "num_panel_images": num_panel_images,
                "nonfinite": nonfinite,
                "nonfinite_max_consecutive": nonfinite_max_consecutive,
                "channels_last": channels_last,
                "compile": compile,
                "gradient_checkpointing": gradient_checkpointing,
                "compile_loss": compile_loss,
            }
        )
        self.net = hydra.utils.instantiate(network)
        self.pose_net = hydra.utils.instantiate(pose_network)
        self.loss_cfg = LossConfig(**loss)
        self.frame_ids = [int(f) for f in frame_ids]
        # fused: one kernel for all of Adam's updates (same formula), ~3x faster than the
        # per-tensor loop on CPU and without foreach's temporary copies.
        optimizer = {"lr": 1.5e-4, "pose_lr_scale": 1.0, "fused": True, **(optimizer or {})}
        self.pose_lr_scale = float(optimizer.pop("pose_lr_scale"))
        self.optimizer_cfg = optimizer
        scheduler = {"milestones": [10, 15], "gamma": 0.1, "warmup_steps": 0, **(scheduler or {})}
        self.warmup_steps = int(scheduler.pop("warmup_steps"))
        self.scheduler_cfg = scheduler
        self.image_log_every_n_steps = image_log_every_n_steps
        self.num_panel_images = num_panel_images
        self.has_segmentation = getattr(self.net, "seg_decoder", None) is not None
        self.val_depth = DepthMetrics()
        self.val_miou = SegmentationIoU()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"model.nonfinite={nonfinite!r}: use one of {NONFINITE_POLICIES}")
        self.nonfinite = nonfinite
        self.nonfinite_max_consecutive = int(nonfinite_max_consecutive)
        # Plain counters (not checkpointed): they describe this process's run.
        self.skipped_nonfinite = 0
        self._consecutive_nonfinite = 0
        self._skip_this_step = False
        self._warned_nonfinite: set[str] = set()
        self._batch_names: list[str] = []
        self._apply_speed_options(channels_last, compile, gradient_checkpointing, compile_loss)

    def _apply_speed_options(
        self,
        channels_last: bool,
        compile: bool,
        gradient_checkpointing: bool,
        compile_loss: bool,
    ) -> None:
        """Options that change speed and memory, never the maths (benchmarks/README.md)."""
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # Weights in NHWC make the convolutions of both networks produce NHWC as well.
            self.net.to(memory_format=torch.channels_last)
            self.pose_net.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            if not hasattr(self.net, "gradient_checkpointing"):
                raise ValueError("model.gradient_checkpointing: the network does not support it")
            self.net.gradient_checkpointing = True
        if compile:
            # Module.compile keeps the parameter names, so checkpoints stay interchangeable.
            self.net.compile()
            self.pose_net.compile()
        # The photometric maps (SSIM + L1 of every source at every scale) are element-wise work
        # bound by memory traffic; Inductor fuses them into a few loops (2.4x on CPU).
        self._photometric = (
            torch.compile(photometric_losses) if compile_loss else photometric_losses
        )

    # ------------------------------------------------------------------ steps
    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        return self.net(image)

    def _transforms(self, frames_aug: torch.Tensor) -> list[torch.Tensor]:
        target = frames_aug[:, 0]
        return [
            self.pose_net.transform(target, frames_aug[:, i], frame_id)
            for i, frame_id in enumerate(self.frame_ids[1:], start=1)
        ]

    def _step(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        frames = batch["frames"]
        frames_aug = batch.get("frames_aug", frames)
        if frames.shape[1] != len(self.frame_ids):
            raise ValueError(
                f"batch has {frames.shape[1]} frames per sample but model.frame_ids is "
                f"{self.frame_ids}: set data.frame_ids and model.frame_ids alike"
            )
        image = frames_aug[:, 0]
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        outputs = self.net(image)
        losses = compute_losses(
            outputs,
            frames,
            batch["K"],
            batch["inv_K"],
            self._transforms(frames_aug),
            batch.get("labels"),
            self.loss_cfg,
            photometric_fn=self._photometric,
        )
        return outputs, losses

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._skip_this_step = False

    def _nonfinite(self, what: str, terms: Sequence[str]) -> None:
        """Apply model.nonfinite to a step whose `terms` (loss names or "gradients") are NaN/inf."""
        names = ", ".join(terms)
        frames = "; ".join(self._batch_names) or "?"
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} ({names}) at step {self.global_step} on frames [{frames}]: "
                f"stopped without taking the step (model.nonfinite=stop); the last checkpoint "
                f"on disk is from before it. Check those frames, lower model.optimizer.lr or "
                f"set model.nonfinite=skip")
        self._skip_this_step = True
        self.skipped_nonfinite += 1
        self._consecutive_nonfinite += 1
        for term in terms:
            if term not in self._warned_nonfinite:  # once per term: a log, not a flood
                self._warned_nonfinite.add(term)
                log.warning("non-finite %s %s at step %d on frames [%s]: step skipped "
                            "(model.nonfinite=skip; counted in train/skipped_nonfinite)",
                            what, term, self.global_step, frames)
        if self._consecutive_nonfinite > self.nonfinite_max_consecutive:
            # Skipping keeps the weights finite, so an endless run of bad steps means the data
            # or the numerics are broken: stop instead of burning the remaining hours.
            raise NonFiniteLossError(
                f"{self._consecutive_nonfinite} consecutive steps had non-finite {what} "
                f"({names}), last on frames [{frames}]: more than "
                f"model.nonfinite_max_consecutive={self.nonfinite_max_consecutive}")

    def _any_rank(self, flag: bool) -> bool:
        """`flag` OR-ed over the DDP ranks (every rank must call this equally often)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _log_skipped(self) -> None:
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), reduce_fx="max")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        skipped = getattr(dm, "skipped_samples", None)
        if skipped is not None:
            self.log("train/skipped_samples", float(len(skipped)), reduce_fx="max")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._batch_names = list(batch.get("name", []))
        # Every sample of the batch unreadable (data.on_error=skip). Under DDP a rank skipping
        # backward alone would hang the others, so every decision to skip is taken by all.
        if self._any_rank("frames" not in batch):
            self._skip_this_step = True
            self._log_skipped()
            return None
        outputs, losses = self._step(batch)
        bad = [name for name, value in losses.items()
               if name != "automask" and value.is_floating_point()
               and not bool(torch.isfinite(value).all())]
        if self._any_rank(bool(bad)):
            self._nonfinite("loss", bad or ["(on another rank)"])
            self._log_skipped()
            return None  # Lightning then skips backward; Adam sees no gradients and no step
        batch_size = batch["frames"].shape[0]
        for name, value in losses.items():
            if value.dim() == 0:
                self.log(f"train/{name}", value, prog_bar=name == "total", batch_size=batch_size)
        if self.image_log_every_n_steps and self.global_step % self.image_log_every_n_steps == 0:
            self._log_panel("train/panel", batch, outputs, losses.get("automask"))
        self._log_skipped()
        return losses["total"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._skip_this_step:
            self._consecutive_nonfinite = 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Catch finite losses with non-finite gradients before they reach Adam's moments."""
        if self._skip_this_step or str(self.trainer.precision).startswith("16"):
            # 16-bit AMP: the grad scaler skips overflowing steps itself, by design.
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
        if bool(torch.isfinite(norms).all()):
            return
        self._nonfinite("gradients", ["gradients"])
        for p in self.parameters():
            p.grad = None  # Adam skips parameters without a gradient: its state stays as it was

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # A skipped step must not advance per-step schedules (the warm-up) either; the
        # per-epoch milestones count epochs, which a skipped batch does not change.
        if self._skip_this_step and self._trainer is not None and any(
                c.scheduler is scheduler and c.interval == "step"
                for c in self.trainer.lr_scheduler_configs):
            return
        super().lr_scheduler_step(scheduler, metric)

    def on_validation_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.val_depth.crop = getattr(dm, "eval_crop", "none")
        self.val_depth.min_depth = getattr(dm, "min_depth_eval", 1e-3)
        self.val_depth.max_depth = getattr(dm, "max_depth_eval", 80.0)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if "frames" not in batch:  # every sample unreadable under data.eval_on_error=skip
            return
        outputs, losses = self._step(batch)
        batch_size = batch["frames"].shape[0]
        self.log("val/loss", losses["total"], batch_size=batch_size, sync_dist=True)
        scaled_disp, _ = disp_to_depth(
            outputs["disp"][0], self.loss_cfg.min_depth, self.loss_cfg.max_depth
        )
        if "depth_gt" in batch:
            self.val_depth.update(scaled_disp, batch["depth_gt"], batch.get("gt_size"))
        if self.has_segmentation and "labels" in batch:
            self.val_miou.update(outputs["seg_logits"].argmax(1), batch["labels"])
        if batch_idx == 0:
            error = self._error_map(scaled_disp, batch) if "depth_gt" in batch else None
            self._log_panel("val/panel", batch, outputs, error)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_depth.compute()
        for key, value in metrics.items():
            self.log(f"val/{key}", value.float(), prog_bar=key == "abs_rel")
        if self.has_segmentation and self.val_miou.update_count > 0:
            self.log("val/miou", self.val_miou.compute())
        self.val_depth.reset()
        self.val_miou.reset()

    # -------------------------------------------------------------- optimiser
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resume (Trainer.fit(ckpt_path)) and load_from_checkpoint both pass here before the
        # weights are copied: a checkpoint of another architecture fails naming the keys.
        from fsre_lightning.checkpointing import check_state_dict_compatible

        if "state_dict" in checkpoint:
            check_state_dict_compatible(self, checkpoint["state_dict"])

    def configure_optimizers(self) -> tuple[list[Any], list[dict[str, Any]]]:
        groups = [{"params": self.net.parameters()},
                  {"params": self.pose_net.parameters(),
                   "lr": self.optimizer_cfg["lr"] * self.pose_lr_scale}]
        optimizer = torch.optim.Adam(groups, **self.optimizer_cfg)
        # Both schedulers are chainable, so their factors multiply on the one optimiser.
        schedulers = [{"scheduler": torch.optim.lr_scheduler.MultiStepLR(
            optimizer, **self.scheduler_cfg), "interval": "epoch"}]
        if self.warmup_steps > 1:
            # A linear ramp keeps Adam's first, sign-like steps from saturating the disparity
            # sigmoid of a randomly initialised network (it collapses to zero disparity).
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / self.warmup_steps, total_iters=self.warmup_steps - 1)
            schedulers.append({"scheduler": warmup, "interval": "step"})
        return [optimizer], schedulers

    # ---------------------------------------------------------------- logging
    def _error_map(self, scaled_disp: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """|gt - pred| / gt at ground-truth pixels, median-scaled, at the network resolution."""
        gt = batch["depth_gt"]
        size = scaled_disp.shape[-2:]
        gt_small = torch.nn.functional.interpolate(gt, size=size, mode="nearest")
        pred = 1.0 / scaled_disp
        valid = gt_small > 0
        error = torch.zeros_like(pred)
        for i in range(pred.shape[0]):
            if valid[i].any():
                ratio = gt_small[i][valid[i]].median() / pred[i][valid[i]].median()
                rel = (gt_small[i] - pred[i] * ratio).abs() / gt_small[i].clamp_min(1e-3)
                error[i] = rel * valid[i]
        return colorize_error(error, vmax=0.5)

    def _log_panel(
        self,
        key: str,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
        extra: torch.Tensor | None,
    ) -> None:
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        n = self.num_panel_images
        rows = [batch["frames"][:n, 0], colorize_disparity(outputs["disp"][0][:n])]
        if "seg_logits" in outputs:
            rows.append(colorize_segmentation(outputs["seg_logits"][:n].argmax(1)))
        if extra is not None:
            rows.append(extra[:n].float().expand(-1, 3, -1, -1) if extra.shape[1] == 1
                        else extra[:n])
        log_dir = Path(self.trainer.default_root_dir) / "images"
        log_image(self.logger, key, make_panel(rows), self.global_step, log_dir)


def metric_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The seven depth metrics (plus mIoU when present) as floats, keyed like SPEC section 6."""
    out = {}
    for key in (*DEPTH_METRIC_KEYS, "miou"):
        value = metrics.get(f"val/{key}", metrics.get(key))
        if value is not None:
            out[key] = float(value)
    return out
