"""The config schemas: each rule in one place, the same message from a config and from Python."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from fsre_lightning.config import validate_config
from fsre_lightning.config.schemas import OPTIMIZERS, SCHEDULERS, TrainerConfig
from fsre_lightning.data.kitti import KittiDataConfig, KittiDataModule
from fsre_lightning.data.synthetic import SyntheticConfig, generate_synthetic_kitti
from fsre_lightning.data.video_folder import VideoFolderDataConfig, VideoFolderDataModule
from fsre_lightning.errors import ConfigError
from fsre_lightning.losses import sgt_loss
from fsre_lightning.models import FSRENetwork, NetworkConfig, PoseNetwork, PoseNetworkConfig
from fsre_lightning.module import FSREModule, ModelConfig
from fsre_lightning.objective import LossConfig


@pytest.mark.parametrize(
    ("overrides", "key", "value", "fragment"),
    [
        ("data.height=100", "data.height", 100, "multiple of 32"),
        ("data.width=650", "data.width", 650, "multiple of 32"),
        ("loss.sgt_kernel_size=4", "loss.sgt_kernel_size", 4, "odd"),
        ("loss.sgt_kernel_size=1", "loss.sgt_kernel_size", 1, "odd"),
        ("model.network.num_heads=0", "model.network.num_heads", 0, ">= 1"),
        ("model.network.cma_scales=[5]", "model.network.cma_scales", [5], "0..4"),
        ("loss.sgt_scales=[-1]", "loss.sgt_scales", [-1], "0..4"),
        ("model.network.cma_targets=[normals]", "model.network.cma_targets", ["normals"],
         "subset"),
        ("model.network.attention_scale=sqrt", "model.network.attention_scale", "sqrt",
         "paper"),
        ("loss.sgt_margin=-0.1", "loss.sgt_margin", -0.1, ">= 0"),
        ("loss.sgt_threshold=25", "loss.sgt_threshold", 25, "1..24"),
        ("data.frame_ids=[-1,0,1]", "data.frame_ids", [-1, 0, 1], "frame 0 first"),
        ("model.optimizer.lr=0.0", "model.optimizer.lr", 0.0, "> 0"),
        ("model.scheduler.milestones=[15,10]", "model.scheduler.milestones", [15, 10],
         "increasing"),
        ("model.warmup_steps=-5", "model.warmup_steps", -5, ">= 0"),
        ("model.pose_lr_scale=0.0", "model.pose_lr_scale", 0.0, "> 0"),
        ("model.optimizer.fused=yes", "model.optimizer.fused", "yes", "true or false"),
        ("model.compile_loss=1", "model.compile_loss", 1, "true or false"),
        ("model.compile=everything", "model.compile", "everything", "'step'"),
        ("model.compile=1", "model.compile", 1, "'networks'"),
        ("model.compile_mode=fastest", "model.compile_mode", "fastest", "reduce-overhead"),
        ("data.batch_size=two", "data.batch_size", "two", "an integer"),
        ("data.frame_ids=[0,a,1]", "data.frame_ids", [0, "a", 1], "a list of integers"),
        ("data.synthetic.num_drives=2", "data.synthetic.num_drives", 2, ">= 3"),
    ],
)
def test_bad_values_name_key_value_and_rule(compose: Any, overrides: str, key: str, value: Any,
                                            fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(compose("train", overrides), "train")
    message = str(err.value)
    assert f"{key}={value!r} is not allowed" in message and fragment in message, message
    assert err.value.key == key and "\n" not in message


def test_unknown_keys_list_what_is_allowed(compose: Any) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(compose("train", "+model.network.heads=2"), "train")
    message = str(err.value)
    assert message.startswith("model.network.heads is not a known key")
    assert "'num_heads'" in message and "'cma_scales'" in message


def test_gpu_fast_preset_sets_the_gpu_options_and_validates(compose: Any) -> None:
    cfg = compose("train", "trainer=gpu_fast")
    validate_config(cfg, "train")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.channels_last is True and cfg.model.compile == "step"
    assert cfg.model.compile_mode == "reduce-overhead"
    assert cfg.trainer.max_epochs == compose("train", "trainer=gpu").trainer.max_epochs
    # An experiment composed after it still sets its own model keys.
    demo = compose("train", "trainer=gpu_fast +experiment=demo")
    assert demo.model.network.pretrained == "auto" and demo.model.compile == "step"


def test_margin_zero_is_the_end_of_the_papers_sweep(compose: Any) -> None:
    """m = 0 is allowed by the config and by the loss function: one rule, one verdict."""
    validate_config(compose("train", "loss.sgt_margin=0"), "train")
    features, labels = torch.randn(1, 4, 6, 6), torch.randint(0, 2, (1, 6, 6))
    assert float(sgt_loss(features, labels, margin=0.0)) >= 0
    with pytest.raises(ConfigError, match=r"margin=-0\.1 is not allowed"):
        sgt_loss(features, labels, margin=-0.1)


def test_segmentation_free_model_rejects_semantic_terms(compose: Any) -> None:
    with pytest.raises(ConfigError, match=r"model\.network\.cma_scales"):
        validate_config(compose("train", "model.network.segmentation=false"), "train")
    cfg = compose("train", "model.network.segmentation=false model.network.cma_scales=[]")
    with pytest.raises(ConfigError, match=r"loss\.segmentation_weight"):
        validate_config(cfg, "train")
    validate_config(compose("train", "model=monodepth2"), "train")


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: FSRENetwork(num_heads=0), "num_heads"),
        (lambda: FSRENetwork(cma_scales=(5,)), "cma_scales"),
        (lambda: PoseNetwork(init_translation=(0.0, 1.0)), "init_translation"),
        (lambda: KittiDataModule("root", "splits", height=100), "height"),
        (lambda: VideoFolderDataModule(root="videos"), "intrinsics"),
        (lambda: generate_synthetic_kitti("x", num_drives=2), "num_drives"),
        (lambda: LossConfig(sgt_kernel_size=4), "sgt_kernel_size"),
        (lambda: FSREModule(network={"_target_": "fsre_lightning.models.FSRENetwork"},
                            pose_network={"_target_": "fsre_lightning.models.PoseNetwork"},
                            nonfinite="ignore"), "nonfinite"),
    ],
)
def test_direct_calls_meet_the_same_rules(build: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.key == key and f"{key}=" in str(err.value)


def _defaults(fn: Any, skip: set[str]) -> dict[str, Any]:
    """A callable's keyword arguments and their defaults (tuples as lists, as in a config)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
            for p in params if p.name not in skip and p.kind is not p.VAR_KEYWORD}


