"""A trained model from its files: checkpoint to module, its training resolution and camera, and
the weights a fine-tuning run starts from.

`evaluate`, `predict` and `export` load a checkpoint with `load_module` and run it at the
resolution it was trained at (`training_resolution`); `predict` back-projects with the
training intrinsics (`training_intrinsics`); `train init_weights=...` copies weights from a
checkpoint or a published release folder (`load_initial_weights`).

A checkpoint describes its own training data (`training_data`, written by every save of a
training run), so the file alone is enough wherever it is copied; a checkpoint written before
that entry existed falls back to its run folder's config.yaml, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fsre_lightning.checkpoints import (
    DATA_CONFIG_KEY,
    INPUT_SIZE_KEY,
    TRAINING_DATA_KEY,
    CheckpointMismatchError,
    check_state_dict_compatible,
    load_checkpoint_weights_only,
)
from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
from fsre_lightning.data.video_folder import normalise_intrinsics, scan_sequences
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.models.fsre import NetworkConfig
from fsre_lightning.models.network_config import check_image_size
from fsre_lightning.module import FSREModule, without_imagenet_init
from fsre_lightning.reference.keys import (
    attention_scale_of,
    num_heads_of,
    query_factor,
    rescale_queries,
)
from fsre_lightning.reference.load import load_reference_release
from fsre_lightning.reference.release_layout import ReleaseFormatError

log = logging.getLogger(__name__)


def load_module(ckpt_path: str | os.PathLike[str], device: torch.device) -> FSREModule:
    """An FSREModule from a Lightning checkpoint, in eval mode on `device`.

    Loading is weights_only (tensors and plain containers, no pickled code), which every
    checkpoint written by `fsre_lightning.train` satisfies. A checkpoint of another model is a
    CheckpointMismatchError naming the file.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(ckpt_path)!r}: no such checkpoint (training "
                                "writes them to <run folder>/checkpoints/)")
    # Only the hyper-parameters are looked at here (the reader maps the weights, not reads them).
    hparams = load_checkpoint_weights_only(ckpt_path).get("hyper_parameters")
    if not isinstance(hparams, dict) or not {"network", "pose_network"} <= set(hparams):
        raise CheckpointMismatchError(f"{ckpt_path} is not an FSREModule checkpoint: its "
                                      "hyper_parameters lack network/pose_network")
    # The checkpoint's weights replace any ImageNet initialisation: do not look for one.
    kwargs: dict[str, Any] = {key: value for key, value in without_imagenet_init(hparams).items()
                              if key in ("network", "pose_network")}
    # Older Lightning has no weights_only argument (it would reach FSREModule's constructor);
    # the weights-only read above has vetted the file either way.
    if "weights_only" in inspect.signature(FSREModule.load_from_checkpoint).parameters:
        kwargs["weights_only"] = True
    try:
        module = FSREModule.load_from_checkpoint(ckpt_path, map_location=device, **kwargs)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{ckpt_path}: {err}") from err
    except (TypeError, KeyError, ValueError) as err:
        # hyper-parameters this version's networks do not take: another model's checkpoint
        raise CheckpointMismatchError(
            f"{ckpt_path}: its model config does not build with this version of "
            f"fsre_lightning ({type(err).__name__}: {err})") from err
    return module.to(device).eval()


