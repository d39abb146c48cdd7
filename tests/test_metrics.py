import numpy as np
import pytest
import torch

from fsre_lightning.scoring.metrics import (
    DEPTH_METRIC_KEYS,
    DepthMetrics,
    SegmentationIoU,
    compute_depth_metrics,
    depth_errors,
    eval_mask,
)


def _slow_errors(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    out = {k: 0.0 for k in DEPTH_METRIC_KEYS}
    n = len(gt)
    for g, p in zip(gt, pred, strict=True):
        out["abs_rel"] += abs(g - p) / g / n
        out["sq_rel"] += (g - p) ** 2 / g / n
        out["rmse"] += (g - p) ** 2 / n
        out["rmse_log"] += (np.log(g) - np.log(p)) ** 2 / n
        ratio = max(g / p, p / g)
        for i, key in enumerate(("a1", "a2", "a3"), start=1):
            out[key] += float(ratio < 1.25**i) / n
    out["rmse"] = out["rmse"] ** 0.5
    out["rmse_log"] = out["rmse_log"] ** 0.5
    return out


def test_depth_errors_match_formulas() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 80, 500)
    pred = gt * rng.uniform(0.6, 1.6, 500)
    ours = depth_errors(gt, pred)
    slow = _slow_errors(gt, pred)
    assert set(ours) == set(DEPTH_METRIC_KEYS)
    for key in DEPTH_METRIC_KEYS:
        assert ours[key] == pytest.approx(slow[key], rel=1e-9)
    as_tensor = depth_errors(torch.from_numpy(gt), torch.from_numpy(pred))
    assert float(as_tensor["rmse"]) == pytest.approx(slow["rmse"])


def test_depth_errors_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        depth_errors(np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        depth_errors(np.ones(0), np.ones(0))


def test_garg_crop_rows_and_columns() -> None:
    gt = torch.full((375, 1242), 10.0)
    mask = eval_mask(gt, crop="garg")
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    assert rows[0] == int(0.40810811 * 375) and rows[-1] == int(0.99189189 * 375) - 1
    assert cols[0] == int(0.03594771 * 1242) and cols[-1] == int(0.96405229 * 1242) - 1
    gt[200, 600] = 85.0  # beyond the 80 m cap
    assert not eval_mask(gt)[200, 600]


def test_median_scaling_removes_global_scale() -> None:
    gt = torch.rand(40, 60) * 30 + 2
    disp = 1.0 / (gt * 0.2)  # right shape, wrong scale
    errors, ratio = compute_depth_metrics(gt, disp, crop="none")
    assert float(ratio) == pytest.approx(5.0, rel=1e-6)
    assert float(errors["abs_rel"]) < 1e-6
    assert compute_depth_metrics(torch.zeros(4, 4), torch.ones(4, 4), crop="none") is None


def test_depth_metric_averages_per_image_and_respects_gt_size() -> None:
    metric = DepthMetrics(crop="none")
    gt = torch.zeros(2, 1, 6, 8)
    gt[0, 0] = 4.0
    gt[1, 0, :4, :6] = 2.0  # second image is 4 x 6, zero-padded
    disp = torch.zeros(2, 1, 6, 8)
    disp[0] = 1 / 4.0
    disp[1] = 1 / 2.0
    metric.update(disp, gt, torch.tensor([[6, 8], [4, 6]]))
    out = metric.compute()
    assert float(out["num_images"]) == 2
    assert float(out["abs_rel"]) < 1e-9
    assert float(out["ratio_median"]) == pytest.approx(1.0)


def test_miou_ignores_void_and_absent_classes() -> None:
    metric = SegmentationIoU(num_classes=19)
    labels = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 5]])
    metric.update(pred, labels)
    # class 0: 1/2, class 1: 2/3; the others never occur and are left out.
    assert float(metric.compute()) == pytest.approx((0.5 + 2 / 3) / 2)
