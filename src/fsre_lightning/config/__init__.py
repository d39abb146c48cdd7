"""`validate_config`: every command checks its composed config before doing any work.

Each group is merged into its typed schema, a dataclass beside the code it configures, in a
module of its own that imports no torch (so that --cfg, usage errors and a sweep's members
are checked in a second, before any work; `checks.deferring_probes` puts off the one check that
needs torch, the encoder's, until the command's work starts):

    data                        data.kitti_config.KittiDataConfig (data.synthetic:
                                data.synthetic.SyntheticConfig; data.prepare:
                                data.kitti_sources.KittiPrepareConfig)
    data=video_folder           data.video_folder_config.VideoFolderDataConfig
    model                       module_config.ModelConfig (models.network_config.NetworkConfig,
                                models.network_config.PoseNetworkConfig)
    model.optimizer, .scheduler schemas.OPTIMIZERS, schemas.SCHEDULERS (by _target_)
    loss                        loss_config.LossConfig
    trainer, paths, top level   schemas.TrainerConfig, schemas.PathsConfig, schemas.ENTRIES

`fsre_lightning.config.build.build` merges a group into its schema (OmegaConf rejects unknown
keys and wrong types) and builds the dataclass, which runs its range rules (`__post_init__`,
the one place each rule lives: the configured classes build the same dataclass from their
arguments). A `_target_` node without a schema (callbacks, loggers, your own optimiser) may
only hold its callable's parameters. Only the rules that span groups are written here.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig

from fsre_lightning.config.build import build, plain_values
from fsre_lightning.config.checks import probes_deferred, raise_unless
from fsre_lightning.config.resolvers import register_resolvers
from fsre_lightning.errors import ConfigError

# The one place the configs' resolvers are registered: every composition goes through here.
register_resolvers()

HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})
# Keys that moved: the old spelling is refused with one line naming the new one.
MOVED_KEYS = {"model.optimizer.pose_lr_scale": "model.pose_lr_scale",
              "model.scheduler.warmup_steps": "model.warmup_steps",
              "model.frame_ids": "data.frame_ids (the model takes the data's frames)"}


def _check_target_keys(node: dict[str, Any], path: str) -> None:
    """A `_target_` node without a schema may only hold its callable's parameters (put off
    under `checks.deferring_probes` when that would import the target's package first:
    Lightning's callbacks and loggers take seconds to import)."""
    import sys

    from hydra.utils import get_object

    if probes_deferred() and str(node["_target_"]).rpartition(".")[0] not in sys.modules:
        return

    try:
        obj = get_object(str(node["_target_"]))
    except Exception as err:  # any import failure is a config error here
        raise ConfigError(f"{path}._target_", node["_target_"],
                          f"an importable callable ({type(err).__name__}: {err})") from err
    params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted((set(params) - {"self"}) | HYDRA_KEYS)
    for key in node:
        raise_unless(key in allowed, f"{path}.{key} is not a known key (not a parameter of "
                     f"{node['_target_']}): allowed keys of {path} are {allowed}; check the "
                     "spelling (keys added with + are not read by anything)")


def _schema(path: str, values: dict[str, Any]) -> type | None:
    from fsre_lightning.config.schemas import OPTIMIZERS, SCHEDULERS, PathsConfig, TrainerConfig
    from fsre_lightning.data.kitti_config import KittiDataConfig
    from fsre_lightning.data.video_folder_config import VideoFolderDataConfig
    from fsre_lightning.loss_config import LossConfig
    from fsre_lightning.module_config import ModelConfig

    target = str(values.get("_target_", ""))
    data = VideoFolderDataConfig if target == VideoFolderDataConfig._target_ else KittiDataConfig
    return {"data": data, "model": ModelConfig, "model.optimizer": OPTIMIZERS.get(target),
            "model.scheduler": SCHEDULERS.get(target), "loss": LossConfig,
            "trainer": TrainerConfig, "paths": PathsConfig}.get(path)


def validate_config(cfg: DictConfig, entry: str) -> DictConfig:
    """Check the composed config of command `entry` (train, evaluate, evaluate_pose, export_gt,
    predict or export) before any work; raises ConfigError naming the first bad key. Returns
    `cfg`."""
    from fsre_lightning.config.schemas import ENTRIES

    raise_unless(entry in ENTRIES, f"entry={entry!r}: one of {sorted(ENTRIES)}")
    top = plain_values(cfg)
    _refuse_moved_keys(top)
    # The groups are checked below, each by its own schema; here their names only.
    build(ENTRIES[entry], {k: None if isinstance(v, dict) else v for k, v in top.items()})
    model = top.get("model") or {}
    nodes = {**{k: top.get(k) for k in ("data", "model", "loss", "trainer", "paths")},
             "model.optimizer": model.get("optimizer"), "model.scheduler": model.get("scheduler"),
             **{f"{group}.{k}": v for group in ("callbacks", "logger")
                for k, v in (top.get(group) or {}).items()}}
    built: dict[str, Any] = {}
    for path, values in nodes.items():
        if not isinstance(values, dict):
            continue
        schema = _schema(path, values)
        if schema is not None:
            built[path] = build(schema, values, path)
        elif "_target_" in values:
            _check_target_keys(values, path)
    _cross_group_rules(top, built)
    return cfg


def _refuse_moved_keys(top: dict[str, Any]) -> None:
    for old, new in MOVED_KEYS.items():
        node: Any = top
        for part in old.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{old} is not allowed: it is now {new}; set that instead")


def _model_choice() -> str | None:
    """The `model` config the command line chose (fsre, monodepth2), when Hydra says."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    try:
        return HydraConfig.get().runtime.choices.get("model")
    except Exception:  # a config without Hydra's runtime node
        return None


def _cross_group_rules(top: dict[str, Any], built: dict[str, Any]) -> None:
    """Rules between groups, on their checked dataclasses (defaults filled in). The messages
    name what the user chose: a weight set on a model that has no use for it is the weight's
    mistake, not the model's."""
    data, model, loss = (built.get(k) for k in ("data", "model", "loss"))
    if model and loss:
        chosen = _model_choice()
        semantic = {k: v for k, v in (("loss.segmentation_weight", loss.segmentation_weight),
                                      ("loss.sgt_weight", loss.sgt_weight)) if v}
        if not loss.sgt_scales:
            semantic.pop("loss.sgt_weight", None)
        without_labels = data is not None and not data.use_labels
        if semantic and (without_labels or (not model.network.segmentation
                                            and "loss.segmentation_weight" in semantic)):
            key, value = next(iter(semantic.items()))
            if not model.network.segmentation and "loss.segmentation_weight" in semantic:
                key, value = "loss.segmentation_weight", semantic["loss.segmentation_weight"]
            if chosen == "monodepth2":
                why = ("model=monodepth2 has no segmentation decoder and reads no "
                       "pseudo-labels: the semantic losses need both; leave it at 0, or "
                       "train model=fsre")
            elif key == "loss.segmentation_weight" and not model.network.segmentation:
                why = ("the model has no segmentation decoder (model.network.segmentation="
                       "false): use 0, or model.network.segmentation=true")
            else:
                why = ("the semantic losses need pseudo-labels and data.use_labels=false reads "
                       "none: set data.use_labels=true, or use 0")
            raise ConfigError(f"{key}={value!r} is not allowed: {why}")
    if top.get("effective_batch_size") is not None and top.get("trainer"):
        from fsre_lightning.distributed import effective_batch_split

        effective_batch_split(top["effective_batch_size"], top["trainer"])