def training_data(ckpt_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the checkpoint says about its training data (`training_data_entry`); a checkpoint
    imported from a release before that entry existed gives its `input_size` alone, an older
    one {}, so does a missing file (its loading reports that); an unreadable one is a
    CheckpointMismatchError naming it."""
    if not Path(ckpt_path).is_file():
        return {}
    checkpoint = load_checkpoint_weights_only(ckpt_path)
    entry = checkpoint.get(TRAINING_DATA_KEY)
    if isinstance(entry, dict):
        return dict(entry)
    size = checkpoint.get(INPUT_SIZE_KEY)
    return {INPUT_SIZE_KEY: list(size)} if isinstance(size, list | tuple) else {}


def training_data_config(ckpt_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The data config (`data` group) the checkpoint was trained with: recorded in it, or in
    its run folder's config.yaml (older checkpoints, with a warning); None when neither says."""
    recorded = training_data(ckpt_path).get(DATA_CONFIG_KEY)
    if isinstance(recorded, dict):
        return dict(recorded)
    value = run_config_value(ckpt_path, "data") if Path(ckpt_path).is_file() else None
    return dict(value) if isinstance(value, dict) else None


_warned_legacy: set[Path] = set()


def run_config_value(ckpt_path: str | os.PathLike[str], key: str) -> Any:
    """`key` of the config.yaml of the run folder holding the checkpoint, or None: where a
    checkpoint written before checkpoints described their training data finds it (warns)."""
    run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    if not run_config.is_file():
        return None
    if run_config not in _warned_legacy:
        _warned_legacy.add(run_config)
        log.warning("%s does not describe its training data (written by an older version): "
                    "reading the training settings from %s; `python -m fsre_lightning.train "
                    "ckpt_path=...` of a newer version writes checkpoints that stand alone",
                    ckpt_path, run_config)
    value = OmegaConf.select(OmegaConf.load(run_config), key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def training_resolution(ckpt_path: str | os.PathLike[str], height: int | None = None,
                        width: int | None = None,
                        fallback: tuple[int | None, int | None] | None = None
                        ) -> tuple[int, int, str]:
    """(height, width, where they came from) of the network input.

    In order: `height`/`width` as given; the checkpoint's own record (`training_data`, or an
    imported release's `input_size`); for older checkpoints data.height/width of the training
    run's config.yaml; `fallback`. A network evaluated at another size than it was trained at
    scores worse.
    """
    if (height is None) != (width is None):
        raise ConfigError(f"height={height!r}, width={width!r}: set both or neither")
    source = "height/width"
    if height is None:
        size = training_data(ckpt_path).get(INPUT_SIZE_KEY)
        if isinstance(size, list) and len(size) == 2:
            (height, width), source = size, f"{ckpt_path} (its training input size)"
    if height is None or width is None:
        height, width = run_config_value(ckpt_path, "data.height"), run_config_value(
            ckpt_path, "data.width")
        source = f"the training run's {Path(ckpt_path).resolve().parent.parent / 'config.yaml'}"
    if (height is None or width is None) and fallback is not None:
        (height, width), source = fallback, "data.height/data.width"
    if height is None or width is None:
        raise ConfigError(f"{ckpt_path}: its training resolution is unknown (an older checkpoint "
                          "without its run folder's config.yaml): set height= and width= (the "
                          "training resolution)")
    for key, value in (("height", height), ("width", width)):
        try:
            check_image_size(key, value)
        except ConfigError as err:
            raise ConfigError(f"{err} (from {source})") from None
    return int(height), int(width), source


def training_intrinsics(ckpt_path: str | os.PathLike[str], given: Sequence[float] | None
                        ) -> tuple[float, float, float, float]:
    """Normalised (fx, fy, cx, cy): `given`, else the checkpoint's record, else (older
    checkpoints) the training run's data.intrinsics, else KITTI's."""
    if given is not None:
        fx, fy, cx, cy = (float(v) for v in given)
        return fx, fy, cx, cy
    recorded = training_data(ckpt_path).get("intrinsics")
    if isinstance(recorded, list) and len(recorded) == 4:
        fx, fy, cx, cy = (float(v) for v in recorded)
        return fx, fy, cx, cy
    saved = run_config_value(ckpt_path, "data.intrinsics")
    if not isinstance(saved, list):
        return KITTI_INTRINSICS
    if run_config_value(ckpt_path, "data.intrinsics_units") == "pixels":
        # data=video_folder in pixels: normalised by the training frames' size, if still there
        root = run_config_value(ckpt_path, "data.root")
        try:
            return normalise_intrinsics(saved, "pixels", scan_sequences(Path(str(root))))
        except DataError as err:
            raise ConfigError(f"{ckpt_path} was trained with intrinsics in pixels {saved} and "
                              f"its frames cannot be read ({err}): give intrinsics=[fx, fy, "
                              "cx, cy] normalised by the image width and height") from err
    fx, fy, cx, cy = (float(v) for v in saved)
    return fx, fy, cx, cy


# --------------------------------------------------------------------- fine-tuning init
# Network settings that never change the weights' meaning, so never worth a hint.
_NOT_ARCHITECTURE = frozenset({"_target_", "pretrained", "weights_path"})


def _network_settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A network config with NetworkConfig's defaults filled in (hyper-parameters store only
    what the config named)."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING
                else f.default_factory() for f in dataclasses.fields(NetworkConfig)}
    merged = {**defaults, **dict(config or {})}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()
            if k not in _NOT_ARCHITECTURE}


def load_initial_weights(module: FSREModule, source: str | os.PathLike[str]) -> str:
    """Copy weights into `module` to start a fine-tuning run; returns a summary.

    `source` is a Lightning checkpoint (e.g. written by `import_reference` or by a training
    run) or a reference release folder (FSRE-Depth / Monodepth2 `.pth` files). Weights only:
    the optimiser, schedule and step count start afresh. The model the config builds must have
    the same architecture; a mismatch is a CheckpointMismatchError naming the keys and the
    network settings to change. CMA query weights are rescaled exactly when the source and
    the config use different `attention_scale`s, so the fine-tuning starts from the source's
    outputs.
    """
    path = Path(source).expanduser()
    ours = attention_scale_of(module.net)
    theirs: str | None = ours
    settings: dict[str, Any] | None = None
    if path.is_dir():
        try:
            release = load_reference_release(path, attention_scale=ours)
        except ReleaseFormatError as err:
            raise CheckpointMismatchError(f"init_weights={str(path)!r}: {err}") from err
        state = {f"net.{k}": v for k, v in release.depth.state_dict().items()}
        if release.pose is not None:
            state.update({f"pose_net.{k}": v for k, v in release.pose.state_dict().items()})
        else:  # Monodepth2 stereo releases have no pose network: keep the config's own init
            state.update({k: v for k, v in module.state_dict().items()
                          if k.startswith("pose_net.")})
        settings = _network_settings(release.layout.network_config(ours))
        what = f"release folder {path} ({'with' if release.pose else 'without'} pose network)"
    else:
        if not path.exists():
            raise FileNotFoundError(f"init_weights={str(path)!r}: no such checkpoint file or "
                                    "release folder")
        checkpoint = load_checkpoint_weights_only(path)
        state = dict(checkpoint["state_dict"])
        network = (checkpoint.get("hyper_parameters") or {}).get("network")
        if isinstance(network, Mapping):
            settings = _network_settings(network)
            theirs = settings.get("attention_scale")
        what = f"checkpoint {path}"
    try:
        check_state_dict_compatible(module, state, source=f"init_weights={str(path)!r}",
                                    setting="init_weights")
    except CheckpointMismatchError as err:
        hint = ""
        if settings is not None:
            current = _network_settings(module.hparams.get("network"))
            diff = [f"model.network.{k}={settings[k]}" for k in sorted(settings)
                    if k in current and current[k] != settings[k]]
            if diff:
                hint = f". The source was built with {' '.join(diff)}"
        raise CheckpointMismatchError(f"{err}{hint}") from err
    if theirs in ("paper", "reference"):
        rescale_queries(state, "net.", query_factor(theirs, ours, num_heads_of(module.net)))
    module.load_state_dict(state, strict=True)
    return f"initialised the network weights from the {what}"
