"""Pose evaluation on KITTI odometry with Monodepth2's protocol (docs/design.md section 3.16).

    ODOM_ROOT/sequences/<seq:02d>/image_2/<frame:06d>.png   left colour camera (.jpg read too)
    ODOM_ROOT/poses/<seq:02d>.txt    one line per frame: 12 numbers, the row-major 3 x 4
                                     camera-to-world matrix P_i (KITTI gives 00-10)

The maths is plain numpy in float64 (`read_poses`, `relative_motions`, `chain_positions`,
`snippet_ate`, `trajectory_errors`, `summarise`); `load_sequence` checks a sequence's files
before any network runs, and `predict_motions` runs a pose network over a sequence's frame
pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fsre_lightning.data.decode import load_image
from fsre_lightning.data.kitti_layout import IMAGE_EXTENSIONS
from fsre_lightning.errors import DataError
from fsre_lightning.models.pose import PoseNetwork

# Frames per snippet (Monodepth2's `track_length`): 4 chained motions.
TRACK_LENGTH = 5
CAMERA_FOLDER = "image_2"  # the left colour camera, as Monodepth2's odometry split ("l")
# How far a pose's 3 x 3 block may be from a rotation (max |R^T R - I|): KITTI's files print seven
# significant digits, so real poses are within about 1e-5; anything far off is not a pose.
_ROTATION_TOLERANCE = 1e-2


def sequence_name(sequence: int) -> str:
    """KITTI odometry's two-digit name of a sequence: 9 -> "09"."""
    return f"{sequence:02d}"


