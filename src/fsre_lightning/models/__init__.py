"""Networks of FSRE-Depth: shared timm encoder, Monodepth2 decoders, CMA and the pose network.

The names below are imported on first use, so that `fsre_lightning.models.network_config` (what
the config checks read) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CrossTaskAttention": "cma",
    "MonodepthDecoder": "decoder",
    "FeatureEncoder": "encoder",
    "build_encoder": "encoder",
    "FSRENetwork": "fsre",
    "NetworkConfig": "network_config",
    "PoseNetwork": "pose",
    "PoseNetworkConfig": "network_config",
    "PretrainedWeightsNotFound": "pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
