import pytest
from omegaconf import OmegaConf

from fsre_lightning.config import ConfigError, validate_config


def _cfg(**overrides):
    base = {
        "data": {"height": 64, "width": 192, "frame_ids": [0, -1, 1], "batch_size": 2,
                 "num_workers": 0},
        "model": {
            "network": {"cma_scales": [4, 3, 2], "disp_scales": [0, 1, 2, 3], "num_heads": 4,
                        "head_ratio": 2.0, "cma_targets": ["depth", "seg"],
                        "attention_scale": "paper", "segmentation": True},
            "optimizer": {"lr": 1.5e-4},
            "scheduler": {"milestones": [10, 15]},
        },
        "loss": {"sgt_kernel_size": 5, "sgt_scales": [3, 2, 1], "sgt_margin": 0.3,
                 "sgt_threshold": None, "segmentation_weight": 0.3, "alpha": 0.85},
    }
    cfg = OmegaConf.create(base)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_paper_defaults_pass() -> None:
    validate_config(_cfg())


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("data.height", 100, "multiple of 32"),
        ("data.width", 650, "multiple of 32"),
        ("loss.sgt_kernel_size", 4, "odd"),
        ("loss.sgt_kernel_size", 1, "odd"),
        ("model.network.num_heads", 0, ">= 1"),
        ("model.network.cma_scales", [5], "0..4"),
        ("loss.sgt_scales", [-1], "0..4"),
        ("model.network.cma_targets", ["normals"], "subset"),
        ("model.network.attention_scale", "sqrt", "paper"),
        ("loss.sgt_margin", -0.1, "> 0"),
        ("loss.sgt_margin", 0.0, "> 0"),
        ("loss.sgt_threshold", 25, "1..24"),
        ("data.frame_ids", [-1, 0, 1], "frame 0 first"),
        ("model.optimizer.lr", 0.0, "> 0"),
        ("model.scheduler.milestones", [15, 10], "increasing"),
        ("model.scheduler.warmup_steps", -5, ">= 0"),
        ("model.optimizer.pose_lr_scale", 0.0, "> 0"),
        ("model.optimizer.fused", "yes", "true or false"),
        ("model.compile_loss", 1, "true or false"),
    ],
)
def test_bad_values_name_key_and_value(key: str, value, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(**{key: value}))
    message = str(err.value)
    assert key in message and repr(value) in message and fragment in message


def test_segmentation_free_model_rejects_semantic_terms() -> None:
    cfg = _cfg(**{"model.network.segmentation": False})
    with pytest.raises(ConfigError, match=r"model\.network\.cma_scales"):
        validate_config(cfg)
    cfg = _cfg(**{"model.network.segmentation": False, "model.network.cma_scales": []})
    with pytest.raises(ConfigError, match=r"loss\.segmentation_weight"):
        validate_config(cfg)
    OmegaConf.update(cfg, "loss.segmentation_weight", 0.0)
    validate_config(cfg)
