"""Fuzz-style: invalid overrides through the real Hydra composition fail in validate_config.

Validation only: nothing here builds data or a model. Each case is (override(s), the key the
error must name). Hydra accepts all of these overrides (it does not type-check, and `+` adds
keys), so only `validate_config` stands between them and a failed or silently wrong run.
"""

from __future__ import annotations

from typing import Any

import pytest

from fsre_lightning.config import validate_config
from fsre_lightning.errors import ConfigError

TRAIN_CASES: list[tuple[str, str]] = [
    # types
    ("data.batch_size=two", "data.batch_size"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("data.batch_size=true", "data.batch_size"),
    ("data.num_workers=1.0", "data.num_workers"),
    ("data.height=64.0", "data.height"),
    ("data.width=abc", "data.width"),
    ("data.frame_ids=[0,a,1]", "data.frame_ids"),
    ("data.frame_cache=yes", "data.frame_cache"),
    ("data.use_labels=1", "data.use_labels"),
    ("model.optimizer.lr=fast", "model.optimizer.lr"),
    ("model.scheduler.milestones=[1.5]", "model.scheduler.milestones"),
    ("model.warmup_steps=2.5", "model.warmup_steps"),
    ("model.network.num_heads=2.0", "model.network.num_heads"),
    ("model.network.segmentation=maybe", "model.network.segmentation"),
    ("model.network.cma_scales=3", "model.network.cma_scales"),
    ("loss.sgt_kernel_size=5.0", "loss.sgt_kernel_size"),
    ("loss.automask=1", "loss.automask"),
    ("loss.alpha=high", "loss.alpha"),
    ("trainer.max_steps=10.5", "trainer.max_steps"),
    ("trainer.log_every_n_steps=ten", "trainer.log_every_n_steps"),
    ("seed=abc", "seed"),
    ("eval_before=maybe", "eval_before"),
    # ranges and choices
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.height=100", "data.height"),
    ("data.width=0", "data.width"),
    ("data.frame_ids=[-1,0,1]", "data.frame_ids"),
    ("data.frame_ids=[0]", "data.frame_ids"),
    ("data.frame_ids=[0,1,1]", "data.frame_ids"),
    ("data.flip_prob=1.5", "data.flip_prob"),
    ("data.hue=0.7", "data.hue"),
    ("data.on_error=ignore", "data.on_error"),
    ("data.eval_on_error=maybe", "data.eval_on_error"),
    ("data.img_ext=bmp", "data.img_ext"),
    ("data.label_format=ids", "data.label_format"),
    ("data.eval_crop=eigen", "data.eval_crop"),
    ("data.min_depth_eval=0", "data.min_depth_eval"),
    ("data.max_depth_eval=0.0001", "data.max_depth_eval"),
    ("data.intrinsics=[0.58,1.92,0.5]", "data.intrinsics"),
    ("data.cache_workers=-2", "data.cache_workers"),
    ("model.optimizer.lr=0", "model.optimizer.lr"),
    ("model.optimizer.lr=-1e-4", "model.optimizer.lr"),
    ("model.pose_lr_scale=0", "model.pose_lr_scale"),
    ("model.scheduler.milestones=[15,10]", "model.scheduler.milestones"),
    ("model.scheduler.gamma=0", "model.scheduler.gamma"),
    ("model.network.num_heads=0", "model.network.num_heads"),
    ("model.network.head_ratio=0", "model.network.head_ratio"),
    ("model.network.cma_scales=[5]", "model.network.cma_scales"),
    ("model.network.disp_scales=[]", "model.network.disp_scales"),
    ("model.network.attention_scale=sqrt", "model.network.attention_scale"),
    ("model.network.cma_targets=[normals]", "model.network.cma_targets"),
    ("model.network.pretrained=maybe", "model.network.pretrained"),
    ("model.nonfinite=ignore", "model.nonfinite"),
    ("model.nonfinite_max_consecutive=0", "model.nonfinite_max_consecutive"),
    ("model.image_log_every_n_steps=-1", "model.image_log_every_n_steps"),
    ("++model.frame_ids=[0,-1]", "model.frame_ids"),
    ("loss.sgt_kernel_size=4", "loss.sgt_kernel_size"),
    ("loss.sgt_kernel_size=1", "loss.sgt_kernel_size"),
    ("loss.sgt_margin=-0.3", "loss.sgt_margin"),
    ("loss.sgt_scales=[0,5]", "loss.sgt_scales"),
    ("loss.sgt_threshold=25", "loss.sgt_threshold"),
    ("loss.alpha=1.5", "loss.alpha"),
    ("loss.smoothness_weight=-1", "loss.smoothness_weight"),
    ("loss.scale_weighting=mean", "loss.scale_weighting"),
    ("loss.min_depth=0", "loss.min_depth"),
    ("loss.max_depth=0.05", "loss.min_depth"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.max_epochs=-2", "trainer.max_epochs"),
    ("trainer.precision=8", "trainer.precision"),
    ("trainer.precision=fp16", "trainer.precision"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps"),
    ("trainer.accelerator=quantum", "trainer.accelerator"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches"),
    ("trainer.val_check_interval=0.0", "trainer.val_check_interval"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("trainer.devices=0", "trainer.devices"),
    ("model=monodepth2 loss.segmentation_weight=0.3", "loss.segmentation_weight"),
    # unknown keys, added with + (Hydra itself only rejects them without +)
    ("+data.batchsize=4", "data.batchsize"),
    ("+model.lr=1e-3", "model.lr"),
    ("+loss.sgt_weigth=0.2", "loss.sgt_weigth"),
    ("+trainer.max_step=10", "trainer.max_step"),
    ("+model.network.heads=2", "model.network.heads"),
    ("+model.pose_network.layers=18", "model.pose_network.layers"),
    ("model.pose_network.init_translation=[0,1]", "model.pose_network.init_translation"),
    ("model.pose_network.init_translation=[0,0,fast]", "model.pose_network.init_translation"),
    ("+model.optimizer.momentum=0.9", "model.optimizer.momentum"),
    ("+model.scheduler.step_size=5", "model.scheduler.step_size"),
    ("++data.synthetic.num_drive=3", "data.synthetic.num_drive"),
    ("+callbacks.last_checkpoint.every_n_steps=5", "callbacks.last_checkpoint.every_n_steps"),
    ("+foo=1", "foo"),
    ("+nonfinite=stop", "nonfinite"),
    # the optimiser and scheduler groups, by their _target_
    ("model/optimizer=adamw model.optimizer.weight_decay=-1", "model.optimizer.weight_decay"),
    ("model/optimizer=adamw +model.optimizer.momentum=0.9", "model.optimizer.momentum"),
    ("+model.optimizer.betas=[0.9]", "model.optimizer.betas"),
    ("model.optimizer.fused=yes", "model.optimizer.fused"),
    ("model/scheduler=cosine trainer.max_epochs=null", "model.scheduler.T_max"),
    ("model/scheduler=cosine model.scheduler.eta_min=-1", "model.scheduler.eta_min"),
    ("model/scheduler=cosine +model.scheduler.milestones=[1]", "model.scheduler.milestones"),
    ("model.scheduler._partial_=false", "model.scheduler._partial_"),
    ("++model.optimizer._target_=torch.optim.SGD +model.optimizer.nesterov_=true",
     "model.optimizer.nesterov_"),
    # paths, data.synthetic, nested networks, cross-group rules
    ("+paths.cache=/tmp", "paths.cache"),
    ("data.synthetic.num_drives=2", "data.synthetic.num_drives"),
    ("data.synthetic.height=tall", "data.synthetic.height"),
    ("model.network.encoder=null", "model.network.encoder"),
    ("model.pose_network.pretrained=sometimes", "model.pose_network.pretrained"),
    ("model.network.cma_targets=[depth,depth]", "model.network.cma_targets"),
    ("data.use_labels=false", "data.use_labels"),
    ("effective_batch_size=5 trainer=ddp_cpu", "effective_batch_size"),
    ("init_weights=a.ckpt ckpt_path=b.ckpt", "init_weights"),
    ("+trainer.gradient_clip_algorithm=clip", "trainer.gradient_clip_algorithm"),
    ("+trainer.deterministic=maybe", "trainer.deterministic"),
    ("data=video_folder", "data.root"),
    ("data=video_folder data.root=/x data.intrinsics=[1,1,0.5,0.5] data.val_fraction=1",
     "data.val_fraction"),
    ("data=video_folder data.root=/x data.intrinsics=[1,1,0.5,0.5] +data.fps=10", "data.fps"),
    ("+callbacks.lr_monitor.interval=step", "callbacks.lr_monitor.interval"),
    ("logger=csv +logger.csv.dir=x", "logger.csv.dir"),
]

EVALUATE_CASES: list[tuple[str, str]] = [
    ("height=100", "height"),
    ("width=12.5", "width"),
    ("post_process=maybe", "post_process"),
    ("median_scaling=0", "median_scaling"),
    ("device=gpu", "device"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.eval_on_error=ignore", "data.eval_on_error"),
    ("+data.split=eigen", "data.split"),
    ("+foo=1", "foo"),
]

PREDICT_CASES: list[tuple[str, str]] = [
    ("input=???", "input"),
    ("batch_size=0", "batch_size"),
    ("resolution=native", "resolution"),
    ("scale_factor=2 camera_height=1.65", "scale_factor"),
    ("camera_height=-1", "camera_height"),
    ("intrinsics=[0.58,1.92]", "intrinsics"),
    ("overlay=1", "overlay"),
    ("height=96", "height"),
    ("+data.height=96", "data"),
]

EXPORT_CASES: list[tuple[str, str]] = [
    ("format=tflite", "format"),
    ("opset=5", "opset"),
    ("tolerance=0", "tolerance"),
    ("device=tpu", "device"),
    ("+batch=2", "batch"),
]

EXPORT_GT_CASES: list[tuple[str, str]] = [
    ("subset=train", "subset"),
    ("progress=2", "progress"),
    ("+data.rooot=/data", "data.rooot"),
    ("+bar=1", "bar"),
    ("source=lidar", "source"),
    ("source=null", "source"),
    ("annotated_dir=''", "annotated_dir"),
    ("annotated_dir=[a]", "annotated_dir"),
]


def _fails_naming(compose: Any, entry: str, overrides: str, key: str) -> None:
    cfg = compose(entry, overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, entry)
    message = str(err.value)
    assert key in message, message
    # The value (for a bad value) or the allowed keys (for an unknown key) are named too.
    assert "is not allowed" in message or "allowed keys" in message, message
    assert "\n" not in message, message  # one line, as the command prints it


# The inner loop (make test-fast) runs one type, one range and one unknown-key case of each
# group; make test runs them all (each case is a Hydra composition, ~0.2 s).
FAST = {
    "data.batch_size=two", "data.height=100", "+data.batchsize=4",
    "model.optimizer.lr=fast", "model.scheduler.milestones=[15,10]", "+model.lr=1e-3",
    "model.network.num_heads=2.0", "model.network.cma_scales=[5]", "+model.network.heads=2",
    "model.pose_network.init_translation=[0,1]", "+model.pose_network.layers=18",
    "loss.sgt_kernel_size=5.0", "loss.sgt_kernel_size=4", "+loss.sgt_weigth=0.2",
    "trainer.max_steps=10.5", "trainer.precision=fp16", "+trainer.max_step=10",
    "model/optimizer=adamw +model.optimizer.momentum=0.9", "model.optimizer.fused=yes",
    "model/scheduler=cosine trainer.max_epochs=null", "++data.synthetic.num_drive=3",
    "+paths.cache=/tmp", "+callbacks.last_checkpoint.every_n_steps=5", "+foo=1", "seed=abc",
    "model=monodepth2 loss.segmentation_weight=0.3", "++model.frame_ids=[0,-1]",
    "data=video_folder", "init_weights=a.ckpt ckpt_path=b.ckpt",
    "height=100", "device=gpu", "+data.split=eigen", "input=???", "format=tflite",
    "scale_factor=2 camera_height=1.65", "subset=train", "+data.rooot=/data",
    "source=lidar",
}


def _cases(cases: list[tuple[str, str]]) -> list[Any]:
    return [pytest.param(o, k, marks=() if o in FAST else pytest.mark.slow) for o, k in cases]


def test_enough_cases() -> None:
    every = [o for cases in (TRAIN_CASES, EVALUATE_CASES, PREDICT_CASES, EXPORT_CASES,
                             EXPORT_GT_CASES) for o, _ in cases]
    assert len(every) >= 100 and set(every) >= FAST


@pytest.mark.parametrize(("overrides", "key"), _cases(TRAIN_CASES))
def test_invalid_train_override_is_rejected(compose: Any, overrides: str, key: str) -> None:
    _fails_naming(compose, "train", overrides, key)


@pytest.mark.parametrize(("overrides", "key"), _cases(EVALUATE_CASES))
def test_invalid_evaluate_override_is_rejected(compose: Any, overrides: str, key: str) -> None:
    _fails_naming(compose, "evaluate", f"ckpt_path=x.ckpt {overrides}", key)


@pytest.mark.parametrize(("overrides", "key"), _cases(PREDICT_CASES))
def test_invalid_predict_override_is_rejected(compose: Any, overrides: str, key: str) -> None:
    _fails_naming(compose, "predict", f"ckpt_path=x.ckpt input=in.png {overrides}", key)


@pytest.mark.parametrize(("overrides", "key"), _cases(EXPORT_CASES))
def test_invalid_export_override_is_rejected(compose: Any, overrides: str, key: str) -> None:
    _fails_naming(compose, "export", f"ckpt_path=x.ckpt {overrides}", key)


@pytest.mark.parametrize(("overrides", "key"), _cases(EXPORT_GT_CASES))
def test_invalid_export_gt_override_is_rejected(compose: Any, overrides: str, key: str) -> None:
    _fails_naming(compose, "export_gt", overrides, key)


@pytest.mark.parametrize(
    ("entry", "overrides"),
    [("train", ""), ("train", "+experiment=demo"), ("train", "model=monodepth2 data=kitti"),
     ("train", "trainer=ddp logger=tensorboard data.on_error=raise model.nonfinite=stop"),
     ("train", "trainer.precision=bf16-mixed trainer.limit_val_batches=0.5 "
               "trainer.val_check_interval=100 trainer.max_epochs=null"),
     ("train", "loss.sgt_margin=0"),  # the end point of the paper's margin sweep
     ("train", "model/optimizer=adamw model/scheduler=cosine"),
     ("train", "data=video_folder data.root=/x data.intrinsics=[910,910,640,360] "
               "data.intrinsics_units=pixels"),
     ("evaluate", "ckpt_path=x.ckpt height=96 width=320 device=cuda:1"),
     ("predict", "ckpt_path=x.ckpt input=in.png camera_height=1.65 intrinsics=[1,1,0.5,0.5]"),
     ("export", "ckpt_path=x.ckpt format=torchscript height=64 width=192"),
     ("export_gt", "subset=val"),
     ("export_gt", "split=eigen_benchmark annotated_dir=/data/depth_annotated"),
     ("export_gt", "source=annotated annotated_dir=/data/depth_annotated subset=val")],
)
def test_valid_configs_pass(compose: Any, entry: str, overrides: str) -> None:
    validate_config(compose(entry, overrides), entry)


def test_train_run_validates_before_any_work(compose: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import hydra

    from fsre_lightning import train, training

    def no_work(*args: Any, **kwargs: Any) -> None:
        pytest.fail("instantiated something before the config was validated")

    monkeypatch.setattr(hydra.utils, "instantiate", no_work)
    monkeypatch.setattr(training.pl, "seed_everything", no_work)
    cfg = compose("train", "+data.batchsize=4")
    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        train.run(cfg)
