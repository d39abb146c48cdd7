"""Config validation: every entry point calls `validate_config` before any work starts.

Errors name the key, the value and what is allowed, so a typo in a sweep fails in the first
second with a message instead of hours later with a shape error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

NUM_SCALES = 5  # decoder blocks s = 0..4 (SPEC section 1)


class ConfigError(ValueError):
    """A config value outside its allowed range."""


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_scales(key: str, value: Any, allow_empty: bool = True) -> None:
    scales = list(value) if value is not None else []
    _check(allow_empty or bool(scales), key, value, "give at least one scale")
    _check(
        all(isinstance(s, int) and 0 <= s < NUM_SCALES for s in scales),
        key, value, f"decoder scales are integers in 0..{NUM_SCALES - 1} (SPEC section 1)",
    )
    _check(len(set(scales)) == len(scales), key, value, "scales must be unique")


def _positive(cfg: DictConfig, keys: Iterable[str], strict: bool = False) -> None:
    for key in keys:
        value = _get(cfg, key)
        if value is None:
            continue
        ok = value > 0 if strict else value >= 0
        _check(ok, key, value, "must be > 0" if strict else "must be >= 0")


def validate_data(cfg: DictConfig) -> None:
    for key in ("data.height", "data.width"):
        value = _get(cfg, key)
        if value is not None:
            _check(
                isinstance(value, int) and value > 0 and value % 32 == 0, key, value,
                "the image size must be a positive multiple of 32 (the encoder downsamples 32x)",
            )
    frame_ids = _get(cfg, "data.frame_ids")
    if frame_ids is not None:
        ids = list(frame_ids)
        _check(
            len(ids) >= 2 and ids[0] == 0 and 0 not in ids[1:] and len(set(ids)) == len(ids),
            "data.frame_ids", ids, "frame 0 first, then distinct source frames, e.g. [0, -1, 1]",
        )
    _positive(cfg, ["data.batch_size"], strict=True)
    _positive(cfg, ["data.num_workers"])


def validate_model(cfg: DictConfig) -> None:
    net = "model.network"
    if _get(cfg, net) is None:
        return
    _check_scales(f"{net}.cma_scales", _get(cfg, f"{net}.cma_scales", []))
    _check_scales(f"{net}.disp_scales", _get(cfg, f"{net}.disp_scales", [0]), allow_empty=False)
    heads = _get(cfg, f"{net}.num_heads")
    if heads is not None:
        _check(isinstance(heads, int) and heads >= 1, f"{net}.num_heads", heads,
               "H, the number of embeddings, must be an integer >= 1")
    _positive(cfg, [f"{net}.head_ratio"], strict=True)
    targets = _get(cfg, f"{net}.cma_targets")
    if targets is not None:
        _check(set(targets) <= {"depth", "seg"} and len(targets) > 0, f"{net}.cma_targets",
               list(targets), "a non-empty subset of ['depth', 'seg']")
    scale = _get(cfg, f"{net}.attention_scale")
    if scale is not None:
        _check(scale in ("paper", "reference"), f"{net}.attention_scale", scale,
               "'paper' (divide by sqrt(C')) or 'reference' (by sqrt(H*C'))")
    if _get(cfg, f"{net}.segmentation", True) is False:
        _check(not _get(cfg, f"{net}.cma_scales", []), f"{net}.cma_scales",
               _get(cfg, f"{net}.cma_scales"), "CMA needs the segmentation decoder: use []")
        weight = _get(cfg, "loss.segmentation_weight", 0)
        _check(not weight, "loss.segmentation_weight", weight,
               "the model has no segmentation decoder (model.network.segmentation=false): use 0")


def validate_loss(cfg: DictConfig) -> None:
    if _get(cfg, "loss") is None:
        return
    kernel = _get(cfg, "loss.sgt_kernel_size", 5)
    _check(isinstance(kernel, int) and kernel >= 3 and kernel % 2 == 1, "loss.sgt_kernel_size",
           kernel, "K must be an odd integer >= 3 (the patch is centred on its anchor)")
    _check_scales("loss.sgt_scales", _get(cfg, "loss.sgt_scales", []))
    threshold = _get(cfg, "loss.sgt_threshold")
    if threshold is not None:
        _check(isinstance(threshold, int) and 1 <= threshold < kernel * kernel,
               "loss.sgt_threshold", threshold,
               f"null (= K - 1) or an integer in 1..{kernel**2 - 1}")
    _positive(cfg, ["loss.sgt_margin", "loss.smoothness_weight", "loss.segmentation_weight",
                    "loss.sgt_weight", "loss.identity_noise"])
    alpha = _get(cfg, "loss.alpha", 0.85)
    _check(0.0 <= alpha <= 1.0, "loss.alpha", alpha, "the SSIM weight is in [0, 1]")
    weighting = _get(cfg, "loss.scale_weighting", "reference")
    _check(weighting in ("reference", "monodepth2"), "loss.scale_weighting", weighting,
           "'reference' or 'monodepth2'")
    lo, hi = _get(cfg, "loss.min_depth", 0.1), _get(cfg, "loss.max_depth", 100.0)
    _check(0 < lo < hi, "loss.min_depth", lo, f"0 < min_depth < max_depth (= {hi})")


def validate_optim(cfg: DictConfig) -> None:
    _positive(cfg, ["model.optimizer.lr", "model.optimizer.pose_lr_scale"], strict=True)
    milestones = _get(cfg, "model.scheduler.milestones")
    if milestones is not None:
        ms = list(milestones)
        _check(ms == sorted(ms) and all(m > 0 for m in ms), "model.scheduler.milestones", ms,
               "increasing positive epochs")
    warmup = _get(cfg, "model.scheduler.warmup_steps")
    if warmup is not None:
        _check(isinstance(warmup, int) and warmup >= 0, "model.scheduler.warmup_steps", warmup,
               "an integer >= 0")


VALIDATORS: tuple[Callable[[DictConfig], None], ...] = (
    validate_data, validate_model, validate_loss, validate_optim,
)


def validate_config(cfg: DictConfig) -> DictConfig:
    """Check a composed config; raises ConfigError naming the first bad key."""
    for validator in VALIDATORS:
        validator(cfg)
    return cfg
