"""The `loss` group (`LossConfig`) and the rules of its options, importable without torch: the
config checks run before a command imports its work (docs/design.md section 3)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

from fsre_lightning.config.checks import check_choice, check_number, is_number, require
from fsre_lightning.models.network_config import check_scales


def check_alpha(key: str, alpha: Any) -> None:
    """The SSIM weight of the photometric error: a number in [0, 1] (0 = L1 only)."""
    check_number(key, alpha, lo=0, hi=1, what="the SSIM weight is in [0, 1]")


# What the pixels outside the image are (see the module docstring).
BORDERS = ("reference", "exclude")


def _as_int(value: object) -> int | None:
    """`value` as an int if it is an integer (Python, NumPy or 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_sgt_options(kernel_size: Any, margin: Any, threshold: Any,
                      keys: tuple[str, str, str] = ("kernel_size", "margin", "threshold")
                      ) -> tuple[int, float, int]:
    """The rules of K, m and T (`keys` name them in errors); returns (K, m, T).

    m = 0 is allowed: the paper sweeps the margin and 0 is the end point of that sweep.
    """
    k_key, m_key, t_key = keys
    k = _as_int(kernel_size)
    require(k is not None and k >= 3 and k % 2 == 1, k_key, kernel_size,
            "K must be an odd integer >= 3 (the patch is centred on its anchor)")
    require(is_number(margin) and margin >= 0, m_key, margin,
            "m, the triplet margin, must be >= 0")
    t = k - 1 if threshold is None else _as_int(threshold)
    require(t is not None and 1 <= t < k * k, t_key, threshold,
            f"null (= K - 1) or an integer in 1..{k * k - 1}")
    return k, float(margin), t


SCALE_WEIGHTINGS = ("reference", "monodepth2")


@dataclass(kw_only=True)
class LossConfig:
    """The `loss` group: every knob of the total loss with the paper's values as defaults, and
    its rules (docs/design.md section 3)."""

    alpha: float = 0.85
    smoothness_weight: float = 1e-3
    segmentation_weight: float = 0.3
    sgt_weight: float = 0.1
    sgt_scales: list[int] = field(default_factory=lambda: [3, 2, 1])
    sgt_kernel_size: int = 5
    sgt_margin: float = 0.3
    sgt_threshold: int | None = None
    sgt_border: str = "reference"
    scale_weighting: str = "reference"
    automask: bool = True
    identity_noise: float = 1e-5
    min_depth: float = 0.1
    max_depth: float = 100.0

    def __post_init__(self) -> None:
        check_alpha("alpha", self.alpha)
        for key in ("smoothness_weight", "segmentation_weight", "sgt_weight", "identity_noise"):
            check_number(key, getattr(self, key), lo=0)
        check_scales("sgt_scales", self.sgt_scales)
        check_sgt_options(self.sgt_kernel_size, self.sgt_margin, self.sgt_threshold,
                          ("sgt_kernel_size", "sgt_margin", "sgt_threshold"))
        check_choice("sgt_border", self.sgt_border, BORDERS)
        check_choice("scale_weighting", self.scale_weighting, SCALE_WEIGHTINGS)
        check_number("min_depth", self.min_depth, lo=0, strict=True)
        check_number("max_depth", self.max_depth, lo=0, strict=True)
        require(self.min_depth < self.max_depth, "min_depth", self.min_depth,
                f"0 < min_depth < max_depth (= {self.max_depth})")
        self.sgt_scales = [int(s) for s in self.sgt_scales]
