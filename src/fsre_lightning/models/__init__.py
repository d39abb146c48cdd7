"""Networks of FSRE-Depth: shared timm encoder, Monodepth2 decoders, CMA and the pose network."""

from fsre_lightning.models.cma import CrossTaskAttention
from fsre_lightning.models.decoder import MonodepthDecoder
from fsre_lightning.models.encoder import FeatureEncoder, build_encoder
from fsre_lightning.models.fsre import FSRENetwork, NetworkConfig
from fsre_lightning.models.pose import PoseNetwork, PoseNetworkConfig
from fsre_lightning.models.pretrained import PretrainedWeightsNotFound

__all__ = [
    "CrossTaskAttention",
    "FSRENetwork",
    "FeatureEncoder",
    "MonodepthDecoder",
    "NetworkConfig",
    "PoseNetwork",
    "PoseNetworkConfig",
    "PretrainedWeightsNotFound",
    "build_encoder",
]
