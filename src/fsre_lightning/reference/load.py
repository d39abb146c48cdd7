"""Load a published release folder into FSRENetwork and PoseNetwork (`load_reference_release`).

Every tensor of every file is loaded or listed as deliberately left out (the ImageNet
classifier, the training size); anything else is a ReleaseFormatError naming file and key.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fsre_lightning.models.cma import ATTENTION_SCALES
from fsre_lightning.models.fsre import FSRENetwork
from fsre_lightning.models.pose import PoseNetwork
from fsre_lightning.reference.keys import (
    CLASSIFIER_KEYS,
    ENCODER_FILE,
    OPTIONAL_SUFFIX,
    POSE_ENCODER_FILE,
    Entry,
    depth_network_entries,
    pose_network_entries,
    query_factor,
    rescale_queries,
)
from fsre_lightning.reference.release_layout import (
    MAX_KEYS_SHOWN,
    ReleaseFormatError,
    ReleaseLayout,
    files_present,
    find_options,
    infer_layout,
    shown,
    training_resolution,
)


@dataclass
class ReferenceRelease:
    """Networks loaded from a release folder, with what was found and what was left out."""

    depth: FSRENetwork
    pose: PoseNetwork | None
    height: int
    width: int
    layout: ReleaseLayout
    folder: Path
    options: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def read_state_file(path: Path) -> dict[str, Any]:
    """A release file as a plain dict; unreadable or non-state-dict files are ReleaseFormatError.

    weights_only: a release holds tensors and numbers only, so no pickled code ever runs.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        # torch's weights-only refusal is a page of advice; its one informative line says
        # what the file holds besides tensors (or where a truncated pickle broke off).
        lines = [ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln]
        first = (lines[0].split(". ")[0] if lines
                 else text.splitlines()[0] if text else type(err).__name__)
        raise ReleaseFormatError(
            f"{path} cannot be read as a PyTorch state dict of tensors and numbers "
            f"({type(err).__name__}: {first}); is the file truncated (an interrupted download "
            "or unzip) or not a weights file?") from err
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ReleaseFormatError(f"{path} is not a state dict (a mapping of names to tensors), "
                                 f"got {type(state).__name__}")
    return dict(state)


def _ignored_entries(layout: ReleaseLayout) -> dict[str, dict[str, str]]:
    """Per file, the keys that are read but deliberately not loaded, with the reason."""
    classifier = {k: "torchvision's ImageNet classifier, never run" for k in CLASSIFIER_KEYS}
    out = {ENCODER_FILE: {**classifier, "use_stereo": "Monodepth2's stereo flag"}}
    if layout.pose_encoder is not None:
        out[POSE_ENCODER_FILE] = classifier
    return out


