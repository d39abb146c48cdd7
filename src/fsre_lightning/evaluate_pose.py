"""Score a checkpoint's pose network on KITTI odometry:
`python -m fsre_lightning.evaluate_pose ckpt_path=... odom_root=... [overrides]`.

    python -m fsre_lightning.evaluate_pose ckpt_path=run/checkpoints/last.ckpt \\
        odom_root=/data/kitti_odom [sequences=[9,10]]

Monodepth2's protocol (docs/design.md 3.16): the pose network's motion of every consecutive
frame pair, chained over 5-frame snippets, each snippet scaled to the ground truth by least
squares; the mean and standard deviation of the snippets' trajectory error (ATE, metres) per
sequence are printed as Monodepth2 prints them and written as JSON. Beside the JSON, each
sequence's predicted motions are saved as the field's scripts save them (Monodepth2's
`poses.npy`): `<json stem>.motions-<seq>.npy`, float64 (N - 1) x 4 x 4, the network's transform
of each consecutive frame pair (i, i + 1). Every sequence's files are checked before the
network runs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fsre_lightning.config import validate_config
from fsre_lightning.config.checks import check_writable
from fsre_lightning.config.schemas import as_sequences
from fsre_lightning.hydra_entry import hydra_command
from fsre_lightning.runtime import resolve_device, write_json

log = logging.getLogger(__name__)


def default_metrics_path(ckpt_path: Path, sequences: Sequence[int]) -> Path:
    """Next to the checkpoint, named after it and the sequences: last.eval-pose-09-10.json."""
    from fsre_lightning.scoring.odometry import (
        sequence_name,
    )

    names = "-".join(sequence_name(s) for s in sequences)
    return ckpt_path.with_name(f"{ckpt_path.stem}.eval-pose-{names}.json")


def motions_path(metrics_path: Path, sequence: str) -> Path:
    """Where a sequence's predicted motions go: last.eval-pose-09-10.motions-09.npy."""
    return metrics_path.with_name(f"{metrics_path.stem}.motions-{sequence}.npy")


def format_table(results: dict[str, Any]) -> str:
    """A header of the sequences and the `&`-separated row "mean ± std" of each."""
    names = list(results["sequences"])
    header = " " + " | ".join(f"{'Seq. ' + name:>13}" for name in names)
    row = "".join(f"& {s['ate_mean']:.3f} ± {s['ate_std']:.3f} "
                  for s in results["sequences"].values()) + "\\\\"
    return f"{header}\n{row}"


def print_report(results: dict[str, Any]) -> None:
    settings = results["settings"]
    print(f"\npose, Monodepth2's protocol ({settings['track_length']}-frame snippets, scale "
          f"aligned per snippet) at {settings['height']} x {settings['width']}")
    for name, scores in results["sequences"].items():
        print(f"sequence {name}: {scores['num_frames']} frames, {scores['num_snippets']} "
              f"snippets\n   Trajectory error: {scores['ate_mean']:0.3f}, "
              f"std: {scores['ate_std']:0.3f}")
    print(format_table(results))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as the config says; returns what the JSON file holds."""
    validate_config(cfg, "evaluate_pose")
    # The work's imports after the checks: a usage error answers without torch.
    from fsre_lightning.scoring.odometry import (
        TRACK_LENGTH,
        load_sequence,
        predict_motions,
        relative_motions,
        summarise,
        trajectory_errors,
    )
    from fsre_lightning.trained import load_module, training_resolution

    ckpt_path = Path(cfg.ckpt_path)
    sequences = [int(s) for s in as_sequences(cfg.sequences)]
    metrics_path = (Path(cfg.metrics_path) if cfg.get("metrics_path")
                    else default_metrics_path(ckpt_path, sequences))
    # What would fail later fails now: every sequence's files, where the metrics go.
    data = [load_sequence(Path(cfg.odom_root), s) for s in sequences]
    check_writable("metrics_path", str(metrics_path))
    device = resolve_device(cfg.device)
    module = load_module(ckpt_path, device)
    height, width, source = training_resolution(ckpt_path, cfg.height, cfg.width)
    log.info("network input %d x %d (from %s)", height, width, source)

    results: dict[str, Any] = {"sequences": {}}
    motions: dict[str, np.ndarray] = {}
    for sequence in data:
        log.info("sequence %s: %d frames", sequence.name, len(sequence.frames))
        predicted = predict_motions(module.pose_net, sequence.frames, (height, width),
                                    int(cfg.batch_size), device)
        errors = trajectory_errors(relative_motions(sequence.poses), predicted)
        motions[sequence.name] = predicted
        results["sequences"][sequence.name] = {
            **summarise(errors), "num_frames": len(sequence.frames),
            "motions_file": motions_path(metrics_path, sequence.name).name}
    results["settings"] = {
        "checkpoint": str(ckpt_path), "odom_root": str(cfg.odom_root), "height": height,
        "width": width, "track_length": TRACK_LENGTH, "device": str(device),
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    for name, predicted in motions.items():
        np.save(motions_path(metrics_path, name), np.asarray(predicted, dtype=np.float64))
    write_json(metrics_path, results)
    print_report(results)
    print(f"metrics written to {metrics_path}, the predicted motions beside it "
          f"({', '.join(s['motions_file'] for s in results['sequences'].values())})")
    return results


main = hydra_command("evaluate_pose", run)


if __name__ == "__main__":
    sys.exit(main())
