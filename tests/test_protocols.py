"""Numbers the field can compare (issue 28 item 2, issue 29 item 3): the improved-ground-truth
protocol as published tables use it (every gt > 0 pixel, no crop, no cap on the ground truth,
the prediction clamped), checked against an independent per-pixel computation; the Eigen
protocol unchanged; a fixed prediction scale factor; a partial score never replaces a full one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fsre_lightning.evaluate import ground_truth_source, metrics_file, protocol_of
from fsre_lightning.scoring.eigen import evaluate_eigen

MIN, MAX = 1e-3, 80.0


def _maps(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Annotated-style ground truth (sparse, up to 120 m, filling the whole frame) and
    predictions (disparities) of three 30 x 100 frames."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(3):
        gt = rng.uniform(0.5, 120.0, (30, 100)).astype(np.float32)
        gt[rng.random((30, 100)) < 0.6] = 0.0
        depth = np.clip(gt * rng.uniform(0.5, 2.0, gt.shape) + 0.1, 0.05, 200.0)
        preds.append((1.0 / depth).astype(np.float32))
        gts.append(gt)
    return preds, gts


def _by_hand(preds: list[np.ndarray], gts: list[np.ndarray], improved: bool,
             scale_factor: float = 1.0) -> dict[str, float]:
    """Monodepth2's evaluate_depth.py loop, written out per pixel with numpy."""
    rows = []
    for disp, gt in zip(preds, gts, strict=True):
        pred = scale_factor / disp.astype(np.float64)
        gt = gt.astype(np.float64)
        if improved:
            mask = gt > 0
        else:
            h, w = gt.shape
            crop = np.zeros_like(mask := (gt > MIN) & (gt < MAX))
            crop[int(0.40810811 * h):int(0.99189189 * h),
                 int(0.03594771 * w):int(0.96405229 * w)] = True
            mask &= crop
        p, g = pred[mask], gt[mask]
        p = p * np.median(g) / np.median(p)
        p = np.clip(p, MIN, MAX)
        thresh = np.maximum(g / p, p / g)
        rows.append([np.mean(np.abs(g - p) / g), np.mean((g - p) ** 2 / g),
                     np.sqrt(np.mean((g - p) ** 2)), np.sqrt(np.mean((np.log(g) - np.log(p)) ** 2)),
                     np.mean(thresh < 1.25), np.mean(thresh < 1.25 ** 2),
                     np.mean(thresh < 1.25 ** 3)])
    keys = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
    return dict(zip(keys, np.mean(rows, axis=0), strict=True))


@pytest.mark.parametrize(("protocol", "scale"), [("improved", 1.0), ("eigen", 1.0),
                                                  ("improved", 26.0)])
def test_both_protocols_match_an_independent_per_pixel_computation(protocol: str,
                                                                   scale: float) -> None:
    preds, gts = _maps()
    improved = protocol == "improved"
    got = evaluate_eigen(preds, gts, crop="none" if improved else "garg", min_depth=MIN,
                         max_depth=MAX, cap_gt=not improved, scale_factor=scale)
    want = _by_hand(preds, gts, improved, scale)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert got["num_frames"] == 3


def test_the_improved_protocol_keeps_ground_truth_beyond_80_m_and_outside_the_crop() -> None:
    preds, gts = _maps()
    improved = evaluate_eigen(preds, gts, crop="none", min_depth=MIN, max_depth=MAX,
                              cap_gt=False)
    eigen = evaluate_eigen(preds, gts, crop="garg", min_depth=MIN, max_depth=MAX)
    assert improved["abs_rel"] != pytest.approx(eigen["abs_rel"], rel=1e-3)


def test_auto_picks_the_protocol_by_the_ground_truth_source(tmp_path: Path) -> None:
    assert protocol_of("auto", "annotated") == "improved"
    assert protocol_of("auto", "velodyne") == protocol_of("auto", "rendered") == "eigen"
    assert protocol_of("eigen", "annotated") == "eigen"
    bench = tmp_path / "splits" / "eigen_benchmark"
    bench.mkdir(parents=True)
    assert ground_truth_source(bench, bench / "gt_depths.npz")[0] == "annotated"
    eigen = tmp_path / "splits" / "eigen"
    eigen.mkdir(parents=True)
    assert ground_truth_source(eigen, eigen / "gt_depths.npz")[0] == "velodyne"
    (eigen / "gt_depths.json").write_text(json.dumps({"source": "annotated"}))
    source, known = ground_truth_source(eigen, eigen / "gt_depths.npz")
    assert source == "annotated" and "gt_depths.json" in known


def test_a_partial_score_never_replaces_a_full_one(tmp_path: Path) -> None:
    path = tmp_path / "last.eval-eigen.json"
    assert metrics_file(path, skipped=3) == path  # nothing there yet
    path.write_text(json.dumps({"num_skipped_frames": 0, "abs_rel": 0.1}))
    assert metrics_file(path, skipped=0) == path
    assert metrics_file(path, skipped=3) == tmp_path / "last.eval-eigen.partial.json"
    path.write_text(json.dumps({"num_skipped_frames": 2}))  # a partial one may be replaced
    assert metrics_file(path, skipped=3) == path


@pytest.mark.slow
def test_evaluate_scores_the_world_the_checkpoint_trained_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A smoke checkpoint used to make evaluate generate and score the full default world
    (minutes); it scores the smoke world, and a data root holding another world is refused in
    one line instead of being regenerated in place."""
    from fsre_lightning import evaluate, train
    from fsre_lightning.data.synthetic import generate_synthetic_kitti
    from fsre_lightning.testing import command_env

    for key, value in command_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    assert train.main(["+experiment=smoke", "model=monodepth2", "logger=csv",
                       "model.network.encoder=test_resnet",
                       "model.pose_network.encoder=test_resnet",
                       f"hydra.run.dir={run_dir}"]) == 0
    capsys.readouterr()

    def strict(text: str) -> object:  # NaN/Infinity are not JSON: a strict parser refuses them
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    strict((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert evaluate.main([f"ckpt_path={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert "data: the checkpoint's training data" in out and "6 frames scored" in out
    assert "ground truth: rendered" in out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synthetic_smoke"]
    results = strict(ckpt.with_name("last.eval-synthetic.json").read_text())
    assert results["settings"]["protocol"] == "eigen"
    other = generate_synthetic_kitti(tmp_path / "other", num_drives=3, frames_per_drive=5,
                                     height=32, width=96, workers=1)
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    assert evaluate.main([f"ckpt_path={ckpt}", f"data.root={other}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another synthetic world (frames_per_drive 5 there" in err[0]
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    from fsre_lightning.runtime import write_json

    path = write_json(tmp_path / "m.json", {"after": {"abs_rel": float("nan")},
                                            "monitor": {"value": float("inf")}, "n": [1.0]})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data == {"after": {"abs_rel": None}, "monitor": {"value": None}, "n": [1.0]}