def collect_state(folder: Path, files: Mapping[str, Mapping[str, Any]],
                  entries: Mapping[str, Entry], target: Mapping[str, torch.Tensor],
                  ignored: Mapping[str, Mapping[str, str]], notes: list[str]
                  ) -> dict[str, torch.Tensor]:
    """Our state dict from the release files; every file key must be used or in `ignored`.

    Missing, unexpected and mis-shaped keys are reported per file, naming the keys.
    """
    state: dict[str, torch.Tensor] = {}
    used: dict[str, set[str]] = {}
    problems: dict[str, list[str]] = {}
    for ours, entry in entries.items():
        used.setdefault(entry.file, set()).add(entry.key)
        file_state = files[entry.file]
        if entry.key not in file_state:
            if not entry.key.endswith(OPTIONAL_SUFFIX):
                problems.setdefault(entry.file, []).append(f"missing {entry.key}")
            continue
        value = file_state[entry.key]
        expected = tuple(target[ours].shape)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        if entry.rows is not None and shape is not None and shape[0] % entry.rows == 0 \
                and shape[0] > 0 and shape[1:] == expected[1:]:
            if shape[0] > entry.rows:
                notes.append(f"{entry.file}: {entry.key}[{entry.rows}:{shape[0]}] (outputs "
                             "for a second frame pair, which Monodepth2 predicts and never uses)")
            value, shape = value[: entry.rows], expected
        if shape != expected:
            problems.setdefault(entry.file, []).append(
                f"{entry.key} has shape {shape if shape is not None else type(value).__name__}, "
                f"expected {expected}")
            continue
        state[ours] = value
    # The training resolution in encoder.pth is read (the release's input size), not a weight.
    used.setdefault(ENCODER_FILE, set()).update(("height", "width"))
    for file, file_state in files.items():
        skip = ignored.get(file, {})
        extra = [k for k in file_state if k not in used.get(file, set()) and k not in skip]
        if extra:
            problems.setdefault(file, []).append(f"unexpected {shown(extra)}")
        notes.extend(f"{file}: {k} ({skip[k]})" for k in file_state if k in skip)
    if problems:
        lines = [f"{folder / file}: " + "; ".join(items[:MAX_KEYS_SHOWN])
                 + (f"; ... and {len(items) - MAX_KEYS_SHOWN} more"
                    if len(items) > MAX_KEYS_SHOWN else "")
                 for file, items in problems.items()]
        raise ReleaseFormatError(
            "the release does not match the reference layout the other files imply:\n  "
            + "\n  ".join(lines))
    return state


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    full = module.state_dict()
    # Old releases lack num_batches_tracked: keep ours (0) for those; nothing else is optional.
    full.update(state)
    module.load_state_dict(full, strict=True)


def load_reference_release(folder: str | os.PathLike[str], num_heads: int | None = None,
                           head_ratio: float | None = None,
                           attention_scale: str = "reference") -> ReferenceRelease:
    """Load a FSRE-Depth or Monodepth2 release folder into FSRENetwork (+ PoseNetwork).

    The ResNet depth, CMA on/off and its scales, segmentation decoder and disparity scales come
    from the files; H and r (`num_heads`, `head_ratio`) from the CMA shapes, checked against
    the given values or, when those are None, against ``opt.json``. Every tensor is loaded or
    listed in `ReferenceRelease.ignored`; anything else is a ReleaseFormatError naming the file
    and key. `attention_scale="paper"` folds the reference's extra 1 / sqrt(H) into the query
    convolution, so both choices reproduce the release's outputs. Networks come back in eval
    mode (BatchNorm uses the release's running statistics).
    """
    if attention_scale not in ATTENTION_SCALES:
        raise ValueError(f"attention_scale must be one of {ATTENTION_SCALES}, "
                         f"got {attention_scale!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"release folder {str(folder)!r} does not exist: unzip the "
                                "published model and pass the folder holding encoder.pth")
    present = files_present(folder)
    files = {name: read_state_file(folder / name) for name in present}
    options, options_path = find_options(folder)
    layout = infer_layout(folder, files, options, options_path, num_heads, head_ratio)
    height, width = training_resolution(folder, files[ENCODER_FILE], options, options_path)

    config = layout.network_config(attention_scale)
    depth = FSRENetwork(**{k: v for k, v in config.items() if k != "_target_"})
    entries = depth_network_entries(depth)
    pose = None
    if layout.pose_encoder is not None:
        pose = PoseNetwork(encoder=layout.pose_encoder, pretrained=False)
        entries.update({f"pose.{k}": v for k, v in pose_network_entries(pose).items()})
    target = {**depth.state_dict(), **({f"pose.{k}": v for k, v in pose.state_dict().items()}
                                        if pose is not None else {})}
    notes: list[str] = []
    state = collect_state(folder, files, entries, target, _ignored_entries(layout), notes)
    depth_state = {k: v for k, v in state.items() if not k.startswith("pose.")}
    rescale_queries(depth_state, "", query_factor("reference", attention_scale,
                                                   layout.num_heads))
    _load_into(depth, depth_state)
    if pose is not None:
        _load_into(pose, {k[len("pose."):]: v for k, v in state.items() if k.startswith("pose.")})
        pose.eval()
    return ReferenceRelease(depth=depth.eval(), pose=pose, height=height, width=width,
                            layout=layout, folder=folder, options=options, ignored=notes)
