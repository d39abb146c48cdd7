"""Image panels worth looking at (issue 29): labelled rows, ground truth and pseudo-label beside
the prediction, the error on a fixed scale with its colour bar, NaN-proof; TensorBoard's
hp_metric is the validation AbsRel."""

from __future__ import annotations

import numpy as np
import torch

from fsre_lightning.tracking.panels import ERROR_VMAX, panel_rows, relative_error, render_panel
from fsre_lightning.visualize import labelled_panel


def _batch(n: int = 3, h: int = 32, w: int = 64) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(n, 1, 2 * h, 2 * w)
    gt[:, :, h:, ::3] = 10.0  # sparse "velodyne" points on the lower half
    batch = {"frames": torch.rand(n, 3, 3, h, w, generator=g), "depth_gt": gt,
             "labels": torch.randint(0, 19, (n, h, w), generator=g)}
    outputs = {"disp": {0: torch.rand(n, 1, h, w, generator=g)},
               "seg_logits": torch.randn(n, 19, h, w, generator=g)}
    return batch, outputs


def test_a_validation_panel_labels_its_rows_and_shows_gt_error_and_pseudo_labels() -> None:
    batch, outputs = _batch()
    rows = panel_rows(batch, outputs, 2, scaled_disp=torch.full((3, 1, 32, 64), 0.1))
    assert [label for label, _ in rows] == [
        "input (frame 0)", "predicted disparity", "ground truth (1 / depth)",
        f"|gt - pred| / gt, 0 to {ERROR_VMAX}", "predicted segmentation", "pseudo-label"]
    assert all(images.shape == (2, 3, 32, 64) for _, images in rows)
    panel = render_panel(batch, outputs, 2, scaled_disp=torch.full((3, 1, 32, 64), 0.1))
    image = (panel.permute(1, 2, 0).numpy() * 255).round()
    # The label column holds text (dark pixels) and the colour bar sits under the six rows.
    assert (image[:, :150] < 100).any()
    assert panel.shape[-2] > 6 * 32
    bar = image[6 * 34 + 4: 6 * 34 + 14, 190:190 + 2 * 66 - 2]
    assert np.ptp(bar.reshape(-1, 3), axis=0).max() > 100  # a gradient, not a flat strip


def test_the_error_is_relative_to_the_ground_truth_after_median_scaling() -> None:
    gt = torch.zeros(1, 1, 4, 4)
    gt[0, 0, 0, :2] = 10.0
    gt[0, 0, 1, :2] = 20.0
    pred_depth = torch.full((1, 1, 4, 4), 3.0)
    pred_depth[0, 0, 1, :2] = 9.0  # ratios 10/3 and 20/9: median scaling puts it on 15 / 15
    error = relative_error(1.0 / pred_depth, gt)
    scale = 15.0 / 6.0  # median(gt) / median(pred) = 15 / 6
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, :2] = abs(10.0 - 3.0 * scale) / 10.0
    expected[0, 0, 1, :2] = abs(20.0 - 9.0 * scale) / 20.0
    torch.testing.assert_close(error, expected)


def test_non_finite_predictions_still_render() -> None:
    batch, outputs = _batch()
    outputs["disp"][0][0, 0, :4] = float("nan")
    outputs["disp"][0][1] = float("inf")
    panel = render_panel(batch, outputs, 2, scaled_disp=outputs["disp"][0])
    assert torch.isfinite(panel).all() and float(panel.min()) >= 0 and float(panel.max()) <= 1


def test_labelled_panel_places_each_sample_at_its_cell() -> None:
    tiles = torch.rand(2, 3, 8, 16)
    panel = labelled_panel([("a", tiles), ("b", tiles.flip(0))])
    expected = (tiles[1] * 255 + 0.5).floor() / 255
    got = panel[:, 0:8, 190 + 18:190 + 18 + 16]  # row 0, sample 1 (16 px + 2 px gap after 0)
    torch.testing.assert_close(got, expected, atol=1 / 255, rtol=0)


def test_hp_metric_is_the_validation_abs_rel(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from fsre_lightning.data.dataset import collate
    from fsre_lightning.data.kitti_layout import KITTI_INTRINSICS
    from fsre_lightning.geometry import intrinsics_matrix
    from fsre_lightning.module import FSREModule

    torch.manual_seed(0)
    module = FSREModule({"_target_": "fsre_lightning.models.FSRENetwork", "encoder": "test_resnet",
                         "segmentation": False, "cma_scales": []},
                        {"_target_": "fsre_lightning.models.PoseNetwork",
                         "encoder": "test_resnet"},
                        loss={"segmentation_weight": 0.0, "sgt_weight": 0.0},
                        eval_crop="none", image_log_every_n_steps=0)
    K = intrinsics_matrix(64, 64, KITTI_INTRINSICS)
    items = [{"frames": torch.rand(3, 3, 64, 64), "K": K, "inv_K": torch.linalg.inv(K),
              "depth_gt": torch.rand(1, 64, 64) * 20 + 1, "index": i, "name": f"d {i} l"}
             for i in range(2)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, DataLoader(items, batch_size=2, collate_fn=collate), verbose=False)
    metrics = trainer.callback_metrics
    assert float(metrics["hp_metric"]) == float(metrics["val/abs_rel"]) > 0
