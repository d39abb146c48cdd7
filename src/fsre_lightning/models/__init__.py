"""Networks of FSRE-Depth: shared timm encoder, Monodepth2 decoders, CMA and the pose network."""

from fsre_lightning.models.cma import CrossTaskAttention
from fsre_lightning.models.decoder import MonodepthDecoder
from fsre_lightning.models.encoder import FeatureEncoder, PretrainedWeightsNotFound, build_encoder
from fsre_lightning.models.fsre import FSRENetwork
from fsre_lightning.models.pose import PoseNetwork
from fsre_lightning.models.release import (
    ReferenceRelease,
    ReleaseFormatError,
    load_reference_release,
    save_reference_release,
)

__all__ = [
    "CrossTaskAttention",
    "FSRENetwork",
    "FeatureEncoder",
    "MonodepthDecoder",
    "PoseNetwork",
    "PretrainedWeightsNotFound",
    "ReferenceRelease",
    "ReleaseFormatError",
    "build_encoder",
    "load_reference_release",
    "save_reference_release",
]