def _schema_defaults(schema: type, skip: set[str]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        if f.default is not dataclasses.MISSING and f.default != "???":  # OmegaConf's MISSING
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = inspect.Parameter.empty
    return out


@pytest.mark.parametrize(
    ("schema", "target", "own"),
    [
        (NetworkConfig, FSRENetwork, set()),
        (PoseNetworkConfig, PoseNetwork, set()),
        (SyntheticConfig, generate_synthetic_kitti, {"root"}),
    ],
)
def test_schema_mirrors_the_signature_it_configures(schema: type, target: Any,
                                                     own: set[str]) -> None:
    """The networks (timm-style explicit arguments): every argument is a schema key with the
    same default, and nothing else is."""
    skip = {"_target_"}
    expected = _defaults(target, own)
    got = _schema_defaults(schema, skip)
    assert set(got) == set(expected)
    assert {k: v for k, v in got.items() if v is not inspect.Parameter.empty} == {
        k: v for k, v in expected.items() if got[k] is not inspect.Parameter.empty}


def test_the_large_constructors_take_their_config_and_write_no_default_twice(
        tmp_path: Path) -> None:
    """KittiDataModule, VideoFolderDataModule and FSREModule name only what is not a field of
    their config (paths, the networks, what the data gives the model); every other option is
    a keyword checked and defaulted by the config dataclass, which they keep as `config`."""
    assert list(inspect.signature(KittiDataModule).parameters) == ["root", "split_dir",
                                                                  "options"]
    assert list(inspect.signature(VideoFolderDataModule).parameters) == ["root", "options"]
    assert set(inspect.signature(FSREModule).parameters) == {
        "network", "pose_network", "loss", "optimizer", "scheduler", "frame_ids", "eval_crop",
        "min_depth_eval", "max_depth_eval", "options"}
    data = KittiDataModule(tmp_path, tmp_path / "splits", batch_size=3)
    assert data.config == KittiDataConfig(root=str(tmp_path),
                                          split_dir=str(tmp_path / "splits"), batch_size=3)
    with pytest.raises(ConfigError, match=r"batch_size=0 is not allowed"):
        KittiDataModule(tmp_path, tmp_path, batch_size=0)
    with pytest.raises(TypeError, match="batchsize"):
        KittiDataModule(tmp_path, tmp_path, batchsize=3)
    net = {"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
           "segmentation": False, "cma_scales": []}
    pose = {"_target_": "fsre_lightning.models.PoseNetwork", "encoder": "test_resnet"}
    module = FSREModule(net, pose, nonfinite="stop")
    defaults = {k: v for k, v in _schema_defaults(ModelConfig, {"_target_"}).items()
                if v is not inspect.Parameter.empty}
    assert {k: getattr(module.config, k) for k in defaults} == {**defaults, "nonfinite": "stop"}
    assert {k: module.hparams[k] for k in defaults} == {**defaults, "nonfinite": "stop"}
    with pytest.raises(ConfigError, match="pose_lr_scale"):
        FSREModule(net, pose, pose_lr_scale=0)
    # A checkpoint of before the move (pose_lr_scale, warmup_steps in the optimiser and
    # scheduler arguments) builds the same module.
    old = FSREModule(net, pose, optimizer={"_target_": "torch.optim.Adam", "_partial_": True,
                                           "lr": 1e-4, "pose_lr_scale": 5.0},
                     scheduler={"_target_": "torch.optim.lr_scheduler.MultiStepLR",
                                "_partial_": True, "milestones": [2], "warmup_steps": 3})
    assert (old.config.pose_lr_scale, old.config.warmup_steps) == (5.0, 3)
    assert "pose_lr_scale" not in old.config.optimizer


@pytest.mark.parametrize(("override", "old", "new"), [
    ("++model.optimizer.pose_lr_scale=2", "model.optimizer.pose_lr_scale", "model.pose_lr_scale"),
    ("++model.scheduler.warmup_steps=10", "model.scheduler.warmup_steps", "model.warmup_steps"),
    ("++model.frame_ids=[0,-1,1]", "model.frame_ids", "data.frame_ids"),
])
def test_a_moved_key_is_refused_naming_its_new_place(compose: Any, override: str, old: str,
                                                     new: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(compose("train", [override]), "train")
    message = str(err.value)
    assert message.startswith(f"{old} is not allowed: it is now {new}")
    assert "\n" not in message


def test_video_folder_schema_extends_the_kitti_keys() -> None:
    kitti = {f.name for f in dataclasses.fields(KittiDataConfig)}
    video = {f.name for f in dataclasses.fields(VideoFolderDataConfig)}
    assert kitti < video
    assert video - kitti == {"work_dir", "intrinsics_units", "val_fraction", "split_seed",
                             "pseudo_label_model", "pseudo_label_device",
                             "pseudo_label_batch_size"}


def test_third_party_schemas_name_real_arguments_with_their_defaults() -> None:
    trainer = inspect.signature(pl.Trainer).parameters
    for f in dataclasses.fields(TrainerConfig):
        if f.name != "_target_":
            assert f.name in trainer and _schema_defaults(TrainerConfig, set())[f.name] == \
                trainer[f.name].default, f.name
    ours = {"_target_", "_partial_"}
    for registry, first in ((OPTIMIZERS, "params"), (SCHEDULERS, "optimizer")):
        for target, schema in registry.items():
            module, _, name = target.rpartition(".")
            params = inspect.signature(getattr(__import__(module, fromlist=[name]),
                                               name)).parameters
            for key, default in _schema_defaults(schema, ours).items():
                assert key in params and key != first, (target, key)
                if default is not inspect.Parameter.empty:
                    torch_default = params[key].default
                    assert default == (list(torch_default) if isinstance(torch_default, tuple)
                                       else torch_default), (target, key)


@pytest.mark.parametrize(("argv", "expected"), [
    (["+experiment=smoke", "loss.sgt_margn=0.3"],
     "loss.sgt_margn is not a known key: did you mean loss.sgt_margin"),
    (["--multirun", "+experiment=smoke", "--cfg", "job"], "--multirun and --cfg together"),
    (["data=kiti"], "data=kiti is not a config of group data: did you mean data=kitti?"),
    (["model.optimizer.lr=1e-4,"], "cannot parse the override 'model.optimizer.lr=1e-4,'"),
    (["model=monodepth2", "loss.sgt_weight=0.1", "--cfg", "job"],
     "loss.sgt_weight=0.1 is not allowed: model=monodepth2 has no segmentation decoder"),
])
def test_command_line_mistakes_are_one_line_with_exit_2(argv: list[str], expected: str,
                                                        capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hydra's own reports (six lines and exit 1, a traceback for --multirun --cfg) and advice
    that named the model the user had chosen became one line naming what to change."""
    from fsre_lightning import train

    monkeypatch.setenv("FSRE_OUTPUT_DIR", str(tmp_path))
    assert train.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("fsre_lightning.train: error: ")
    assert expected in lines[0] and not out


def test_one_pose_sequence_is_a_number(compose: Any) -> None:
    from fsre_lightning.config.schemas import as_sequences

    cfg = compose("evaluate_pose", ["ckpt_path=a.ckpt", "odom_root=o", "sequences=9"])
    validate_config(cfg, "evaluate_pose")
    assert as_sequences(cfg.sequences) == [9]
    assert as_sequences(compose("evaluate_pose", ["ckpt_path=a.ckpt", "odom_root=o"]).sequences
                        ) == [9, 10]


def test_an_experiment_on_another_command_says_why_not(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate +experiment=smoke` failed on `effective_batch_size is not a known key`, a key
    the user never typed."""
    from fsre_lightning import evaluate

    monkeypatch.setenv("FSRE_OUTPUT_DIR", str(tmp_path))
    assert evaluate.main(["ckpt_path=x.ckpt", "+experiment=smoke"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fsre_lightning.evaluate: error: +experiment=smoke configures "
                           "training runs (fsre-train), not evaluate: it takes the data config "
                           "the checkpoint was trained with")
