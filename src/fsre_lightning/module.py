"""FSREModule: the LightningModule of one training step, its non-finite policy and optimisers.

The maths lives elsewhere (models/, geometry, losses/, objective, scoring/), the speed options
in `speed`, the image panels in `tracking.panels`; this class orchestrates a step and what is
logged. The batch it reads is docs/design.md section 4.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fsre_lightning.checkpoints import check_state_dict_compatible, describe_training
from fsre_lightning.errors import ConfigError
from fsre_lightning.geometry import disp_to_depth
from fsre_lightning.module_config import ModelConfig
from fsre_lightning.nonfinite import NonFinitePolicy, nonfinite_terms, scalar_terms
from fsre_lightning.objective import LossConfig, compute_losses
from fsre_lightning.scoring.metrics import DepthMetrics, SegmentationIoU
from fsre_lightning.speed import apply_speed_options
from fsre_lightning.tracking import panels
from fsre_lightning.tracking.wandb import store_run_id

# The options of ModelConfig FSREModule takes as keyword arguments (the rest are positional).
_OPTIONS = tuple(f.name for f in fields(ModelConfig)
                 if f.name not in ("_target_", "network", "pose_network", "optimizer",
                                   "scheduler"))


def _plain(cfg: Any) -> Any:
    """Config nodes as plain containers, so hyper-parameters pickle and print cleanly."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _moved_into_model(optimizer: dict[str, Any] | None, scheduler: dict[str, Any] | None,
                      options: dict[str, Any]) -> None:
    """Checkpoints written before `pose_lr_scale` and `warmup_steps` were model keys hold them
    in their optimiser and scheduler arguments: moved to where they are read now."""
    for node, key in ((optimizer, "pose_lr_scale"), (scheduler, "warmup_steps")):
        if node is not None and key in node:
            value = node.pop(key)
            options.setdefault(key, value)


