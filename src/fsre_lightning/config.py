"""Config validation: every entry point calls `validate_config` before any work starts.

Errors name the key, the value and what is allowed, so a typo in a sweep fails in the first
second with a message instead of hours later with a shape error. Three kinds of checks:

- types and ranges of the known keys (a string where a number belongs, a float where an integer
  belongs, a value out of range, a choice not in its set);
- unknown keys: Hydra rejects an override of a key that does not exist, but ``+key=value``
  adds one silently. Here every config node with a ``_target_`` may only hold that callable's
  parameters (so ``+data.batchsize=4`` or ``+trainer.max_step=10`` fail naming the allowed
  keys), ``loss``, ``model.optimizer``, ``model.scheduler`` and ``data.synthetic`` have fixed
  key sets, and with `entry` the top level may only hold the keys of ``conf/<entry>.yaml``
  and its default groups;
- consistency between keys (model.frame_ids = data.frame_ids, CMA needs segmentation, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

NUM_SCALES = 5  # decoder blocks s = 0..4 (SPEC section 1)
CONFIG_DIR = Path(os.environ.get("FSRE_CONFIG_DIR", Path(__file__).resolve().parents[2] / "conf"))
ENTRIES = ("train", "evaluate", "export_gt", "predict", "export")
ON_ERROR = ("raise", "skip")
NONFINITE = ("skip", "stop")
PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed",
              "bf16", "16-true", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Keys Hydra itself reads on an instantiated node; never parameters of the callable.
HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})


class ConfigError(ValueError):
    """A config value outside its allowed range, of the wrong type, or an unknown key."""


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_plain(value)!r} is not allowed: {allowed}")


# ------------------------------------------------------------------------------- value checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _int(cfg: DictConfig, key: str, lo: int | None = None, hi: int | None = None,
         nullable: bool = False, also: Sequence[Any] = (), allowed: str | None = None) -> None:
    """`key`, when present, is an integer in [lo, hi] (or null, or one of `also`)."""
    value = _get(cfg, key, ABSENT)
    if value is ABSENT or (value is None and nullable) or (value in also and _is_int(value)):
        return
    bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                      f"<= {hi}" if hi is not None else "") if b)
    text = allowed or ("an integer" + (f" {bounds}" if bounds else "")
                       + (" or null" if nullable else ""))
    _check(_is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi),
           key, value, text)


def _number(cfg: DictConfig, key: str, lo: float | None = None, hi: float | None = None,
            strict: bool = False, nullable: bool = False, allowed: str | None = None) -> None:
    """`key`, when present, is a finite number >= lo (> lo if strict) and <= hi."""
    value = _get(cfg, key, ABSENT)
    if value is ABSENT or (value is None and nullable):
        return
    text = allowed
    if text is None:
        parts = [f"{'>' if strict else '>='} {lo}" if lo is not None else "",
                 f"<= {hi}" if hi is not None else ""]
        text = "a number " + " and ".join(p for p in parts if p) + (" or null" if nullable else "")
        if lo is not None:  # the short form the messages always carry, e.g. "must be > 0"
            text = f"must be {'>' if strict else '>='} {lo:g}: {text}"
    ok = _is_number(value) and (lo is None or (value > lo if strict else value >= lo)) and (
        hi is None or value <= hi)
    _check(ok, key, value, text)


def _bool(cfg: DictConfig, key: str, nullable: bool = False) -> None:
    value = _get(cfg, key, ABSENT)
    if value is ABSENT or (value is None and nullable):
        return
    _check(isinstance(value, bool), key, value, "true or false" + (" or null" if nullable else ""))


def _choice(cfg: DictConfig, key: str, choices: Sequence[Any], nullable: bool = False) -> None:
    value = _get(cfg, key, ABSENT)
    if value is ABSENT or (value is None and nullable):
        return
    ok = any(value == c and type(value) is type(c) for c in choices)
    _check(ok, key, value, f"one of {list(choices)}" + (" or null" if nullable else ""))


def _string(cfg: DictConfig, key: str, nullable: bool = False) -> None:
    # Paths interpolate ${hydra:...}, which only resolves inside a Hydra run: unresolvable
    # reads as null here (the entry point resolves it for real).
    value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_resolution_failure=False)
    if value is ABSENT or (value is None and nullable):
        return
    _check(isinstance(value, str) and bool(value), key, value,
           "a non-empty string" + (" or null" if nullable else ""))


def _check_scales(key: str, value: Any, allow_empty: bool = True) -> None:
    _check(isinstance(value, list | tuple | ListConfig), key, value, "a list of scales, e.g. [0]")
    scales = list(value)
    _check(allow_empty or bool(scales), key, value, "give at least one scale")
    _check(
        all(_is_int(s) and 0 <= s < NUM_SCALES for s in scales),
        key, value, f"decoder scales are integers in 0..{NUM_SCALES - 1} (SPEC section 1)",
    )
    _check(len(set(scales)) == len(scales), key, value, "scales must be unique")


def _positive(cfg: DictConfig, keys: Iterable[str], strict: bool = False) -> None:
    for key in keys:
        _number(cfg, key, lo=0, strict=strict, nullable=True)


# --------------------------------------------------------------------------------- the groups
def _frame_ids(key: str, value: Any) -> None:
    _check(isinstance(value, list | tuple | ListConfig), key, value,
           "a list of frame offsets, frame 0 first, e.g. [0, -1, 1]")
    ids = list(value)
    _check(
        all(_is_int(i) for i in ids) and len(ids) >= 2 and ids[0] == 0 and 0 not in ids[1:]
        and len(set(ids)) == len(ids),
        key, ids, "frame 0 first, then distinct integer source frames, e.g. [0, -1, 1]",
    )


def validate_data(cfg: DictConfig) -> None:
    for key in ("data.height", "data.width"):
        value = _get(cfg, key)
        if value is not None:
            _check(
                _is_int(value) and value > 0 and value % 32 == 0, key, value,
                "the image size must be a positive multiple of 32 (the encoder downsamples 32x)",
            )
    frame_ids = _get(cfg, "data.frame_ids")
    if frame_ids is not None:
        _frame_ids("data.frame_ids", frame_ids)
    _int(cfg, "data.batch_size", lo=1)
    _int(cfg, "data.num_workers", lo=0)
    _int(cfg, "data.cache_workers", lo=0, allowed="an integer >= 0 (0 = all CPU cores)")
    _choice(cfg, "data.img_ext", ("auto", "png", "jpg", "jpeg"))
    _choice(cfg, "data.label_format", ("train_ids", "label_ids"))
    _choice(cfg, "data.label_source", ("files", "predicted"))
    _choice(cfg, "data.eval_crop", ("garg", "none"))
    _choice(cfg, "data.on_error", ON_ERROR)
    _choice(cfg, "data.eval_on_error", ON_ERROR)
    for key in ("use_labels", "allow_missing_labels", "frame_cache", "pin_memory"):
        _bool(cfg, f"data.{key}")
    for key in ("flip_prob", "jitter_prob"):
        _number(cfg, f"data.{key}", lo=0, hi=1)
    for key in ("brightness", "contrast", "saturation"):
        _number(cfg, f"data.{key}", lo=0)
    _number(cfg, "data.hue", lo=0, hi=0.5)
    intrinsics = _get(cfg, "data.intrinsics")
    if intrinsics is not None:
        _check(isinstance(intrinsics, ListConfig | list) and len(intrinsics) == 4
               and all(_is_number(v) and v > 0 for v in intrinsics), "data.intrinsics",
               intrinsics, "four positive numbers: fx, fy, cx, cy, normalised (or pixels "
               "with data=video_folder's data.intrinsics_units=pixels)")
    # data=video_folder
    if str(_get(cfg, "data._target_", "")).endswith(".VideoFolderDataModule"):
        for key, what in (("data.root", "the folder with one subfolder of frames per sequence"),
                          ("data.intrinsics", "your camera's [fx, fy, cx, cy], normalised or "
                                              "in pixels (data.intrinsics_units=pixels)")):
            _check(_get(cfg, key) is not None, key, None, f"required with data=video_folder: "
                   f"{what}")
    _choice(cfg, "data.intrinsics_units", ("normalized", "pixels"))
    _number(cfg, "data.val_fraction", lo=0, hi=1, strict=True)
    _check(_get(cfg, "data.val_fraction", 0.5) != 1, "data.val_fraction",
           _get(cfg, "data.val_fraction"), "a number in (0, 1): some frames must train")
    _int(cfg, "data.split_seed")
    _int(cfg, "data.pseudo_label_batch_size", lo=1)
    for key in ("work_dir", "pseudo_label_model"):
        _string(cfg, f"data.{key}", nullable=True)
    _number(cfg, "data.min_depth_eval", lo=0, strict=True)
    lo, hi = _get(cfg, "data.min_depth_eval"), _get(cfg, "data.max_depth_eval")
    if hi is not None:
        _number(cfg, "data.max_depth_eval", lo=lo if _is_number(lo) else 0, strict=True,
                allowed=f"a number > data.min_depth_eval (= {lo})")
    for key in ("train_split", "val_split", "test_split"):
        _string(cfg, f"data.{key}")
    synthetic = _get(cfg, "data.synthetic")
    if synthetic is not None:
        _check(isinstance(synthetic, DictConfig), "data.synthetic", synthetic,
               "null or a mapping of generate_synthetic_kitti arguments")
        for key in ("num_drives", "frames_per_drive"):
            _int(cfg, f"data.synthetic.{key}", lo=3 if key == "frames_per_drive" else 1)
        for key in ("height", "width"):
            _int(cfg, f"data.synthetic.{key}", lo=1)
        _int(cfg, "data.synthetic.seed")
        _int(cfg, "data.synthetic.workers", lo=0)


def validate_model(cfg: DictConfig) -> None:
    _positive(cfg, ["model.optimizer.lr", "model.optimizer.pose_lr_scale"], strict=True)
    _number(cfg, "model.optimizer.weight_decay", lo=0)
    _bool(cfg, "model.optimizer.fused", nullable=True)
    _int(cfg, "model.image_log_every_n_steps", lo=0)
    _int(cfg, "model.num_panel_images", lo=1)
    _choice(cfg, "model.nonfinite", NONFINITE)
    _int(cfg, "model.nonfinite_max_consecutive", lo=1)
    for key in ("channels_last", "compile", "compile_loss", "gradient_checkpointing"):
        _bool(cfg, f"model.{key}")
    data_ids, model_ids = _get(cfg, "data.frame_ids"), _get(cfg, "model.frame_ids")
    if model_ids is not None:
        _frame_ids("model.frame_ids", model_ids)
        if data_ids is not None:
            _check(list(model_ids) == list(data_ids), "model.frame_ids", model_ids,
                   f"must equal data.frame_ids (= {list(data_ids)})")
    net = "model.network"
    if _get(cfg, net) is None:
        return
    _check_scales(f"{net}.cma_scales", _get(cfg, f"{net}.cma_scales", []))
    _check_scales(f"{net}.disp_scales", _get(cfg, f"{net}.disp_scales", [0]), allow_empty=False)
    _int(cfg, f"{net}.num_heads", lo=1,
         allowed="H, the number of embeddings, must be an integer >= 1")
    _int(cfg, f"{net}.num_classes", lo=1)
    _positive(cfg, [f"{net}.head_ratio"], strict=True)
    _bool(cfg, f"{net}.segmentation")
    _string(cfg, f"{net}.encoder")
    for key in (f"{net}.pretrained", "model.pose_network.pretrained"):
        _choice(cfg, key, ("auto", True, False))
    init_t = _get(cfg, "model.pose_network.init_translation", ABSENT)
    if init_t is not ABSENT:
        _check(isinstance(init_t, ListConfig | list) and len(init_t) == 3
               and all(_is_number(v) for v in init_t), "model.pose_network.init_translation",
               init_t, "three numbers (x, y, z); forward motion is (0, 0, -t)")
    targets = _get(cfg, f"{net}.cma_targets")
    if targets is not None:
        _check(isinstance(targets, ListConfig | list) and len(targets) > 0
               and set(targets) <= {"depth", "seg"}, f"{net}.cma_targets", targets,
               "a non-empty subset of ['depth', 'seg']")
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
    _check(_is_int(kernel) and kernel >= 3 and kernel % 2 == 1, "loss.sgt_kernel_size",
           kernel, "K must be an odd integer >= 3 (the patch is centred on its anchor)")
    _check_scales("loss.sgt_scales", _get(cfg, "loss.sgt_scales", []))
    threshold = _get(cfg, "loss.sgt_threshold")
    if threshold is not None:
        _check(_is_int(threshold) and 1 <= threshold < kernel * kernel,
               "loss.sgt_threshold", threshold,
               f"null (= K - 1) or an integer in 1..{kernel**2 - 1}")
    _positive(cfg, ["loss.smoothness_weight", "loss.segmentation_weight", "loss.sgt_weight",
                    "loss.identity_noise"])
    _number(cfg, "loss.sgt_margin", lo=0, strict=True,
            allowed="m, the triplet margin, must be > 0")
    _number(cfg, "loss.alpha", lo=0, hi=1, allowed="the SSIM weight is in [0, 1]")
    _bool(cfg, "loss.automask")
    _choice(cfg, "loss.scale_weighting", ("reference", "monodepth2"))
    _number(cfg, "loss.min_depth", lo=0, strict=True)
    _number(cfg, "loss.max_depth", lo=0, strict=True)
    lo, hi = _get(cfg, "loss.min_depth", 0.1), _get(cfg, "loss.max_depth", 100.0)
    _check(lo < hi, "loss.min_depth", lo, f"0 < min_depth < max_depth (= {hi})")


def validate_optim(cfg: DictConfig) -> None:
    milestones = _get(cfg, "model.scheduler.milestones")
    if milestones is not None:
        _check(isinstance(milestones, ListConfig | list), "model.scheduler.milestones",
               milestones, "a list of increasing positive epochs, e.g. [10, 15]")
        ms = list(milestones)
        _check(all(_is_int(m) and m > 0 for m in ms) and ms == sorted(ms),
               "model.scheduler.milestones", ms, "increasing positive integer epochs")
    _number(cfg, "model.scheduler.gamma", lo=0, hi=1, strict=True)
    _int(cfg, "model.scheduler.warmup_steps", lo=0, allowed="an integer >= 0")


def validate_trainer(cfg: DictConfig) -> None:
    if _get(cfg, "trainer") is None:
        return
    _choice(cfg, "trainer.accelerator", ACCELERATORS)
    devices = _get(cfg, "trainer.devices")
    if devices is not None:
        _check((_is_int(devices) and (devices >= 1 or devices == -1)) or devices == "auto"
               or (isinstance(devices, str) and bool(devices))
               or (isinstance(devices, ListConfig) and all(_is_int(d) for d in devices)),
               "trainer.devices", devices, "an integer >= 1, -1 (all), 'auto' or a list of ids")
    _int(cfg, "trainer.num_nodes", lo=1)
    _int(cfg, "trainer.max_epochs", lo=-1, nullable=True,
         allowed="an integer >= 1, -1 (no limit) or null")
    _int(cfg, "trainer.max_steps", lo=1, also=(-1,), allowed="an integer >= 1 or -1 (no limit)")
    _choice(cfg, "trainer.precision", PRECISIONS)
    _int(cfg, "trainer.log_every_n_steps", lo=1)
    _int(cfg, "trainer.check_val_every_n_epoch", lo=1, nullable=True)
    _int(cfg, "trainer.accumulate_grad_batches", lo=1)
    _int(cfg, "trainer.num_sanity_val_steps", lo=-1)
    _number(cfg, "trainer.gradient_clip_val", lo=0, nullable=True)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                "val_check_interval"):
        value = _get(cfg, f"trainer.{key}")
        if value is None:
            continue
        lo = 1 if key == "val_check_interval" else 0
        _check((_is_int(value) and value >= lo)
               or (isinstance(value, float) and 0.0 <= value <= 1.0
                   and (value > 0 or key != "val_check_interval")),
               f"trainer.{key}", value,
               f"null, an integer >= {lo} (batches) or a float in "
               f"{'(0' if key == 'val_check_interval' else '[0'}, 1] (a fraction of an epoch)")
    for key in ("inference_mode", "enable_model_summary", "sync_batchnorm",
                "use_distributed_sampler", "deterministic"):
        _bool(cfg, f"trainer.{key}", nullable=key == "deterministic")
    _bool(cfg, "trainer.benchmark", nullable=True)


def validate_top(cfg: DictConfig) -> None:
    _int(cfg, "seed")
    _int(cfg, "effective_batch_size", lo=1, nullable=True)
    _bool(cfg, "eval_before")
    _string(cfg, "name")
    for key in ("ckpt_path", "summary_path", "metrics_path", "semantics_dir", "output",
                "init_weights"):
        if key != "ckpt_path" or not OmegaConf.is_missing(cfg, key):
            _string(cfg, key, nullable=True)
    for key in ("height", "width"):  # evaluate's network input
        value = _get(cfg, key)
        if value is not None:
            _check(_is_int(value) and value > 0 and value % 32 == 0, key, value,
                   "null (the training run's) or a positive multiple of 32")
    for key in ("post_process", "median_scaling", "progress"):
        _bool(cfg, key)
    # ckpt_path=auto goes with init_weights: a requeued job resumes, the first one initialises.
    if _get(cfg, "init_weights") and _get(cfg, "ckpt_path") not in (None, "", "auto"):
        raise ConfigError(f"init_weights={_get(cfg, 'init_weights')!r} and ckpt_path="
                          f"{_get(cfg, 'ckpt_path')!r}: a resumed run restores its own weights; "
                          "give init_weights to start a fine-tuning run, ckpt_path to resume "
                          "(ckpt_path=auto: resume when there is a run to resume, else init)")
    device = _get(cfg, "device")
    if device is not None:
        _check(isinstance(device, str) and (device in ("auto", "cpu", "cuda", "mps")
                                            or device.startswith("cuda:")),
               "device", device, "auto, cpu, cuda, cuda:<index> or mps")
    _choice(cfg, "subset", ("test", "val"))


def validate_inference(cfg: DictConfig) -> None:
    """Keys of `predict` and `export` (top level; absent in the other entry configs)."""
    _string(cfg, "input")
    _choice(cfg, "resolution", ("input", "network"))
    _int(cfg, "batch_size", lo=1)
    _int(cfg, "opset", lo=7)
    for key in ("segmentation", "side_by_side", "save_arrays", "overlay"):
        _bool(cfg, key)
    _choice(cfg, "format", ("onnx", "torchscript"))
    _number(cfg, "tolerance", lo=0, strict=True)
    for key in ("fps", "scale_factor", "camera_height"):
        _number(cfg, key, lo=0, strict=True, nullable=True)
    if _get(cfg, "scale_factor") is not None and _get(cfg, "camera_height") is not None:
        raise ConfigError(f"scale_factor={_get(cfg, 'scale_factor')!r} and camera_height="
                          f"{_get(cfg, 'camera_height')!r}: give one of them (or neither)")
    intrinsics = _get(cfg, "intrinsics")
    if intrinsics is not None:
        _check(isinstance(intrinsics, ListConfig | list) and len(intrinsics) == 4
               and all(_is_number(v) and v > 0 for v in intrinsics), "intrinsics",
               intrinsics, "null or four positive numbers: normalised fx, fy, cx, cy")


# --------------------------------------------------------------------------- unknown keys
@cache
def _parameters(target: str) -> frozenset[str] | None:
    """Keyword parameters of `target`; None when it takes **kwargs (anything goes)."""
    from hydra.utils import get_object

    obj = get_object(target)
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(n for n in params if n != "self")


def _loss_keys() -> frozenset[str]:
    from fsre_lightning.objective import LossConfig

    return frozenset(f.name for f in dataclasses.fields(LossConfig))


def _optimizer_keys() -> frozenset[str]:
    return (_parameters("torch.optim.Adam") or frozenset()) - {"params"} | {"pose_lr_scale"}


def _scheduler_keys() -> frozenset[str]:
    params = _parameters("torch.optim.lr_scheduler.MultiStepLR") or frozenset()
    return params - {"optimizer"} | {"warmup_steps"}


def _synthetic_keys() -> frozenset[str]:
    params = _parameters("fsre_lightning.data.synthetic.generate_synthetic_kitti")
    return (params or frozenset()) - {"root"}


# Nodes without a `_target_` whose keys are fixed (path -> allowed keys).
FIXED_KEYS: dict[str, Callable[[], frozenset[str]]] = {
    "loss": _loss_keys,
    "model.optimizer": _optimizer_keys,
    "model.scheduler": _scheduler_keys,
    "data.synthetic": _synthetic_keys,
}


def _unknown(path: str, keys: Iterable[str], allowed: Iterable[str], what: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        key = f"{path}.{extra[0]}" if path else extra[0]
        raise ConfigError(f"{key} is not a known key ({what}): allowed keys of "
                          f"{path or 'the top level'} are {sorted(allowed)}; check the spelling "
                          f"(keys added with + are not read by anything)")


def _check_keys(node: DictConfig, path: str) -> None:
    keys = [str(k) for k in node]
    target = node._get_node("_target_") if "_target_" in node else None
    if target is not None:
        name = target._value()
        try:
            params = _parameters(str(name))
        except Exception as err:  # any import failure is a config error here
            raise ConfigError(f"{path}._target_={name!r} is not allowed: cannot import it "
                              f"({type(err).__name__}: {err})") from err
        if params is not None:
            _unknown(path, keys, params | HYDRA_KEYS, f"not a parameter of {name}")
    elif path in FIXED_KEYS:
        _unknown(path, keys, FIXED_KEYS[path](), "not read by the code")
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _check_keys(child, f"{path}.{key}" if path else key)


@cache
def entry_keys(entry: str) -> frozenset[str]:
    """Top-level keys of `conf/<entry>.yaml`: its own keys plus its default groups."""
    path = CONFIG_DIR / f"{entry}.yaml"
    raw = OmegaConf.load(path)
    keys = {str(k) for k in raw} - {"defaults"}
    for item in raw.get("defaults", []) or []:
        if isinstance(item, DictConfig | dict):
            for group in item:
                keys.add(str(group).split("@")[-1].split("/")[0].removeprefix("override "))
    keys.discard("_self_")
    return frozenset(keys | {"hydra"})


def validate_keys(cfg: DictConfig, entry: str | None = None) -> None:
    """Reject keys nothing reads (see the module docstring)."""
    if entry is not None:
        _check(entry in ENTRIES, "entry", entry, f"one of {list(ENTRIES)}")
        _unknown("", [str(k) for k in cfg], entry_keys(entry),
                 f"not in conf/{entry}.yaml")
    for group in ("data", "model", "loss", "trainer", "callbacks", "logger"):
        node = cfg._get_node(group) if group in cfg else None
        if isinstance(node, DictConfig) and not node._is_none():
            _check_keys(node, group)


VALIDATORS: tuple[Callable[[DictConfig], None], ...] = (
    validate_data, validate_model, validate_loss, validate_optim, validate_trainer,
    validate_top, validate_inference,
)


def validate_config(cfg: DictConfig, entry: str | None = None) -> DictConfig:
    """Check a composed config before any work; raises ConfigError naming the first bad key.

    `entry` (one of ENTRIES: train, evaluate, export_gt, predict, export) also restricts the
    top-level keys to that entry point's config file.
    """
    validate_keys(cfg, entry)
    for validator in VALIDATORS:
        validator(cfg)
    return cfg
