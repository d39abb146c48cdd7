"""Checkpoint plumbing for reliable resume: atomic writes, finding `last`, architecture checks.

* `AtomicCheckpointIO` writes every checkpoint to a temporary file in the same folder and
  renames it over the target, so a run killed while saving never leaves a truncated
  `last.ckpt` (the previous one stays, complete).
* `find_last_checkpoint` resolves `ckpt_path=last`: the newest `checkpoints/last.ckpt` of the
  run folders of one experiment name.
* `training_data_entry` is what a checkpoint says about the data it was trained on (input
  size, camera, frame ids, class names), so evaluate, predict and export need the file alone.
* `check_state_dict_compatible` compares a checkpoint's weights with a model before training
  starts and names every missing, unexpected and shape-mismatched key.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from fsre_lightning.cityscapes import CLASS_NAMES
from fsre_lightning.errors import UserError, first_line

# How many keys of each kind an error message lists before it says "... and N more".
MAX_KEYS_SHOWN = 8
# Checkpoint entries beside Lightning's (and tracking.wandb's run id). TRAINING_DATA_KEY:
# `training_data_entry`. INPUT_SIZE_KEY: the (height, width) alone, as checkpoints imported from
# a release before TRAINING_DATA_KEY existed hold it.
TRAINING_DATA_KEY = "training_data"
INPUT_SIZE_KEY = "input_size"
# In TRAINING_DATA_KEY: the training run's data config (its `data` group, checked and complete).
DATA_CONFIG_KEY = "data_config"


def training_data_entry(height: int, width: int, intrinsics: Sequence[float],
                        frame_ids: Sequence[int], segmentation: bool) -> dict[str, Any]:
    """The description of a model's training data stored in its checkpoints: network input
    size, normalised intrinsics (fx, fy, cx, cy), frame ids and, with a segmentation decoder,
    the names of its classes (plain types: weights-only loading reads them)."""
    return {
        INPUT_SIZE_KEY: [int(height), int(width)],
        "intrinsics": [float(v) for v in intrinsics],
        "frame_ids": [int(f) for f in frame_ids],
        "class_names": list(CLASS_NAMES) if segmentation else [],
    }


def describe_training(checkpoint: dict[str, Any], trainer: Any, segmentation: bool) -> None:
    """Store in `checkpoint` what it needs to be used alone: the description of the trainer's
    data (`training_data_entry`), with the data module's checked config (`DATA_CONFIG_KEY`,
    plain types), from which `evaluate` scores the data the model was trained on."""
    data = getattr(trainer, "datamodule", None)
    if data is not None and hasattr(data, "intrinsics"):
        entry = training_data_entry(data.height, data.width, data.intrinsics, data.frame_ids,
                                    segmentation)
        config = getattr(data, "config", None)
        if dataclasses.is_dataclass(config):
            entry[DATA_CONFIG_KEY] = dataclasses.asdict(config)
        checkpoint[TRAINING_DATA_KEY] = entry


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's weights do not fit the model the config builds."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic (temporary file + fsync + os.replace).

    Remote paths (`s3://...`) keep Lightning's own writer: fsspec uploads are all-or-nothing.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got "
                            f"{storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A process killed while saving leaves its temporary file (hundreds of MB); one writer
        # per target, so any left-over one is stale.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        # Same folder as the target: os.replace is only atomic within one file system.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                # On disk before the rename: a power cut cannot leave an empty file behind
                # a name that already points at it.
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; checkpoints are shared files
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def find_last_checkpoint(output_dir: str | os.PathLike[str], name: str,
                         exclude: str | os.PathLike[str] | None = None) -> Path:
    """The newest (by modification time) `<output_dir>/<name>/*/checkpoints/last.ckpt`.

    Lightning's SLURM auto-requeue checkpoints (`<run folder>/hpc_ckpt_<n>.ckpt`) count too.
    `exclude` is a run folder to ignore (the one being started). Raises FileNotFoundError naming
    the searched pattern when there is none.
    """
    pattern = Path(output_dir) / name / "*" / "checkpoints" / "last.ckpt"
    skip = Path(exclude).resolve() if exclude is not None else None
    base = Path(output_dir, name)
    candidates = [*base.glob("*/checkpoints/last.ckpt"), *base.glob("*/hpc_ckpt_*.ckpt")]
    found = [p for p in candidates if p.is_file() and (
        skip is None or skip not in p.resolve().parents)]
    if not found:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint matches {pattern}; train once with name={name} "
            "first, or pass ckpt_path=<path to a .ckpt>")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_checkpoint_weights_only(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint read with `torch.load(weights_only=True)`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    try:
        # mmap: the tensors are only looked at (keys, shapes), not read.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointMismatchError(
            f"{path} cannot be read as a weights-only PyTorch checkpoint "
            f"({type(err).__name__}: {first_line(err)}); is it truncated or not "
            "written by fsre_lightning.train?") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _grouped(keys: list[str]) -> str:
    """Few keys by name; many by their module (`net.seg_decoder.* (78 keys)`), which is what
    tells a user which part of the architecture differs."""
    if len(keys) <= MAX_KEYS_SHOWN:
        return ", ".join(keys)
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return _listed([f"{g}.* ({n} keys)" for g, n in sorted(groups.items())])


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = len(keys) - MAX_KEYS_SHOWN
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_state_dict_compatible(model: torch.nn.Module, state_dict: Mapping[str, Any],
                                source: str = "checkpoint", setting: str = "ckpt_path"
                                ) -> None:
    """Raise CheckpointMismatchError naming every key that would not load into `model`;
    `setting` is the key that named the file (ckpt_path, init_weights), which the message
    offers to leave out.

    Loading a checkpoint of another architecture otherwise fails deep inside load_state_dict
    (or, for shape mismatches, in the middle of a tensor copy) with a message that does not say
    which config differs.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state_dict)
        if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(
            expected[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint: {_grouped(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the checkpoint: "
                     f"{_grouped(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} with another shape: {_listed(shapes)}")
    raise CheckpointMismatchError(
        f"{source} was trained with another architecture than this config builds; "
        + "; ".join(parts)
        + ". Use the model config the checkpoint was trained with (its run folder's "
        f"config.yaml), or start without {setting}")