class FSREModule(pl.LightningModule):
    """Self-supervised depth with semantics: FSRENetwork + PoseNetwork trained with the total
    loss of `fsre_lightning.objective`.

    `network` and `pose_network` are Hydra configs (with `_target_`) so that a checkpoint alone
    rebuilds the model: `FSREModule.load_from_checkpoint(path)`. `optimizer` and `scheduler`
    are `_partial_` Hydra configs (model.optimizer, model.scheduler); a module without them
    predicts but cannot train. `frame_ids`, `eval_crop`, `min_depth_eval` and `max_depth_eval`
    are the data config's (the frames of a batch, the validation's Eigen protocol). The other
    keyword arguments are `ModelConfig`'s options, with its defaults and rules.
    """

    def __init__(
        self,
        network: Mapping[str, Any],
        pose_network: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        frame_ids: Sequence[int] = (0, -1, 1),
        eval_crop: str = "garg",
        min_depth_eval: float = 1e-3,
        max_depth_eval: float = 80.0,
        **options: Any,
    ) -> None:
        super().__init__()
        network, pose_network = _plain(network), _plain(pose_network)
        loss = _plain(loss) or {}
        optimizer = dict(_plain(optimizer)) if optimizer is not None else None
        scheduler = dict(_plain(scheduler)) if scheduler is not None else None
        _moved_into_model(optimizer, scheduler, options)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"FSREModule got unknown options {unknown}: "
                            f"ModelConfig's are {list(_OPTIONS)}")
        # Defaults and rules written once, in ModelConfig (the networks check their own).
        self.config = ModelConfig(network=network, pose_network=pose_network,
                                  optimizer=optimizer, scheduler=scheduler, **options)
        self.save_hyperparameters({
            "network": network, "pose_network": pose_network, "loss": loss,
            "optimizer": optimizer, "scheduler": scheduler, "frame_ids": list(frame_ids),
            **{key: getattr(self.config, key) for key in _OPTIONS},
            "eval_crop": eval_crop, "min_depth_eval": min_depth_eval,
            "max_depth_eval": max_depth_eval,
        })
        self.net = hydra.utils.instantiate(network)
        self.pose_net = hydra.utils.instantiate(pose_network)
        self.loss_cfg = LossConfig(**loss)
        self.frame_ids = [int(f) for f in frame_ids]
        self.has_segmentation = getattr(self.net, "seg_decoder", None) is not None
        self.val_depth = DepthMetrics(min_depth_eval, max_depth_eval, eval_crop)
        self.val_miou = SegmentationIoU()
        self.nonfinite = NonFinitePolicy(self.config.nonfinite,
                                         self.config.nonfinite_max_consecutive)
        self._batch_names: list[str] = []
        # The loss terms' finiteness, one flag on the device, read once per step (on_before_
        # optimizer_step) together with the gradients': a single device-to-host transfer.
        self._losses_finite: torch.Tensor | None = None
        self._last_losses: dict[str, torch.Tensor] = {}
        self._logged_counts: dict[str, float] = {}
        cfg = self.config
        plan = apply_speed_options(
            self.net, self.pose_net, type(self)._forward_losses, cfg.channels_last, cfg.compile,
            cfg.compile_mode, cfg.gradient_checkpointing, cfg.compile_loss)
        self.channels_last = bool(cfg.channels_last)
        self._photometric, self._compiled_step = plan.photometric, plan.compiled_step
        self._cuda_graphs = plan.cuda_graphs

    # ------------------------------------------------------------------ steps
    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        return self.net(image)

    def _transforms(self, frames_aug: torch.Tensor) -> list[torch.Tensor]:
        target = frames_aug[:, 0]
        return [
            self.pose_net.transform(target, frames_aug[:, i], frame_id)
            for i, frame_id in enumerate(self.frame_ids[1:], start=1)
        ]

    def _forward_losses(
        self,
        frames: torch.Tensor,
        frames_aug: torch.Tensor,
        K: torch.Tensor,
        inv_K: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Networks and every loss term of one batch: tensors in, tensors out, nothing that
        reads a value on the host (so that torch.compile takes it as one graph)."""
        outputs = self.net(frames_aug[:, 0])  # the networks take their weights' layout
        losses = compute_losses(outputs, frames, K, inv_K, self._transforms(frames_aug), labels,
                                self.loss_cfg, photometric_fn=self._photometric)
        return outputs, losses

    def _step(
        self, batch: Mapping[str, Any], train: bool = False
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        frames = batch["frames"]
        if frames.shape[1] != len(self.frame_ids):
            raise ValueError(
                f"batch has {frames.shape[1]} frames per sample but the module was built for "
                f"frame ids {self.frame_ids} (data.frame_ids)"
            )
        args = (frames, batch.get("frames_aug", frames), batch["K"], batch["inv_K"],
                batch.get("labels"))
        if train and self._compiled_step is not None:
            return self._compiled_step(self, *args)
        return self._forward_losses(*args)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.nonfinite.start_step()
        if self._cuda_graphs:
            # The previous step's graph outputs may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()

    def _any_rank(self, flag: bool) -> bool:
        """`flag` OR-ed over the DDP ranks (every rank must call this equally often)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _log_skipped(self, batch: Mapping[str, Any]) -> None:
        # Counters are logged when they change and on the loggers' steps, not every step: a
        # Python number logged is uploaded to the GPU, a copy that waits for the queue
        # (design 7.1).
        counts = {"train/skipped_nonfinite": float(self.nonfinite.skipped)}
        if "num_skipped" in batch:  # unreadable samples dropped so far (data.on_error=skip)
            counts["train/skipped_samples"] = float(batch["num_skipped"])
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        due = self.global_step % max(1, every) == 0
        for key, value in counts.items():
            if due or self._logged_counts.get(key) != value:
                self.log(key, value, reduce_fx="max")
                self._logged_counts[key] = value

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._batch_names = list(batch.get("name", []))
        # Every sample of the batch unreadable (data.on_error=skip). Under DDP a rank skipping
        # backward alone would hang the others, so every decision to skip is taken by all.
        if self._any_rank("frames" not in batch):
            self.nonfinite.skip_step = True
            self._log_skipped(batch)
            return None
        outputs, losses = self._step(batch, train=True)
        # No host read here: a NaN/inf term is detected in on_before_optimizer_step, in the one
        # device-to-host transfer of the step, where its gradients are dropped (design 7.1).
        terms = scalar_terms(losses)
        values = torch.stack([v.detach().float() for v in terms.values()])
        finite = torch.isfinite(values).all()
        # Accumulated gradients: every batch of the accumulation counts.
        if self._losses_finite is not None:
            finite = finite & self._losses_finite
        self._losses_finite = finite
        self._last_losses = dict(zip(terms, values.unbind(0), strict=True))
        batch_size = batch["frames"].shape[0]
        for name, value in self._last_losses.items():
            # Not prog_bar: Lightning would read it on the host after every step (the progress
            # bar, fsre_lightning.callbacks.ProgressBar, shows train/total every n steps).
            self.log(f"train/{name}", value, batch_size=batch_size)
        every = self.config.image_log_every_n_steps
        if every and self.global_step % every == 0:
            panels.log_panel(self, "train/panel", batch, outputs,
                             self.config.num_panel_images, automask=losses.get("automask"))
        self._log_skipped(batch)
        return losses["total"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.nonfinite.end_step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the step of a batch whose loss or gradients hold a NaN/inf before they reach
        Adam's moments: the step's only device-to-host transfer."""
        flags = [] if self._losses_finite is None else [self._losses_finite]
        self._losses_finite = None
        if self.nonfinite.skip_step:
            return
        # 16-bit AMP: the grad scaler skips steps with overflowing gradients itself, by design.
        if not str(self.trainer.precision).startswith("16"):
            grads = [p.grad.detach() for p in self.parameters() if p.grad is not None]
            if grads:
                norms = torch.stack(torch._foreach_norm(grads))  # one kernel per few tensors
                flags.append(torch.isfinite(norms).all())
        if not flags or bool(torch.stack(flags).all()):
            return
        # Under DDP the gradients are already averaged over the ranks: a NaN on any rank is
        # a NaN on all of them, so every rank takes this branch together.
        bad = nonfinite_terms(self._last_losses)
        what, names = ("loss", bad) if bad else ("gradients", ["gradients"])
        self.nonfinite.handle(what, names, self.global_step, self._batch_names)
        for p in self.parameters():
            p.grad = None  # Adam skips parameters without a gradient: its state stays as it was

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # A skipped step must not advance per-step schedules (the warm-up) either; the
        # per-epoch milestones count epochs, which a skipped batch does not change.
        if self.nonfinite.skip_step and self._trainer is not None and any(
                c.scheduler is scheduler and c.interval == "step"
                for c in self.trainer.lr_scheduler_configs):
            return
        super().lr_scheduler_step(scheduler, metric)

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
            panels.log_panel(self, "val/panel", batch, outputs, self.config.num_panel_images,
                             scaled_disp=scaled_disp)

    def on_validation_epoch_end(self) -> None:
        # Without ground truth (video folders) no batch updated the depth metrics: nothing to
        # log, and torchmetrics would warn on every validation. Every DDP rank agrees (all have
        # ground truth or none), so the skipped sync cannot leave a rank waiting.
        metrics = self.val_depth.compute() if self.val_depth.update_count > 0 else {}
        for key, value in metrics.items():
            self.log(f"val/{key}", value.float(), prog_bar=key == "abs_rel")
        if "abs_rel" in metrics:
            # TensorBoard's hparams view ranks runs by hp_metric (its logger's -1 placeholder is
            # off in conf/logger/tensorboard.yaml).
            self.log("hp_metric", metrics["abs_rel"].float())
        if self.has_segmentation and self.val_miou.update_count > 0:
            self.log("val/miou", self.val_miou.compute())
        self.val_depth.reset()
        self.val_miou.reset()

    # -------------------------------------------------------------- optimiser
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The saved weights replace any ImageNet initialisation: rebuilding this module from the
        # checkpoint (load_from_checkpoint) must not look for that file. The run's config.yaml
        # keeps the setting the run was started with.
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, Mapping):
            checkpoint["hyper_parameters"] = without_imagenet_init(hparams)
        # Here, not in a callback: Lightning calls no callback hook for a weights-only save
        # (best-*.ckpt), and every checkpoint must be usable without its run folder.
        if self._trainer is not None:
            describe_training(checkpoint, self._trainer, self.has_segmentation)
            store_run_id(checkpoint, self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resume (Trainer.fit(ckpt_path)) and load_from_checkpoint both pass here before the
        # weights are copied: a checkpoint of another architecture fails naming the keys.
        if "state_dict" in checkpoint:
            check_state_dict_compatible(self, checkpoint["state_dict"])

    def configure_optimizers(self) -> tuple[list[Any], list[dict[str, Any]]]:
        if self.config.optimizer is None or self.config.scheduler is None:
            raise ConfigError("FSREModule was built without model.optimizer or model.scheduler "
                              "(_partial_ configs, conf/model/optimizer and conf/model/"
                              "scheduler): it can predict, not train")
        pose_lr = self.config.optimizer["lr"] * self.config.pose_lr_scale
        groups = [{"params": self.net.parameters()},
                  {"params": self.pose_net.parameters(), "lr": pose_lr}]
        optimizer = hydra.utils.instantiate(self.config.optimizer)(groups)
        warmup_steps = self.config.warmup_steps
        # Both schedulers are chainable, so their factors multiply on the one optimiser.
        schedulers = [{"scheduler": hydra.utils.instantiate(self.config.scheduler)(optimizer),
                       "interval": "epoch"}]
        if warmup_steps > 1:
            # A linear ramp keeps Adam's first, sign-like steps from saturating the disparity
            # sigmoid of a randomly initialised network (it collapses to zero disparity).
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps - 1)
            schedulers.append({"scheduler": warmup, "interval": "step"})
        return [optimizer], schedulers


def without_imagenet_init(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """FSREModule's arguments (or hyper-parameters) with ImageNet initialisation off in both
    networks: for a module whose weights come from a checkpoint anyway."""
    return {key: {**value, "pretrained": False, "weights_path": None}
            if key in ("network", "pose_network") and isinstance(value, Mapping) else value
            for key, value in arguments.items()}
