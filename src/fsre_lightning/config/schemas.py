"""Schemas of the keys that configure what is not ours, and of each command's own keys.

The groups that configure the package's own classes keep their schema beside the class
(`fsre_lightning.config` lists them all). Here:

- `TrainerConfig`: the `trainer` group, the Lightning Trainer arguments a config may set;
- `OPTIMIZERS` and `SCHEDULERS`: `model.optimizer` / `model.scheduler` by `_target_` (torch's
  Adam, AdamW, MultiStepLR, CosineAnnealingLR, instantiated with `_partial_`);
- `PathsConfig` and one schema per entry point (`ENTRIES`) for the top-level keys.

Defaults are those of what each schema configures (Lightning's, torch's); an entry point's
values come from its YAML file, so its schema has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from fsre_lightning.config.checks import (
    check_choice,
    check_int,
    check_number,
    check_path,
    is_int,
    raise_unless,
    require,
)
from fsre_lightning.data.kitti_layout import GT_SOURCES, check_intrinsics
from fsre_lightning.models.network_config import check_image_size
from fsre_lightning.scoring.conventions import PROTOCOLS

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed",
              "bf16", "16-true", "bf16-true")
DEVICES = ("auto", "cpu", "cuda", "mps")  # or cuda:<index>
# train's final_checkpoint: what checkpoints/last.ckpt holds at the end of training.
FINAL_CHECKPOINTS = ("full", "weights", "none")


def _batches(key: str, value: Any, lo: int) -> None:
    """Lightning's batch limits: null, an integer count or a float fraction of an epoch."""
    if value is None:
        return
    fraction = "(0, 1]" if lo == 1 else "[0, 1]"
    require((is_int(value) and value >= lo) or (
        isinstance(value, float) and 0.0 <= value <= 1.0 and (value > 0 or lo == 0)),
        key, value, f"null, an integer >= {lo} (batches) or a float in {fraction} (a fraction "
                    "of an epoch)")


@dataclass(kw_only=True)
class TrainerConfig:
    """The `trainer` group: `pytorch_lightning.Trainer` arguments (logger, callbacks and
    plugins come from the entry point)."""

    _target_: str = "pytorch_lightning.Trainer"
    accelerator: str = "auto"
    strategy: Any = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    default_root_dir: str | None = None

    def __post_init__(self) -> None:
        check_choice("accelerator", self.accelerator, ACCELERATORS)
        devices = self.devices
        require((is_int(devices) and (devices >= 1 or devices == -1))
                or (isinstance(devices, str) and bool(devices))
                or (isinstance(devices, list) and all(is_int(d) for d in devices)),
                "devices", devices, "an integer >= 1, -1 (all), 'auto' or a list of ids")
        check_int("num_nodes", self.num_nodes, lo=1)
        check_choice("precision", self.precision, PRECISIONS, nullable=True)
        check_int("max_epochs", self.max_epochs, lo=-1, nullable=True,
                  what="an integer >= 1, -1 (no limit) or null")
        require(is_int(self.max_steps) and (self.max_steps >= 1 or self.max_steps == -1),
                "max_steps", self.max_steps, "an integer >= 1 or -1 (no limit)")
        for key in ("min_epochs", "min_steps"):
            check_int(key, getattr(self, key), lo=0, nullable=True)
        check_int("log_every_n_steps", self.log_every_n_steps, lo=1, nullable=True)
        check_int("check_val_every_n_epoch", self.check_val_every_n_epoch, lo=1, nullable=True)
        check_int("accumulate_grad_batches", self.accumulate_grad_batches, lo=1)
        check_int("num_sanity_val_steps", self.num_sanity_val_steps, lo=-1, nullable=True)
        check_int("reload_dataloaders_every_n_epochs", self.reload_dataloaders_every_n_epochs,
                  lo=0)
        check_number("gradient_clip_val", self.gradient_clip_val, lo=0, nullable=True)
        check_choice("gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value"),
                     nullable=True)
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                    "limit_predict_batches"):
            _batches(key, getattr(self, key), lo=0)
        _batches("val_check_interval", self.val_check_interval, lo=1)
        check_choice("deterministic", self.deterministic, (True, False, "warn"), nullable=True)
        check_path("default_root_dir", self.default_root_dir, nullable=True)


# --------------------------------------------------------------- optimisers and schedulers
@dataclass(kw_only=True)
class AdamConfig:
    """`model.optimizer` = torch.optim.Adam, built by FSREModule with its parameter groups."""

    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    # One kernel for all of the update (same formula; benchmarks/README.md "Options").
    fused: bool | None = None

    def __post_init__(self) -> None:
        require(self._partial_ is True, "_partial_", self._partial_,
                "true: FSREModule calls the optimiser with its parameter groups")
        check_number("lr", self.lr, lo=0, strict=True)
        check_number("eps", self.eps, lo=0, strict=True)
        check_number("weight_decay", self.weight_decay, lo=0)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                self.betas, "two numbers in [0, 1)")


