"""Pose evaluation on KITTI odometry (docs/design.md 3.16): the maths against hand-computed
values, the files' checks, and `evaluate_pose` end to end on fabricated sequences whose answer
is known (a perfect, a scaled and a drifting pose predictor)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kornia.geometry.conversions import rotation_matrix_to_axis_angle
from PIL import Image

from fsre_lightning import evaluate_pose
from fsre_lightning.config import validate_config
from fsre_lightning.errors import ConfigError, DataError
from fsre_lightning.models.pose import PoseNetwork
from fsre_lightning.scoring.odometry import (
    chain_positions,
    load_sequence,
    read_poses,
    relative_motions,
    snippet_ate,
    summarise,
    trajectory_errors,
)
from fsre_lightning.testing import compose_config, run_main
from fsre_lightning.testing.tiny_checkpoints import make_run


# ------------------------------------------------------------------ fabricated trajectories
def rigid(yaw: float = 0.0, translation: tuple[float, float, float] = (0.0, 0.0, 0.0)
          ) -> np.ndarray:
    """4 x 4 [R_y(yaw) | t]."""
    c, s = math.cos(yaw), math.sin(yaw)
    out = np.eye(4)
    out[:3, :3] = [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]
    out[:3, 3] = translation
    return out


def straight(num_frames: int) -> np.ndarray:
    """Camera-to-world poses 1 m apart along z, no rotation."""
    return np.stack([rigid(translation=(0.0, 0.0, float(i))) for i in range(num_frames)])


def curve(num_frames: int) -> np.ndarray:
    """Each frame 1 m forward (and 0.1 m up) in the camera's own frame, then 0.15 rad of yaw:
    a turning path, on which the order of a pair matters."""
    step = rigid(0.15, (0.0, -0.1, 1.0))
    poses = [rigid(0.3, (2.0, 0.0, -1.0))]
    for _ in range(num_frames - 1):
        poses.append(poses[-1] @ step)
    return np.stack(poses)


def write_poses(path: Path, poses: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(f"{v:.9e}" for v in p[:3].reshape(-1)) + "\n"
                            for p in poses))
    return path


# Frame i's green channel is constant 10 + 20 i, so a fake pose network reads which frames it
# was given (Lanczos keeps a constant channel constant); red and blue are noise.
def frame_value(index: int) -> int:
    return 10 + 20 * index


def frame_index(image: torch.Tensor) -> int:
    return round((float(image[1].mean()) * 255 - 10) / 20)


def make_odometry(root: Path, poses: np.ndarray, sequence: int = 9, ext: str = "png") -> Path:
    """root/sequences/<seq>/image_2/<frame>.<ext> (24 x 72) and root/poses/<seq>.txt."""
    folder = root / "sequences" / f"{sequence:02d}" / "image_2"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sequence)
    for i in range(len(poses)):
        rgb = rng.integers(0, 255, (24, 72, 3), dtype=np.uint8)
        rgb[..., 1] = frame_value(i)
        Image.fromarray(rgb).save(folder / f"{i:06d}.{ext}")
    write_poses(root / "poses" / f"{sequence:02d}.txt", poses)
    return root


# ----------------------------------------------------------------------------- the maths
def test_read_poses_gives_4x4_camera_to_world_matrices(tmp_path: Path) -> None:
    poses = curve(4)
    path = write_poses(tmp_path / "09.txt", poses)
    path.write_text(path.read_text() + "\n")  # a trailing blank line is no pose
    read = read_poses(path)
    assert read.shape == (4, 4, 4) and read.dtype == np.float64
    np.testing.assert_allclose(read, poses, atol=1e-9)
    np.testing.assert_array_equal(read[:, 3], np.tile([0.0, 0.0, 0.0, 1.0], (4, 1)))


@pytest.mark.parametrize(("line", "what"), [
    ("1 0 0 0 0 1 0 0 0 0 1", "got 11"),
    ("1 0 0 0 0 1 0 0 0 0 1 0 7", "got 13"),
    ("1 0 0 x 0 1 0 0 0 0 1 0", "expected 12 numbers"),
    ("1 0 0 nan 0 1 0 0 0 0 1 0", "12 finite numbers"),
    ("2 0 0 0 0 1 0 0 0 0 1 0", "not a rotation"),
])
def test_a_bad_poses_line_is_named_by_file_and_line(tmp_path: Path, line: str,
                                                    what: str) -> None:
    path = tmp_path / "09.txt"
    path.write_text(f"1 0 0 0 0 1 0 0 0 0 1 0\n{line}\n")
    with pytest.raises(DataError, match=rf"09\.txt:2: .*{what}"):
        read_poses(path)


def test_empty_or_binary_poses_files_are_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt holds no poses"):
        read_poses(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match=r"binary\.txt is not a text file"):
        read_poses(binary)


def test_relative_motion_maps_camera_i_into_camera_i_plus_1() -> None:
    poses = curve(5)
    motions = relative_motions(poses)
    assert motions.shape == (4, 4, 4)
    for i, motion in enumerate(motions):
        # a point of camera i, seen from camera i + 1: P_{i+1} M_i = P_i
        np.testing.assert_allclose(poses[i + 1] @ motion, poses[i], atol=1e-12)
    # 1 m forward along z: the world moves 1 m backwards in the next camera
    np.testing.assert_allclose(relative_motions(straight(2))[0], rigid(translation=(0, 0, -1)))


def test_chained_positions_of_known_motions() -> None:
    assert chain_positions(np.zeros((0, 4, 4))).tolist() == [[0.0, 0.0, 0.0]]
    steps = [rigid(translation=(1.0, 0.0, 0.0)), rigid(translation=(0.0, 2.0, 0.0)),
             rigid(translation=(0.0, 0.0, 3.0))]
    np.testing.assert_allclose(chain_positions(np.stack(steps)),
                               [[0, 0, 0], [1, 0, 0], [1, 2, 0], [1, 2, 3]])
    # a quarter turn, then 1 m along the turned x axis: -1 m along z of the snippet's start
    turned = chain_positions(np.stack([rigid(math.pi / 2), rigid(translation=(1.0, 0.0, 0.0))]))
    np.testing.assert_allclose(turned[-1], [0.0, 0.0, -1.0], atol=1e-12)


def test_snippet_ate_of_perfect_scaled_and_shifted_tracks_is_zero() -> None:
    gt = chain_positions(relative_motions(curve(5)))
    assert snippet_ate(gt, gt) == pytest.approx((0.0, 1.0), abs=1e-12)
    error, scale = snippet_ate(gt, 2.5 * gt)
    assert error == pytest.approx(0.0, abs=1e-12) and scale == pytest.approx(0.4)
    # only the first points are aligned by translation
    shifted = gt + np.array([3.0, -1.0, 2.0])
    assert snippet_ate(gt, shifted)[0] == pytest.approx(0.0, abs=1e-12)


def test_snippet_ate_hand_computed_values() -> None:
    # perpendicular: the best scale is 0, the error the ground truth itself, over K = 2
    gt = np.array([[0.0, 0, 0], [0, 0, 1]])
    assert snippet_ate(gt, np.array([[0.0, 0, 0], [1, 0, 0]])) == (0.5, 0.0)
    # a prediction that does not move: scale 0, not a division by zero
    assert snippet_ate(gt, np.zeros((2, 3))) == (0.5, 0.0)
    # forward with a lateral drift d per metre: s = 1 / (1 + d^2), and
    # |s pred_k - gt_k|^2 = k^2 d^2 / (1 + d^2), so ATE = sqrt(30 d^2 / (1 + d^2)) / 5
    d = 0.1
    k = np.arange(5.0)[:, None]
    gt = k * [0.0, 0.0, 1.0]
    error, scale = snippet_ate(gt, k * [d, 0.0, 1.0])
    assert scale == pytest.approx(1 / (1 + d * d))
    assert error == pytest.approx(math.sqrt(30 * d * d / (1 + d * d)) / 5)
    assert error == pytest.approx(0.10900, abs=1e-5)
    # Monodepth2 divides the root of the summed squares by K: not the RMSE, sqrt(mean)
    assert error != pytest.approx(math.sqrt(30 * d * d / (1 + d * d) / 5))


def drift_errors(num_frames: int, d: float) -> list[float]:
    """Per snippet ATE of a straight path predicted with a lateral drift d per metre: the
    full snippets (5 frames, sum of k^2 = 30), then the tail of 4, 3 and 2 frames."""
    c = d * d / (1 + d * d)
    sizes = [5] * (num_frames - 4) + [4, 3, 2]
    return [math.sqrt(sum(k * k for k in range(m)) * c) / m for m in sizes]


def test_trajectory_errors_over_a_sequence() -> None:
    poses = curve(9)
    gt = relative_motions(poses)
    errors = trajectory_errors(gt, gt)
    assert errors.shape == (8,)  # a snippet at every frame but the last (Monodepth2's loop)
    np.testing.assert_allclose(errors, 0.0, atol=1e-12)
    scaled = gt.copy()
    scaled[:, :3, 3] *= 3.0  # a constant scale: aligned away
    np.testing.assert_allclose(trajectory_errors(gt, scaled), 0.0, atol=1e-12)

    d = 0.1
    straight_gt = relative_motions(straight(9))
    drifting = straight_gt.copy()
    drifting[:, 0, 3] = d
    np.testing.assert_allclose(trajectory_errors(straight_gt, drifting), drift_errors(9, d))
    stats = summarise(trajectory_errors(straight_gt, drifting))
    assert stats["num_snippets"] == 8
    assert stats["ate_mean"] == pytest.approx(np.mean(drift_errors(9, d)))
    assert stats["ate_std"] == pytest.approx(np.std(drift_errors(9, d)))


def test_the_direction_of_a_motion_matters_on_a_turn() -> None:
    """Inverted motions (the pair's order swapped) score 0 on a straight path, where the
    least-squares scale absorbs the sign, but not on a turning one: a turn is what catches a
    wrong convention."""
    straight_gt = relative_motions(straight(6))
    inverted = np.linalg.inv(straight_gt)
    np.testing.assert_allclose(trajectory_errors(straight_gt, inverted), 0.0, atol=1e-12)
    turning = relative_motions(curve(6))
    assert trajectory_errors(turning, np.linalg.inv(turning)).mean() > 0.05


def test_trajectory_errors_want_matching_motions() -> None:
    gt = relative_motions(curve(5))
    with pytest.raises(ValueError, match="motions must both be"):
        trajectory_errors(gt, gt[:-1])


# ----------------------------------------------------------------------------- the files
def test_load_sequence_reads_frames_in_order(tmp_path: Path) -> None:
    root = make_odometry(tmp_path / "odom", curve(6), sequence=10, ext="jpg")
    sequence = load_sequence(root, 10)
    assert sequence.name == "10" and len(sequence.frames) == 6
    assert [p.name for p in sequence.frames] == [f"{i:06d}.jpg" for i in range(6)]
    np.testing.assert_allclose(sequence.poses, curve(6), atol=1e-8)


def _fails_naming(root: Path, sequence: int, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        load_sequence(root, sequence)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_every_input_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root = make_odometry(tmp_path / "odom", curve(6))
    seq = root / "sequences" / "09" / "image_2"
    poses = root / "poses" / "09.txt"
    _fails_naming(tmp_path / "nowhere", 9, "odom_root=", "nowhere")
    # a sequence without images (wrong number), or without ground truth (KITTI's 11-21)
    _fails_naming(root, 5, str(root / "sequences" / "05" / "image_2"))
    (root / "sequences" / "11" / "image_2").mkdir(parents=True)
    _fails_naming(root, 11, str(root / "poses" / "11.txt"), "00-10")
    # a missing image
    (seq / "000003.png").rename(tmp_path / "kept.png")
    _fails_naming(root, 9, "missing image", str(seq / "000003.png"), str(poses))
    (tmp_path / "kept.png").rename(seq / "000003.png")
    # more frames than poses: another sequence's poses, or a file cut short
    write_poses(poses, curve(5))
    _fails_naming(root, 9, str(poses), "5 poses", str(seq), "6 frames")
    # malformed
    poses.write_text(poses.read_text() + "0 1 2\n")
    _fails_naming(root, 9, f"{poses}:6:")
    write_poses(poses, curve(1))
    _fails_naming(root, 9, str(poses), "at least 2 frames")
    write_poses(poses, curve(6))
    assert len(load_sequence(root, 9).frames) == 6


# ----------------------------------------------------------------------------- the command
def test_the_config_is_checked_before_any_work() -> None:
    good = ["ckpt_path=x.ckpt", "odom_root=/data/odom"]
    validate_config(compose_config("evaluate_pose", good), "evaluate_pose")
    for override, key in (("sequences=[]", "sequences="), ("sequences=[9,9]", "sequences="),
                          ("batch_size=0", "batch_size="), ("odom_root=???", "odom_root="),
                          ("height=64", "height=")):
        with pytest.raises(ConfigError, match=key):
            validate_config(compose_config("evaluate_pose", [*good, override]),
                            "evaluate_pose")


@pytest.fixture(scope="module")
def checkpoint(module_tmp: Callable[[str], Path]) -> Path:
    """A randomly initialised model trained (as it records) at 64 x 192, depth only."""
    return make_run(module_tmp("run"), segmentation=False, height=64, width=192,
                    encoder="test_resnet")


def _run(ckpt: Path, root: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose_config("evaluate_pose", [f"ckpt_path={ckpt}", f"odom_root={root}",
                                           "device=cpu", *overrides])
    return evaluate_pose.run(cfg)


def test_a_random_network_gets_a_finite_score(tmp_path: Path, checkpoint: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = make_odometry(tmp_path / "odom", curve(7), sequence=9)
    make_odometry(root, straight(6), sequence=10)
    results = _run(checkpoint, root, "sequences=[9,10]", "batch_size=4")
    written = json.loads((checkpoint.parent / "last.eval-pose-09-10.json").read_text())
    assert written == results
    assert list(written["sequences"]) == ["09", "10"]
    nine, ten = written["sequences"]["09"], written["sequences"]["10"]
    assert (nine["num_frames"], nine["num_snippets"]) == (7, 6)
    assert (ten["num_frames"], ten["num_snippets"]) == (6, 5)
    assert all(math.isfinite(s["ate_mean"]) and s["ate_mean"] > 0 and s["ate_std"] >= 0
               for s in (nine, ten))
    assert (written["settings"]["height"], written["settings"]["width"]) == (64, 192)
    out = capsys.readouterr().out
    assert f"Trajectory error: {nine['ate_mean']:0.3f}, std: {nine['ate_std']:0.3f}" in out
    assert "sequence 10: 6 frames, 5 snippets" in out
    assert out.count("±") == 2 and out.rstrip().splitlines()[-2].endswith("\\\\")


class FakePose(torch.nn.Module):
    """A pose network that reads which frames it was given (`frame_index`) and answers with
    `motions[i]` for the pair (frame i, frame i + 1) as axis-angle and translation; any other
    pair fails the test. `transform` is the real network's."""

    transform = PoseNetwork.transform

    def __init__(self, motions: np.ndarray) -> None:
        super().__init__()
        matrices = torch.from_numpy(np.asarray(motions))
        self.axisangle = rotation_matrix_to_axis_angle(matrices[:, :3, :3]).float()
        self.translation = matrices[:, :3, 3].float()

    def forward(self, frame_a: torch.Tensor, frame_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        first = [frame_index(image) for image in frame_a]
        second = [frame_index(image) for image in frame_b]
        assert second == [i + 1 for i in first], (first, second)
        return self.axisangle[first], self.translation[first]


def _with_pose(monkeypatch: pytest.MonkeyPatch, motions: np.ndarray) -> None:
    """The command loads the checkpoint as usual; its pose network is replaced by FakePose."""
    from fsre_lightning import trained  # the command imports it when its work starts

    load = trained.load_module

    def load_module(ckpt_path: Any, device: torch.device) -> Any:
        module = load(ckpt_path, device)
        module.pose_net = FakePose(motions)
        return module

    monkeypatch.setattr(trained, "load_module", load_module)


def test_known_answers_through_the_command(tmp_path: Path, checkpoint: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    poses = curve(8)
    root = make_odometry(tmp_path / "odom", poses)
    metrics = tmp_path / "pose.json"
    gt = relative_motions(poses)
    _with_pose(monkeypatch, gt)  # a perfect predictor
    perfect = _run(checkpoint, root, "sequences=[9]", "batch_size=3",
                   f"metrics_path={metrics}")["sequences"]["09"]
    assert perfect["num_snippets"] == 7
    assert perfect["ate_mean"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads(metrics.read_text())["sequences"]["09"] == perfect

    scaled = gt.copy()
    scaled[:, :3, 3] *= 0.05  # a monocular network's arbitrary scale
    _with_pose(monkeypatch, scaled)
    result = _run(checkpoint, root, "sequences=[9]", f"metrics_path={metrics}")
    assert result["sequences"]["09"]["ate_mean"] == pytest.approx(0.0, abs=1e-6)

    straight_root = make_odometry(tmp_path / "straight", straight(8))
    drifting = relative_motions(straight(8))
    drifting[:, 0, 3] = 0.1
    _with_pose(monkeypatch, drifting)
    result = _run(checkpoint, straight_root, "sequences=[9]", "batch_size=16",
                  f"metrics_path={metrics}")["sequences"]["09"]
    expected = drift_errors(8, 0.1)
    assert result["ate_mean"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert result["ate_std"] == pytest.approx(np.std(expected), abs=1e-6)


def test_input_errors_stop_with_one_line(tmp_path: Path, checkpoint: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_odometry(tmp_path / "odom", curve(5))
    image = root / "sequences" / "09" / "image_2" / "000002.png"
    poses = root / "poses" / "09.txt"
    base = [f"ckpt_path={checkpoint}", f"odom_root={root}", "device=cpu", "sequences=[9]"]

    def fails(overrides: list[str], *fragments: str) -> None:
        assert evaluate_pose.main([*base, *overrides]) == 2, overrides
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fsre_lightning.evaluate_pose: error: ")
        assert all(f in lines[0] for f in fragments), err

    fails([f"ckpt_path={tmp_path / 'none.ckpt'}"], "no such checkpoint", "none.ckpt")
    fails(["sequences=[9,10]"], "no image folder", str(root / "sequences" / "10"))
    fails(["sequences=[]"], "sequences=[]", "not allowed")
    image.write_bytes(b"not a png")
    fails([], "cannot decode image", str(image))
    image.unlink()
    fails([], "missing image", str(image))
    poses.write_text("1 2 3\n")
    fails([], f"{poses}:1: expected 12")
    assert not list(tmp_path.rglob("*.json"))
    assert not (checkpoint.parent / "last.eval-pose-09.json").exists()


@pytest.mark.slow  # the command line end to end (in-process)
def test_cli_scores_and_fails_in_one_line(command_root: Path, checkpoint: Path) -> None:
    tmp_path = command_root
    root = make_odometry(tmp_path / "odom", curve(6), sequence=10)
    metrics = tmp_path / "out" / "pose.json"
    args = [f"ckpt_path={checkpoint}", f"odom_root={root}", "sequences=[10]", "device=cpu"]
    result = run_main(evaluate_pose.main, [*args, f"metrics_path={metrics}"])
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(metrics.read_text())["sequences"]["10"]
    assert (f"   Trajectory error: {scores['ate_mean']:0.3f}, std: {scores['ate_std']:0.3f}"
            in result.stdout)
    assert not (tmp_path / "outputs").exists()  # no run folder

    write_poses(root / "poses" / "10.txt", curve(9))  # three poses more than frames
    failed = run_main(evaluate_pose.main, args)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        f"fsre_lightning.evaluate_pose: error: missing image "
        f"{root / 'sequences' / '10' / 'image_2' / '000006.png'}: {root / 'poses' / '10.txt'} "
        "has 9 poses, one per frame 000000 to 000008"]