# ------------------------------------------------------------------------- ground truth
def read_poses(path: str | os.PathLike[str]) -> np.ndarray:
    """N x 4 x 4 camera-to-world matrices (float64) of a KITTI poses file.

    Each non-empty line holds 12 numbers, the row-major 3 x 4 matrix [R | t]; a line that does
    not (a wrong count, a word, a non-finite number, a 3 x 3 block that is not a rotation) is
    a DataError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise DataError(f"poses file {path} is not a text file of 12 numbers per line") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise DataError(f"{where}: expected 12 numbers (a row-major 3 x 4 camera-to-world "
                            f"matrix), got {line.strip()[:80]!r}") from None
        if len(values) != 12 or not all(math.isfinite(v) for v in values):
            raise DataError(f"{where}: expected 12 finite numbers (a row-major 3 x 4 "
                            f"camera-to-world matrix), got {len(values)}: {line.strip()[:80]!r}")
        rotation = np.asarray(values).reshape(3, 4)[:, :3]
        off = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
        if off > _ROTATION_TOLERANCE:
            raise DataError(f"{where}: the 3 x 3 block is not a rotation (R^T R differs from I "
                            f"by {off:.3g}): not a camera pose")
        rows.append(values)
    if not rows:
        raise DataError(f"poses file {path} holds no poses")
    poses = np.zeros((len(rows), 4, 4))
    poses[:, :3, :] = np.asarray(rows).reshape(-1, 3, 4)
    poses[:, 3, 3] = 1.0
    return poses


# ------------------------------------------------------------------------------ the maths
def relative_motions(poses: np.ndarray) -> np.ndarray:
    """(N - 1) x 4 x 4: M_i = P_{i+1}^-1 P_i, which maps points of camera i into camera i + 1.

    This is what the pose network predicts for the ordered pair (frame i, frame i + 1)
    (`PoseNetwork.transform` of a future source, docs/design.md 3.4), and what Monodepth2's
    evaluation chains for the ground truth (the inverse of P_i^-1 P_{i+1}).
    """
    poses = np.asarray(poses, dtype=np.float64)
    return np.linalg.inv(poses[1:]) @ poses[:-1]


def chain_positions(motions: np.ndarray) -> np.ndarray:
    """(K + 1) x 3: the translation of I, M_0, M_0 M_1, ..., M_0 ... M_{K-1} (a snippet's
    track, starting at the origin)."""
    current = np.eye(4)
    positions = [current[:3, 3].copy()]
    for motion in np.asarray(motions, dtype=np.float64):
        current = current @ motion
        positions.append(current[:3, 3].copy())
    return np.stack(positions)


def snippet_ate(gt_xyz: np.ndarray, pred_xyz: np.ndarray) -> tuple[float, float]:
    """(ATE, scale) of one snippet's track, K x 3 each (docs/design.md 3.16).

    The prediction is translated so its first point is the ground truth's, then scaled by the
    least-squares s = sum(gt . pred) / sum(pred . pred); ATE = sqrt(sum |s pred - gt|^2) / K,
    Monodepth2's (and SfMLearner's) normalisation: the root of the summed squares over K, not
    the root of their mean. A prediction that does not move (all points at the first) gets
    s = 0.
    """
    gt = np.asarray(gt_xyz, dtype=np.float64)
    pred = np.asarray(pred_xyz, dtype=np.float64)
    if gt.shape != pred.shape or gt.ndim != 2 or gt.shape[1] != 3:
        raise ValueError(f"tracks must both be K x 3, got {gt.shape} and {pred.shape}")
    pred = pred + (gt[0] - pred[0])
    norm = float(np.sum(pred * pred))
    scale = float(np.sum(gt * pred)) / norm if norm > 0 else 0.0
    error = pred * scale - gt
    return float(np.sqrt(np.sum(error * error))) / len(gt), scale


def trajectory_errors(gt_motions: np.ndarray, pred_motions: np.ndarray,
                      track_length: int = TRACK_LENGTH) -> np.ndarray:
    """The ATE of every snippet of a sequence of N frames (N - 1 motions each).

    As Monodepth2's evaluation: a snippet starts at every frame but the last, and chains the
    `track_length - 1` motions from there, so the last `track_length - 2` snippets are shorter
    (4, 3, then 2 frames for the default 5). N - 1 snippets in all.
    """
    gt_motions, pred_motions = np.asarray(gt_motions), np.asarray(pred_motions)
    if gt_motions.shape != pred_motions.shape or gt_motions.shape[1:] != (4, 4):
        raise ValueError(f"motions must both be M x 4 x 4, got {gt_motions.shape} and "
                         f"{pred_motions.shape}")
    if track_length < 2:
        raise ValueError(f"track_length must be >= 2, got {track_length}")
    steps = track_length - 1
    return np.array([snippet_ate(chain_positions(gt_motions[i:i + steps]),
                                 chain_positions(pred_motions[i:i + steps]))[0]
                     for i in range(len(gt_motions))])


def summarise(errors: np.ndarray) -> dict[str, float | int]:
    """Mean and (population, as numpy's default) standard deviation of the snippets' ATE."""
    errors = np.asarray(errors, dtype=np.float64)
    return {"ate_mean": float(errors.mean()), "ate_std": float(errors.std()),
            "num_snippets": len(errors)}


# ------------------------------------------------------------------------------ the layout
@dataclass(frozen=True)
class OdometrySequence:
    """One sequence's frames (in order, one per pose) and its ground truth."""

    sequence: int
    frames: tuple[Path, ...]
    poses_path: Path
    poses: np.ndarray

    @property
    def name(self) -> str:
        return sequence_name(self.sequence)


def _frame_file(folder: Path, frame: int) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{frame:06d}.{ext}"
        if path.is_file():
            return path
    return None


def _frame_count(folder: Path) -> int:
    """Distinct frame numbers among the folder's <6 digits>.<png|jpg|jpeg> files."""
    return len({p.stem for p in folder.iterdir() if p.suffix[1:].lower() in IMAGE_EXTENSIONS
                and len(p.stem) == 6 and p.stem.isdigit()})


def load_sequence(root: str | os.PathLike[str], sequence: int) -> OdometrySequence:
    """A sequence's frames and ground-truth poses, every file checked before a network runs:
    a missing folder, poses file or image, a malformed poses file, or a poses file whose
    length is not the sequence's frame count is a one-line DataError naming the file."""
    root = Path(root)
    name = sequence_name(sequence)
    if not root.is_dir():
        raise DataError(f"odom_root={str(root)!r} is not a folder: give the KITTI odometry "
                        "folder holding sequences/<seq>/image_2/ and poses/<seq>.txt")
    folder = root / "sequences" / name / CAMERA_FOLDER
    if not folder.is_dir():
        raise DataError(f"sequence {name}: no image folder {folder} (KITTI odometry's colour "
                        "images, data_odometry_color, unpacked into odom_root)")
    poses_path = root / "poses" / f"{name}.txt"
    if not poses_path.is_file():
        raise DataError(f"sequence {name}: no ground-truth poses {poses_path} (KITTI publishes "
                        "them for sequences 00-10 only, in data_odometry_poses)")
    poses = read_poses(poses_path)
    count = len(poses)
    if count < 2:
        raise DataError(f"{poses_path} holds {count} pose: a motion needs at least 2 frames")
    frames = []
    for frame in range(count):
        path = _frame_file(folder, frame)
        if path is None:
            raise DataError(f"missing image {folder / f'{frame:06d}.png'}: {poses_path} has "
                            f"{count} poses, one per frame 000000 to {count - 1:06d}")
        frames.append(path)
    found = _frame_count(folder)
    if found != count:
        raise DataError(f"{poses_path} has {count} poses but {folder} holds {found} frames: "
                        "one pose per frame (a poses file of another sequence, or cut short?)")
    return OdometrySequence(sequence, tuple(frames), poses_path, poses)


# -------------------------------------------------------------------- the pose network
@torch.inference_mode()
def predict_motions(pose_net: PoseNetwork, frames: Sequence[Path], size: tuple[int, int],
                    batch_size: int, device: torch.device) -> np.ndarray:
    """(N - 1) x 4 x 4 float64: the network's transform for each pair (frame i, frame i + 1),
    fed in time order and not inverted (`PoseNetwork.transform` of a future source), as
    Monodepth2's evaluation takes it. Frames are read as training reads them (`load_image`,
    Lanczos to `size`), `batch_size` pairs at a time; each frame is decoded once."""
    if len(frames) < 2:
        raise ValueError(f"a motion needs at least 2 frames, got {len(frames)}")
    motions = []
    previous: torch.Tensor | None = None
    for start in range(0, len(frames) - 1, batch_size):
        stop = min(start + batch_size, len(frames) - 1)  # the batch's last pair ends here
        first = start if previous is None else start + 1
        new = torch.stack([load_image(frames[i], size) for i in range(first, stop + 1)])
        images = new if previous is None else torch.cat([previous[None], new])
        previous = images[-1]
        images = images.to(device)
        transform = pose_net.transform(images[:-1], images[1:], 1)
        motions.append(transform.double().cpu().numpy())
    return np.concatenate(motions)