@dataclass(kw_only=True)
class AdamWConfig(AdamConfig):
    """`model.optimizer` = torch.optim.AdamW (decoupled weight decay)."""

    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 1e-2


@dataclass(kw_only=True)
class _SchedulerConfig:
    _target_: str = MISSING
    _partial_: bool = True

    def __post_init__(self) -> None:
        require(self._partial_ is True, "_partial_", self._partial_,
                "true: FSREModule calls the scheduler with its optimiser")


@dataclass(kw_only=True)
class MultiStepLRConfig(_SchedulerConfig):
    """`model.scheduler` = torch.optim.lr_scheduler.MultiStepLR, stepped once per epoch."""

    _target_: str = "torch.optim.lr_scheduler.MultiStepLR"
    milestones: list[int] = MISSING
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        ms = self.milestones
        require(all(is_int(m) and m > 0 for m in ms) and list(ms) == sorted(ms), "milestones",
                ms, "increasing positive integer epochs, e.g. [10, 15]")
        check_number("gamma", self.gamma, lo=0, hi=1, strict=True)


@dataclass(kw_only=True)
class CosineAnnealingLRConfig(_SchedulerConfig):
    """`model.scheduler` = torch.optim.lr_scheduler.CosineAnnealingLR, stepped once per epoch."""

    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    T_max: int = MISSING
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("T_max", self.T_max, lo=1, what="an integer >= 1: epochs of one cosine "
                                                  "half-period (e.g. trainer.max_epochs)")
        check_number("eta_min", self.eta_min, lo=0)


OPTIMIZERS: dict[str, type] = {c._target_: c for c in (AdamConfig, AdamWConfig)}
SCHEDULERS: dict[str, type] = {c._target_: c for c in (MultiStepLRConfig,
                                                       CosineAnnealingLRConfig)}


# --------------------------------------------------------------------- the entry points
@dataclass(kw_only=True)
class PathsConfig:
    """The `paths` group: where data and runs go (absolute after resolution)."""

    root_dir: str
    data_dir: str
    output_dir: str
    run_dir: str


def _required(key: str, value: Any, example: str) -> None:
    require(value not in (MISSING, None, ""), key, value, f"required: {example}")


@dataclass(kw_only=True)
class _Entry:
    """The config groups an entry holds (each validated by its own schema) and `hydra`."""

    paths: Any = None
    hydra: Any = None


@dataclass(kw_only=True)
class TrainConfig(_Entry):
    """`conf/train.yaml`'s own keys."""

    data: Any = None
    model: Any = None
    loss: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    seed: int = MISSING
    name: str = MISSING
    eval_before: bool = MISSING
    ckpt_path: str | None = MISSING
    init_weights: str | None = MISSING
    summary_path: str | None = MISSING
    effective_batch_size: int | None = MISSING
    final_checkpoint: str = MISSING

    def __post_init__(self) -> None:
        require(isinstance(self.name, str) and bool(self.name), "name", self.name,
                "a non-empty string (the run folder outputs/<name>/...)")
        check_int("effective_batch_size", self.effective_batch_size, lo=1, nullable=True)
        check_choice("final_checkpoint", self.final_checkpoint, FINAL_CHECKPOINTS)
        for key in ("ckpt_path", "init_weights", "summary_path"):
            check_path(key, getattr(self, key), nullable=True)
        # ckpt_path=auto goes with init_weights: a requeued job resumes, the first initialises.
        raise_unless(not (self.init_weights and self.ckpt_path not in (None, "", "auto")),
                     f"init_weights={self.init_weights!r} with ckpt_path={self.ckpt_path!r} is "
                     "not allowed: a resumed run restores its own weights; give init_weights to "
                     "start a fine-tuning run, ckpt_path to resume (ckpt_path=auto: resume when "
                     "there is a run to resume, else init)")


@dataclass(kw_only=True)
class _CheckpointEntry(_Entry):
    """What evaluate, predict and export share: a checkpoint, the network input size (null:
    the training run's) and the device."""

    ckpt_path: str = MISSING
    height: int | None = MISSING
    width: int | None = MISSING
    device: str = MISSING

    def __post_init__(self) -> None:
        _required("ckpt_path", self.ckpt_path, "ckpt_path=<run folder>/checkpoints/last.ckpt")
        for key in ("height", "width"):
            if getattr(self, key) is not None:
                check_image_size(key, getattr(self, key))
        raise_unless((self.height is None) == (self.width is None),
                     f"height={self.height!r} with width={self.width!r} is not allowed: set both "
                     "or neither (null: the training run's resolution)")
        require(isinstance(self.device, str) and (self.device in DEVICES or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())), "device",
            self.device, "auto, cpu, cuda, cuda:<index> or mps")


