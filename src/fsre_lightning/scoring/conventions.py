"""The names and choices of the evaluation, importable without torch (config checks, reports):
the metric keys and how tables name them, the crops, the protocols, the Garg crop's box."""

from __future__ import annotations

from collections.abc import Mapping

DEPTH_METRIC_KEYS: tuple[str, ...] = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")

# What a run reports: the seven depth errors (the paper's table columns), then mIoU.
REPORTED_METRICS: tuple[str, ...] = (*DEPTH_METRIC_KEYS, "miou")

# How every printout and table names them (the paper's column names; a1..a3 are d1..d3, the
# share of pixels with max(gt / pred, pred / gt) < 1.25, 1.25^2, 1.25^3). JSON keys stay as above.
DISPLAY_NAMES: dict[str, str] = {"abs_rel": "AbsRel", "sq_rel": "SqRel", "rmse": "RMSE",
                                 "rmse_log": "RMSlog", "a1": "d1", "a2": "d2", "a3": "d3",
                                 "miou": "mIoU"}

# garg: the Garg/Eigen crop of KITTI's frames; none: every pixel with ground truth.
EVAL_CROPS = ("garg", "none")

# How a test split is scored (evaluate's `protocol`): eigen = Garg crop (data.eval_crop) and
# ground truth capped to (min_depth, max_depth); improved = Monodepth2's protocol of the
# improved (annotated) ground truth: every pixel with gt > 0, no crop, no cap on the ground
# truth. Both clamp the prediction to [min_depth, max_depth]; auto = improved for annotated
# ground truth, eigen otherwise.
PROTOCOLS = ("auto", "eigen", "improved")

# Garg/Eigen crop as fractions of the ground-truth size (rows, then columns).
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)


def format_table_row(results: Mapping[str, float]) -> str:
    """The seven metrics as a header line and the paper's `&`-separated LaTeX row."""
    # A row cell is "&", 8 characters, 2 spaces: the leading space ends each name over its number.
    header = " " + " | ".join(f"{DISPLAY_NAMES[key]:>8}" for key in DEPTH_METRIC_KEYS)
    row = "".join(f"&{results[key]:8.3f}  " for key in DEPTH_METRIC_KEYS) + "\\\\"
    return f"{header}\n{row}"