@dataclass(kw_only=True)
class EvaluateConfig(_CheckpointEntry):
    """`conf/evaluate.yaml`'s own keys."""

    data: Any = None
    post_process: bool = MISSING
    median_scaling: bool = MISSING
    protocol: str = MISSING
    pred_depth_scale_factor: float = MISSING
    semantics_dir: str | None = MISSING
    metrics_path: str | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_number("pred_depth_scale_factor", self.pred_depth_scale_factor, lo=0, strict=True)
        for key in ("semantics_dir", "metrics_path"):
            check_path(key, getattr(self, key), nullable=True)


@dataclass(kw_only=True)
class ExportGtConfig(_Entry):
    """`conf/export_gt.yaml`'s own keys (of `data`, only data.root is read)."""

    data: Any = None
    split: str = MISSING
    split_dir: str = MISSING
    subset: str = MISSING
    output: str | None = MISSING
    progress: bool = MISSING
    source: str = MISSING
    annotated_dir: str | None = MISSING

    def __post_init__(self) -> None:
        check_path("split_dir", self.split_dir)
        check_choice("subset", self.subset, ("test", "val"))
        check_path("output", self.output, nullable=True)
        check_choice("source", self.source, GT_SOURCES)
        check_path("annotated_dir", self.annotated_dir, nullable=True)
        # Whether annotated_dir is read depends on split_dir's resolved name: `layout.gt_source`
        # checks that when the command runs.


@dataclass(kw_only=True)
class PredictConfig(_CheckpointEntry):
    """`conf/predict.yaml`'s own keys."""

    input: str = MISSING
    output: str = MISSING
    resolution: str = MISSING
    batch_size: int = MISSING
    segmentation: bool = MISSING
    overlay: bool = MISSING
    side_by_side: bool = MISSING
    fps: float | None = MISSING
    save_arrays: bool = MISSING
    scale_factor: float | None = MISSING
    camera_height: float | None = MISSING
    intrinsics: list[float] | None = MISSING
    progress: bool = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _required("input", self.input, "input=<image|folder|video> (and output=<folder>)")
        check_path("output", self.output)
        check_choice("resolution", self.resolution, ("input", "network"))
        check_int("batch_size", self.batch_size, lo=1)
        for key in ("fps", "scale_factor", "camera_height"):
            check_number(key, getattr(self, key), lo=0, strict=True, nullable=True)
        raise_unless(self.scale_factor is None or self.camera_height is None,
                     f"scale_factor={self.scale_factor!r} with camera_height="
                     f"{self.camera_height!r} is not allowed: give one of them (or neither)")
        if self.intrinsics is not None:
            check_intrinsics("intrinsics", self.intrinsics)


@dataclass(kw_only=True)
class ExportConfig(_CheckpointEntry):
    """`conf/export.yaml`'s own keys."""

    format: str = MISSING
    output: str | None = MISSING
    segmentation: bool = MISSING
    opset: int = MISSING
    tolerance: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("format", self.format, ("onnx", "torchscript"))
        check_path("output", self.output, nullable=True)
        check_int("opset", self.opset, lo=7)
        check_number("tolerance", self.tolerance, lo=0, strict=True)


@dataclass(kw_only=True)
class EvaluatePoseConfig(_CheckpointEntry):
    """`conf/evaluate_pose.yaml`'s own keys."""

    odom_root: str = MISSING
    sequences: Any = MISSING  # a list, or one number (`sequences=9`)
    batch_size: int = MISSING
    metrics_path: str | None = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _required("odom_root", self.odom_root, "odom_root=<KITTI odometry folder holding "
                                               "sequences/ and poses/>")
        seqs = as_sequences(self.sequences)
        require(len(seqs) > 0 and all(is_int(s) and 0 <= s <= 99 for s in seqs)
                and len(set(seqs)) == len(seqs), "sequences", seqs,
                "a non-empty list of distinct sequence numbers 0-99, e.g. [9, 10] (KITTI's "
                "ground truth covers 0-10)")
        check_int("batch_size", self.batch_size, lo=1)
        check_path("metrics_path", self.metrics_path, nullable=True)


@dataclass(kw_only=True)
class PrepareKittiConfig(_Entry):
    """`conf/prepare_kitti.yaml`'s own keys (data.root, data.split_dir and data.prepare say
    what is prepared)."""

    data: Any = None
    dry_run: bool = MISSING
    progress: bool = MISSING


def as_sequences(value: Any) -> list[Any]:
    """`evaluate_pose`'s sequences as a list: `sequences=9` is the one sequence 9."""
    return list(value) if isinstance(value, list | tuple) or (
        hasattr(value, "__iter__") and not isinstance(value, str | bytes)) else [value]


ENTRIES: dict[str, type] = {"train": TrainConfig, "evaluate": EvaluateConfig,
                            "export_gt": ExportGtConfig, "predict": PredictConfig,
                            "export": ExportConfig, "evaluate_pose": EvaluatePoseConfig,
                            "prepare_kitti": PrepareKittiConfig}
